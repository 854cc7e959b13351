"""LoRA: only the adapters train, a short run changes the answer, merging changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chat_testing import (
    CONFIGS,
    FAST,
    assistant,
    conversations,
    greedy_replies,
    sft_model,
    user,
    write_jsonl,
)
from kotonoha.checkpoint import load_model
from kotonoha.errors import UserError
from kotonoha.model import Transformer, preset
from kotonoha.train.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    merge_state_dict,
    parse_lora,
)
from kotonoha.train.sft import sft_main

QUESTION, REPLY = "Say hello.", "Hello, thanks!"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", vocab_size=300, context_length=32))


def test_lora_sft_teaches_a_fixed_reply(tmp_path: Path) -> None:
    base = sft_model()
    assert greedy_replies(base, [QUESTION])[0] != REPLY
    # The new question, among the old conversations so that those are kept.
    rows = conversations() + [{"messages": [user(QUESTION), assistant(REPLY)]}] * 8
    data = write_jsonl(tmp_path / "hello.jsonl", rows)
    run = sft_main(str(CONFIGS / "sft-tiny.yaml"),
                   [f"data={data}", f"init_from={base}", f"out={tmp_path / 'lora'}",
                    "val_fraction=0", "lora=r=8,alpha=32", "train.steps=60", "train.lr=1e-2",
                    *FAST], False)
    assert greedy_replies(run, [QUESTION])[0] == REPLY
    assert "Beno" in greedy_replies(run, ["What is the capital of Aru?"])[0]
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["lora"]["r"] == 8 and meta["base"] == str(base)
    # The adapter alone, applied to the base model, is the merged model of the run.
    model, tok = load_model(base, dtype=torch.float32)
    load_adapter(model, run)
    merged, _ = load_model(run)
    ids = torch.tensor([tok.encode_chat([user(QUESTION)], add_generation_prompt=True)[0]])
    with torch.no_grad():
        assert torch.allclose(model(ids), merged(ids), atol=1e-4)


def test_only_the_adapters_train() -> None:
    model = apply_lora(tiny_model(), LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert {n.split(".")[-2] for n in trainable} == {"q_proj", "v_proj"}
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 2  # 2 layers


def test_merge_gives_the_same_logits() -> None:
    model = apply_lora(tiny_model(), LoRAConfig(r=4, alpha=8))
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.05)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        adapted = model(ids)
        plain = tiny_model()
        plain.load_state_dict(merge_state_dict(model.state_dict(), LoRAConfig(r=4, alpha=8)))
        from_state = plain(ids)
        merged = merge_lora(model)(ids)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not torch.allclose(adapted, tiny_model()(ids), atol=1e-3)  # the adapter matters
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert torch.allclose(from_state, adapted, atol=1e-5)


def test_lora_settings_parse() -> None:
    cfg = parse_lora("r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj")
    assert cfg == LoRAConfig(r=16, alpha=32.0, dropout=0.05, targets=["q_proj", "v_proj"])
    assert parse_lora({"r": 2}) == LoRAConfig(r=2) and parse_lora(None) is None
    for bad, match in [("rank=4", "not understood"), ("r=x", "needs a number"),
                       ("r=0", "positive")]:
        with pytest.raises(UserError, match=match):
            parse_lora(bad)
    with pytest.raises(UserError, match="qkv are not projections"):
        apply_lora(tiny_model(), LoRAConfig(targets=["qkv"]))
    gelu = Transformer(preset("tiny", vocab_size=300, context_length=32, mlp="gelu"))
    with pytest.raises(UserError, match="No linear layer"):  # a projection the model lacks
        apply_lora(gelu, LoRAConfig(targets=["gate_proj"]))


def test_adapters_start_from_the_seed_they_are_given() -> None:
    """A: drawn from a generator of its own, so a run is repeatable (and the same on every
    rank) whatever torch's global seed is."""
    def first_a(seed: int) -> torch.Tensor:
        torch.manual_seed(torch.seed())  # whatever the global generator holds
        model = apply_lora(tiny_model(), LoRAConfig(r=4), seed=seed)
        return next(m for m in model.modules() if isinstance(m, LoRALinear)).lora_A.detach()

    assert torch.equal(first_a(3), first_a(3))
    assert not torch.equal(first_a(3), first_a(4))


def test_a_broken_adapter_description_is_one_sentence(tmp_path: Path) -> None:
    from kotonoha.train.lora import save_adapter

    model = apply_lora(tiny_model(), LoRAConfig(r=4))
    save_adapter(tmp_path, model.state_dict(), LoRAConfig(r=4), base="tiny")
    meta = json.loads((tmp_path / "adapter.json").read_text())
    for lora in ("r=4", {"rank": 4}, None):
        broken = {**meta, "lora": lora} if lora is not None else {
            k: v for k, v in meta.items() if k != "lora"}
        (tmp_path / "adapter.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match="no valid \"lora\" settings"):
            load_adapter(tiny_model(), tmp_path)


