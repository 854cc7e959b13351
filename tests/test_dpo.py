"""DPO: the policy comes to prefer the chosen replies; the reference never moves."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from chat_testing import (
    CONFIGS,
    FAST,
    PLACES,
    answer,
    assistant,
    greedy_replies,
    sft_model,
    user,
    write_jsonl,
)
from kotonoha.checkpoint import load_model
from kotonoha.data import checker
from kotonoha.data.chat import (
    PairData,
    collate_replies,
    epoch_rows,
    load_preferences,
    per_sequence,
)
from kotonoha.errors import UserError
from kotonoha.train.dpo import (
    DPOConfig,
    dpo_loss,
    dpo_main,
    make_reference,
    mistake_pairs,
    sequence_logps,
)
from kotonoha.train.lora import LoRAConfig, apply_lora
from kotonoha.train.reward import REWARD_INPUTS, RewardModel
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


def test_padding_free_pair_batches_score_each_reply_as_if_alone(tmp_path: Path) -> None:
    """Chosen and rejected sequences share rows (segments, restarting positions) and still
    get exactly the log-probabilities and reward scores they get one at a time."""
    model, tok = load_model(sft_model(), dtype=torch.float32)
    pairs = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", preference_rows())))
    data = PairData(tok, pairs, 128)  # rows of 128 tokens: two or three sequences each
    batch = data.batch(0, 6, range(6))
    assert batch["ids"].shape[0] < 12  # twelve sequences in fewer rows
    logps = sequence_logps(model, batch)
    idx = epoch_rows(0, 6, range(6), len(data), data.seed)
    seqs = [data.chosen[i] for i in idx] + [data.rejected[i] for i in idx]
    alone = torch.cat([sequence_logps(model, collate_replies([s], data.pad_id)) for s in seqs])
    assert torch.allclose(logps, alone, atol=1e-4)
    # The same numbers as the output head on every position (sequence_logps skips the prompts).
    ids = batch["ids"]
    logits = model(ids[:, :-1], positions=batch["positions"][:, :-1],
                   segments=batch["segments"][:, :-1])
    every = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(logps, per_sequence(every * batch["mask"], batch), atol=1e-4)
    rm = RewardModel(model, tok)
    together = rm(*(batch[k] for k in REWARD_INPUTS))
    one = torch.cat([rm(*(collate_replies([s], data.pad_id)[k] for k in REWARD_INPUTS))
                     for s in seqs])
    assert torch.allclose(together, one, atol=1e-4)


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
    nll = -(logps[:n] / per_sequence(batch["mask"], batch)[:n]).mean()
    assert torch.allclose(mixed, plain + 0.5 * nll, atol=1e-5)
    assert abs(metrics["nll_chosen"] - nll.item()) < 1e-4
    with pytest.raises(UserError, match="sft_weight"):
        DPOConfig(sft_weight=-1)
    with pytest.raises(UserError, match="mistake_samples"):
        DPOConfig(mistake_samples=-1)
    with pytest.raises(UserError, match="mistake_temperature"):
        DPOConfig(mistake_temperature=0)


def practice_rows() -> list[dict[str, Any]]:
    """Checkable conversations: the capitals the model knows, two "new" capitals it cannot know,
    and one row without a check (ignored)."""
    rows = [{"messages": [user(f"What is the capital of {c}?"), assistant(answer(c))],
             "check": {"task": "qa", "answer": PLACES[c]}, "kind": "fact"} for c in PLACES]
    for c, new in (("Aru", "Zorp"), ("Cala", "Wexa")):
        rows.append({"messages": [user(f"What is the capital of {c} now?"),
                                  assistant(f"The capital of {c} is {new}.")],
                     "check": {"task": "qa", "answer": new}, "kind": "fact"})
    rows.append({"messages": [user("Hello"), assistant("Hello!")]})
    return rows


def test_mistakes_pairs_the_models_wrong_replies_with_the_right_ones(tmp_path: Path) -> None:
    practice = write_jsonl(tmp_path / "practice.jsonl", practice_rows())
    start = sft_model()
    model, tok = load_model(start, dtype=torch.float32)
    pairs, asked = mistake_pairs(model, tok, practice, max_new_tokens=24, context=64)
    assert asked == len(PLACES) + 2
    assert [p.chosen for p in pairs] == ["The capital of Aru is Zorp.",
                                         "The capital of Cala is Wexa."]
    # The rejected replies are exactly what the model says (as `kotonoha chat` would).
    asked_new = [p.prompt[-1]["content"] for p in pairs]
    assert [p.rejected for p in pairs] == greedy_replies(start, asked_new)

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    run = dpo_main(str(CONFIGS / "dpo-tiny.yaml"),
                   [f"data={data}", f"mistakes={practice}", f"init_from={start}",
                    f"out={tmp_path / 'dpo'}", "max_new_tokens=24", *FAST], False)
    report = json.loads((run / "dpo_eval.json").read_text())
    assert report["train_pairs"] == 2 and report["mistakes"]["asked"] == asked
    assert report["test_pairs"] > 0  # `data` still supplies the held-out pairs
    saved = [json.loads(line) for line in (run / "mistakes.jsonl").read_text().splitlines()]
    assert [s["chosen"] for s in saved] == [p.chosen for p in pairs]
    # The trained policy prefers the right replies to its old mistakes more than it did.
    batch = PairData(tok, pairs, 64).batch(0, 2, range(2))
    after, _ = load_model(run, dtype=torch.float32)

    def margin(m: torch.nn.Module) -> float:
        with torch.no_grad():
            logps = sequence_logps(m, batch)
        return float((logps[:2] - logps[2:]).mean())

    assert margin(after) > margin(model) + 1


def test_sampled_mistakes_add_the_models_other_wrong_replies(tmp_path: Path) -> None:
    practice = write_jsonl(tmp_path / "practice.jsonl", practice_rows())
    model, tok = load_model(sft_model(), dtype=torch.float32)
    greedy, asked = mistake_pairs(model, tok, practice, max_new_tokens=24, context=64)
    sampled, asked_too = mistake_pairs(model, tok, practice, max_new_tokens=24, context=64,
                                       samples=4, temperature=1.5, seed=3)
    assert asked_too == asked  # conversations, not replies
    assert sampled[:len(greedy)] == greedy  # the greedy mistakes come first, unchanged
    extra = sampled[len(greedy):]
    assert extra, "hot sampling should find wrong replies the greedy ones are not"
    checks = {row["messages"][0]["content"]: row["check"]
              for row in practice_rows() if "check" in row}
    for pair in extra:  # each one a wrong reply, and no conversation's reply twice
        assert not checker.check(checks[pair.prompt[-1]["content"]], pair.rejected)
    keys = [(pair.prompt[-1]["content"], pair.rejected.strip()) for pair in sampled]
    assert len(set(keys)) == len(keys)
    # Seeded: the same call samples the same replies.
    again, _ = mistake_pairs(model, tok, practice, max_new_tokens=24, context=64,
                             samples=4, temperature=1.5, seed=3)
    assert again == sampled


def test_mistakes_needs_a_mistake(tmp_path: Path) -> None:
    known = write_jsonl(tmp_path / "known.jsonl", practice_rows()[:len(PLACES)])
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    with pytest.raises(UserError, match="no mistakes"):
        dpo_main(str(CONFIGS / "dpo-tiny.yaml"),
                 [f"data={data}", f"mistakes={known}", f"init_from={sft_model()}",
                  f"out={tmp_path / 'dpo'}", "max_new_tokens=24", *FAST], False)
    with pytest.raises(UserError, match="practice.jsonl does not exist"):  # mistakes=world
        dpo_main(str(CONFIGS / "dpo-tiny.yaml"),
                 [f"data={data}", "mistakes=world", f"world={tmp_path / 'none'}",
                  f"init_from={sft_model()}", f"out={tmp_path / 'dpo3'}", *FAST], False)
    unchecked = write_jsonl(tmp_path / "plain.jsonl", practice_rows()[-1:])
    with pytest.raises(UserError, match="check"):
        dpo_main(str(CONFIGS / "dpo-tiny.yaml"),
                 [f"data={data}", f"mistakes={unchecked}", f"init_from={sft_model()}",
                  f"out={tmp_path / 'dpo2'}", *FAST], False)
