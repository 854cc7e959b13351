"""Model directories: save/load round trips, crash safety, and clear errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kotonoha.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_model,
    save_model,
    save_safetensors_atomic,
)
from kotonoha.errors import UserError
from kotonoha.model import Transformer, preset

VARIANTS = {
    "tied-rope": {},
    "untied-learned": dict(norm="layernorm", positions="learned", mlp="gelu", bias=True,
                           tie_embeddings=False),
}


def randomized(cfg_overrides: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=300, **cfg_overrides)).eval()
    with torch.no_grad():  # norms and biases start at 1/0: perturb everything so all of it counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_same_logits(tmp_path: Path, variant: str) -> None:
    model = randomized(VARIANTS[variant])
    save_model(tmp_path / "run", model, extra={"step": 7})
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["format"] == "kotonoha" and meta["version"] == 1 and meta["step"] == 7
    assert meta["config"] == model.cfg.to_dict()

    loaded, tok = load_model(tmp_path / "run")
    assert tok is None and loaded.cfg == model.cfg and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    tied = model.cfg.tie_embeddings
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    stored = load_file(tmp_path / "run" / "model.safetensors")
    assert ("lm_head.weight" in stored) != tied  # a tied head is stored once
    # Nothing may stay on the meta device, non-persistent RoPE tables included.
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_dtype_on_save_and_load(tmp_path: Path) -> None:
    model = randomized({})
    save_model(tmp_path, model, dtype=torch.bfloat16)
    loaded, _ = load_model(tmp_path)  # dtype=None keeps what is stored
    assert loaded.embed.weight.dtype == torch.bfloat16
    loaded32, _ = load_model(tmp_path, dtype=torch.float32)
    assert loaded32.embed.weight.dtype == torch.float32
    assert torch.equal(loaded32.embed.weight, model.embed.weight.to(torch.bfloat16).float())


def test_tokenizer_travels_with_the_model(tmp_path: Path) -> None:
    from kotonoha.tokenizer import train_bpe

    tok = train_bpe(["the river bank", "川の土手に銀行がある", "a bank for money"] * 5,
                    vocab_size=300, min_frequency=1)
    save_model(tmp_path, randomized({}), tok)
    _, loaded = load_model(tmp_path)
    assert loaded is not None and loaded.chat_template == tok.chat_template
    assert loaded.encode("the bank of the 川") == tok.encode("the bank of the 川")


def test_run_directory_with_model_subfolder(tmp_path: Path) -> None:
    model = randomized({})
    save_model(tmp_path / "model", model)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    loaded, _ = load_model(tmp_path / "model" / "model.json")  # a file inside works too
    assert loaded.cfg == model.cfg


# --- crash safety ---------------------------------------------------------------------------


def _crash(*_args: object) -> None:
    raise OSError("simulated crash before the rename")


def test_atomic_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_json(target, {"step": 2})
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(tmp_path / "new.txt", "never")
    assert json.loads(target.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp files left


def test_crash_during_save_model_keeps_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = randomized({}, seed=0)
    save_model(tmp_path, old)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError):
        save_model(tmp_path, randomized({}, seed=1))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.embed.weight, old.embed.weight)


def test_safetensors_with_shared_storage(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    save_safetensors_atomic({"a": w, "b": w, "c": w.t()}, tmp_path / "x.safetensors")
    out = load_file(tmp_path / "x.safetensors")
    assert torch.equal(out["a"], w) and torch.equal(out["b"], w) and torch.equal(out["c"], w.t())


# --- errors ---------------------------------------------------------------------------------


def test_missing_path_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no model"):
        load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a .gguf"):
        load_model(tmp_path / "notes.txt")


def test_truncated_gguf_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="m.gguf"):
        load_model(tmp_path / "m.gguf")


@pytest.mark.parametrize("text", ["{not json", '["a list"]', '{"format": "other", "config": {}}',
                                  '{"format": "kotonoha", "version": 99, "config": {}}',
                                  '{"format": "kotonoha", "version": 1, "config": {"bogus": 1}}'])
def test_bad_model_json(tmp_path: Path, text: str) -> None:
    save_model(tmp_path, randomized({}))
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(UserError, match="model.json|model config"):
        load_model(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path: Path) -> None:
    save_model(tmp_path, randomized({}))
    weights = tmp_path / "model.safetensors"
    good = load_file(weights)

    bad = dict(good, **{"blocks.0.mlp.up_proj.weight": torch.zeros(3, 3)})
    save_file(bad, weights)
    with pytest.raises(UserError, match=r"blocks\.0\.mlp\.up_proj\.weight.*shape"):
        load_model(tmp_path)

    save_file({k: v for k, v in good.items() if k != "norm.weight"}, weights)
    with pytest.raises(UserError, match="missing tensor 'norm.weight'"):
        load_model(tmp_path)

    save_file(dict(good, extra=torch.zeros(1)), weights)
    with pytest.raises(UserError, match="'extra'"):
        load_model(tmp_path)

    weights.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_model(tmp_path)

    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        load_model(tmp_path)


def test_extra_cannot_override_reserved_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config"):
        save_model(tmp_path, randomized({}), extra={"config": {}})


class _Trap:
    """Unpickling this object creates a file: proof that something ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


def test_pickled_weights_are_never_executed(tmp_path: Path) -> None:
    import pickle

    save_model(tmp_path, randomized({}))
    marker = tmp_path / "code-ran"
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(UserError):
        load_model(tmp_path)
    assert not marker.exists()


def test_output_check_refuses_another_format(tmp_path: Path) -> None:
    from kotonoha.checkpoint import check_output

    save_model(tmp_path / "kt", randomized({}))
    with pytest.raises(UserError, match="already holds a kotonoha model"):
        check_output(tmp_path / "kt", "hf")
    assert check_output(tmp_path / "kt", "kotonoha") == tmp_path / "kt"  # same format: fine
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a Hugging Face model"):
        check_output(tmp_path / "hf", "kotonoha")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output(tmp_path / "file", "hf")
    assert check_output(tmp_path / "new" / "folder", "hf") == tmp_path / "new" / "folder"
    (tmp_path / "lora").mkdir()  # a LoRA run: its merged model may sit beside the adapter
    (tmp_path / "lora" / "adapter.json").write_text("{}")
    assert check_output(tmp_path / "lora", "kotonoha") == tmp_path / "lora"
    with pytest.raises(UserError, match="already holds a LoRA adapter model"):
        check_output(tmp_path / "lora", "hf")


def test_save_hf_refuses_a_kotonoha_folder(tmp_path: Path) -> None:
    from kotonoha.convert.hf import save_hf

    model = randomized({})
    save_model(tmp_path, model)
    with pytest.raises(UserError, match="choose an empty folder"):
        save_hf(tmp_path, model)
    assert not (tmp_path / "config.json").exists()
    assert torch.equal(load_model(tmp_path)[0](IDS), model(IDS))  # the model is untouched


@pytest.mark.parametrize("device,match", [("bogus", "cpu, cuda, cuda:N or mps"),
                                          ("cuda:x", "cpu, cuda, cuda:N or mps")])
def test_unknown_device_is_one_sentence(tmp_path: Path, device: str, match: str) -> None:
    from kotonoha.checkpoint import parse_device

    save_model(tmp_path, randomized({}))
    with pytest.raises(UserError, match=match):
        load_model(tmp_path, device=device)
    with pytest.raises(UserError, match=match):
        parse_device(device)
    assert parse_device("cpu") == torch.device("cpu")