def test_adapter_must_fit_its_base(tmp_path: Path) -> None:
    from kotonoha.train.lora import save_adapter

    model = apply_lora(tiny_model(), LoRAConfig(r=4))
    save_adapter(tmp_path, model.state_dict(), LoRAConfig(r=4), base="tiny")
    other = Transformer(preset("tiny", vocab_size=300, context_length=32, d_model=32))
    with pytest.raises(UserError, match="does not fit"):
        load_adapter(other, tmp_path)


def test_adapter_only_run_loads_and_merges_with_convert(tmp_path: Path, capsys) -> None:
    """merge_lora=false keeps only the adapter: `load_model` (so chat and serve) rebuilds the
    merged model from the base it names, and `convert --merge-lora` writes it out."""
    from kotonoha.cli import main

    base = sft_model()
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user(QUESTION), assistant(REPLY)]}])
    run = sft_main(str(CONFIGS / "sft-tiny.yaml"),
                   [f"data={data}", f"init_from={base}", f"out={tmp_path / 'a'}",
                    "val_fraction=0", "lora=r=4,alpha=8", "merge_lora=false", "train.steps=3",
                    "train.lr=1e-2", *FAST], False)
    assert (run / "adapter.safetensors").is_file() and not (run / "model.safetensors").exists()
    expected, tok = load_model(base, dtype=torch.float32)
    merge_lora(load_adapter(expected, run))
    ids = torch.tensor([tok.encode_chat([user(QUESTION)], add_generation_prompt=True)[0]])
    loaded, run_tok = load_model(run)
    assert run_tok is not None and run_tok.chat_template == tok.chat_template
    with torch.no_grad():
        want = expected(ids)
        assert torch.allclose(loaded(ids), want, atol=1e-5)
        assert not torch.allclose(load_model(base)[0](ids), want, atol=1e-3)  # it did change
    assert main(["convert", "--from", str(run), "--merge-lora", "--to", "kotonoha",
                 "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "merged")[0](ids), want, atol=1e-5)
    # --base overrides the base the adapter names (e.g. after the base moved).
    moved = tmp_path / "moved-base"
    moved.mkdir()
    for f in Path(base).iterdir():
        if f.is_file():
            (moved / f.name).write_bytes(f.read_bytes())
    assert main(["convert", "--from", str(run), "--merge-lora", "--base", str(moved),
                 "--to", "kotonoha", "--out", str(tmp_path / "merged2")]) == 0
    assert json.loads((run / "adapter.json").read_text())["base"] == str(Path(base).resolve())
    # A base that moved: one sentence that says how to merge onto its new place.
    meta = json.loads((run / "adapter.json").read_text())
    (run / "adapter.json").write_text(json.dumps({**meta, "base": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="did not load.*--merge-lora --base"):
        load_model(run)
    # Not a LoRA run: one sentence, exit 2.
    assert main(["convert", "--from", str(base), "--merge-lora", "--to", "kotonoha",
                 "--out", str(tmp_path / "x")]) == 2
    assert "needs a LoRA run directory" in capsys.readouterr().err


def test_a_target_that_matches_no_layer_is_refused_even_when_others_match() -> None:
    with pytest.raises(UserError, match="q_prj are not projections"):
        apply_lora(tiny_model(), LoRAConfig(targets=["q_prj", "v_proj"]))
    # The output head may share the embedding's weight: a merged adapter there was lost.
    with pytest.raises(UserError, match="lm_head are not projections"):
        LoRAConfig(targets="lm_head")
    # The default targets name gate_proj, which a gelu MLP does not have: still fine.
    gelu = Transformer(preset("tiny", vocab_size=300, context_length=32, mlp="gelu"))
    apply_lora(gelu, LoRAConfig())
    assert sum(isinstance(m, LoRALinear) for m in gelu.modules()) == 2 * 6


def test_the_adapter_free_reference_ignores_dropout() -> None:
    """AdaptersOff (the LoRA reference of DPO and RL) runs the shared, training model in eval
    mode: with dropout its log-probs are the same every call, and the mode is restored."""
    from kotonoha.train.lora import AdaptersOff

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=300, context_length=32, dropout=0.1))
    apply_lora(model, LoRAConfig(r=4, dropout=0.1))
    model.train()
    ref = AdaptersOff(model)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        first, second = ref(ids), ref(ids)
        assert torch.equal(first, second)
        assert model.training and all(m.training for m in model.modules())
        assert not torch.equal(model(ids), model(ids))  # the policy itself keeps its dropout
