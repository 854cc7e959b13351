"""DPO: the policy comes to prefer the chosen replies; the reference never moves."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chat_testing import CONFIGS, FAST, greedy_replies, sft_model, write_jsonl
from kotonoha.checkpoint import load_model
from kotonoha.data.chat import PairData, load_preferences
from kotonoha.errors import UserError
from kotonoha.train.dpo import DPOConfig, dpo_loss, dpo_main, make_reference, sequence_logps
from kotonoha.train.lora import LoRAConfig, apply_lora
from test_reward import preference_rows


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_dpo_raises_the_held_out_margin(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    start = sft_model()
    before = digest(start)
    run = dpo_main(str(CONFIGS / "dpo-tiny.yaml"),
                   [f"data={data}", f"init_from={start}", f"out={tmp_path / 'dpo'}", *FAST],
                   False)
    report = json.loads((run / "dpo_eval.json").read_text())
    b, a = report["before"], report["after"]
    assert a["val_logp_margin"] > b["val_logp_margin"] + 2, report  # nats, on unseen pairs
    assert a["val_reward_accuracy"] >= 0.9 and a["val_loss"] < b["val_loss"]
    assert digest(start) == before  # the starting model's files are untouched
    # The run is a chat model that still answers.
    assert json.loads((run / "model.json").read_text())["stage"] == "dpo"
    assert "Beno" in greedy_replies(run, ["What is the capital of Aru?"])[0]


@pytest.mark.parametrize("lora", [None, LoRAConfig(r=4, alpha=8)])
def test_the_reference_stays_frozen(tmp_path: Path, lora: LoRAConfig | None) -> None:
    model, tok = load_model(sft_model(), dtype=torch.float32)
    if lora is not None:
        apply_lora(model, lora)
    pairs = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", preference_rows())))
    batch = PairData(tok, pairs, 64).batch(0, 8, range(8))
    reference = make_reference(model, lora)
    ref_before = reference(batch)
    start = sequence_logps(model, batch).detach()
    loss_fn = dpo_loss(reference, beta=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(5):
        loss, metrics = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(reference(batch), ref_before)
    after = sequence_logps(model, batch).detach()
    n = len(after) // 2
    assert (after[:n] - after[n:]).mean() > (start[:n] - start[n:]).mean()  # margin grew
    assert metrics["reward_accuracy"] > 0.5


def test_dpo_with_lora_writes_an_adapter(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    run = dpo_main(str(CONFIGS / "dpo-tiny.yaml"),
                   [f"data={data}", f"init_from={sft_model()}", f"out={tmp_path / 'dpo'}",
                    "lora=r=4,alpha=8", "train.steps=8", *FAST], False)
    assert (run / "adapter.safetensors").is_file() and (run / "model.safetensors").is_file()
    report = json.loads((run / "dpo_eval.json").read_text())
    assert report["after"]["val_logp_margin"] > report["before"]["val_logp_margin"]


def test_beta_must_be_positive() -> None:
    with pytest.raises(UserError, match="beta"):
        DPOConfig(beta=0)


def test_sft_weight_adds_the_chosen_replies_nll(tmp_path: Path) -> None:
    model, tok = load_model(sft_model(), dtype=torch.float32)
    pairs = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", preference_rows())))
    batch = PairData(tok, pairs, 64).batch(0, 8, range(8))
    reference = make_reference(model, None)
    plain, metrics = dpo_loss(reference, beta=0.1)(model, batch)
    mixed, _ = dpo_loss(reference, beta=0.1, sft_weight=0.5)(model, batch)
    logps = sequence_logps(model, batch)
    n = len(logps) // 2
    nll = -(logps[:n] / batch["mask"][:n].sum(-1)).mean()
    assert torch.allclose(mixed, plain + 0.5 * nll, atol=1e-5)
    assert abs(metrics["nll_chosen"] - nll.item()) < 1e-4
    with pytest.raises(UserError, match="sft_weight"):
        DPOConfig(sft_weight=-1)
