"""Parity with `transformers` through our Hugging Face import and export.

Tiny random models, fp32: (a) an HF model saved with `save_pretrained` and imported with
`load_hf` gives the same logits as HF; (b) our model exported with `save_hf` and loaded with
`AutoModelForCausalLM` gives the same logits as ours; the tokenizer and chat template survive
the trip; what cannot be represented is a `UserError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the hub, even by accident
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

transformers = pytest.importorskip("transformers")

from kotonoha.checkpoint import load_model  # noqa: E402
from kotonoha.convert.hf import load_hf, save_hf  # noqa: E402
from kotonoha.errors import UserError  # noqa: E402
from kotonoha.model import Transformer, preset  # noqa: E402

TOL = 1e-4
V = 97  # vocabulary of the tiny models
IDS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
LLAMA_SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                   bos_token_id=None, eos_token_id=None, pad_token_id=None)

# HF configs to import. Sliding windows (5) are shorter than the 16-token input so they matter.
HF_CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                bos_token_id=None, eos_token_id=None), "gpt2"),
    "gpt2-untied": ("GPT2Config", dict(vocab_size=V, n_positions=32, n_embd=32, n_layer=2,
                                       n_head=4, n_inner=40, tie_word_embeddings=False,
                                       bos_token_id=None, eos_token_id=None), "gpt2"),
    "llama-gqa-untied": ("LlamaConfig", dict(LLAMA_SHAPE, rope_theta=500.0), "llama"),
    "llama-bias-tied-headdim": ("LlamaConfig", dict(
        LLAMA_SHAPE, num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, rms_norm_eps=1e-5), "llama"),
    "qwen2": ("Qwen2Config", dict(LLAMA_SHAPE), "qwen2"),
    "mistral-window": ("MistralConfig", dict(LLAMA_SHAPE, sliding_window=5), "mistral"),
    "gemma3": ("Gemma3TextConfig", dict(
        LLAMA_SHAPE, num_hidden_layers=4, head_dim=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=24,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}),
        "gemma3_text"),
}

# Our configs to export (and the HF class that must come back).
EXPORT_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "gpt2": (dict(norm="layernorm", positions="learned", mlp="gelu", bias=True, n_kv_head=4),
             "GPT2LMHeadModel"),
    "gpt2-untied": (dict(norm="layernorm", positions="learned", mlp="gelu", bias=True,
                         n_kv_head=4, tie_embeddings=False), "GPT2LMHeadModel"),
    "llama-gqa-untied": (dict(tie_embeddings=False, rope_theta=5e5), "LlamaForCausalLM"),
    "llama-bias": (dict(bias=True, head_dim=8, n_kv_head=1), "LlamaForCausalLM"),
    "qwen2": (dict(qkv_bias=True), "Qwen2ForCausalLM"),
    "mistral-window": (dict(sliding_window=5), "MistralForCausalLM"),
    "gemma3": (dict(mlp="geglu", qk_norm=True, post_norms=True, embed_scale=True, head_dim=16,
                    sliding_window=5, global_every=2, n_layer=4, rope_local_theta=1e3,
                    attn_scale=24**-0.5), "Gemma3ForCausalLM"),
}


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights start at 1 and biases at 0: perturb every parameter so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def hf_model(case: str) -> Any:
    cls_name, kwargs, _ = HF_CASES[case]
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    perturb(model)
    return model


def our_model(case: str, **extra: Any) -> Transformer:
    overrides, _ = EXPORT_CASES[case]
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=V, context_length=32,
                               **{**overrides, **extra})).eval()
    perturb(model)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_import_matches_transformers(tmp_path: Path, case: str) -> None:
    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    ours, tok = load_hf(tmp_path)
    assert tok is None and ours.cfg.name == tmp_path.name
    with torch.no_grad():
        expected, got = hf(IDS).logits, ours(IDS)
    assert expected.abs().max() > 0.1  # a degenerate model would make parity meaningless
    assert max_diff(got, expected) <= TOL
    assert (ours.lm_head.weight is ours.embed.weight) == ours.cfg.tie_embeddings
    # load_model recognises an HF directory too.
    again, _ = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(IDS), got)


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_matches_transformers(tmp_path: Path, case: str) -> None:
    ours = our_model(case)
    save_hf(tmp_path, ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == EXPORT_CASES[case][1]
    assert hf.config.tie_word_embeddings == ours.cfg.tie_embeddings
    with torch.no_grad():
        expected, got = ours(IDS), hf(IDS).logits
    assert max_diff(got, expected) <= TOL

    # kotonoha -> HF -> kotonoha is the identity on every tensor.
    back, _ = load_hf(tmp_path)
    assert back.cfg.to_dict() | {"name": ""} == ours.cfg.to_dict() | {"name": ""}
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_sliding_window_is_exercised() -> None:
    """The window cases above only test something if the window changes the logits."""
    windowed = our_model("mistral-window")
    full = Transformer(preset("tiny", vocab_size=V, context_length=32)).eval()
    full.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        assert max_diff(windowed(IDS), full(IDS)) > 1e-3


def test_export_bf16(tmp_path: Path) -> None:
    ours = our_model("llama-gqa-untied")
    save_hf(tmp_path, ours, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(tmp_path / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    back, _ = load_hf(tmp_path)
    assert back.embed.weight.dtype == torch.bfloat16


def test_sharded_import(tmp_path: Path) -> None:
    hf = hf_model("llama-gqa-untied")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours, _ = load_hf(tmp_path)
    with torch.no_grad():
        assert max_diff(ours(IDS), hf(IDS).logits) <= TOL


def test_tokenizer_and_chat_template_survive(tmp_path: Path) -> None:
    from kotonoha.tokenizer import train_bpe

    texts = ["The river bank was quiet.", "She went to the bank for money.",
             "川の土手を歩いた。", "銀行でお金を下ろした。", "はしを渡る。はしで食べる。"] * 4
    tok = train_bpe(texts, vocab_size=300, min_frequency=1)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size)).eval()
    save_hf(tmp_path, model, tok)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["The bank of the river.", "はしで食べる銀行", "mixed 日本語 and English!"]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    messages = [{"role": "user", "content": "川はどこ?"},
                {"role": "assistant", "content": "The river is north."},
                {"role": "user", "content": "and its bank?"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=True) == rendered
    assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == tok.encode_special(rendered)

    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.stop_ids and tok.token_to_id("<|im_end|>") in tok.stop_ids
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_id and config["bos_token_id"] == tok.bos_id

    _, back = load_hf(tmp_path)
    assert back is not None and back.chat_template == tok.chat_template
    assert back.encode("はしを渡る") == tok.encode("はしを渡る")


# --- what cannot be converted ---------------------------------------------------------------


def write_config(directory: Path, **config: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("config, match", [
    (dict(model_type="bert", vocab_size=V), "model_type 'bert' is not supported"),
    (dict(model_type="gemma3", vocab_size=V), "multimodal"),
    (dict(LLAMA_SHAPE, model_type="llama",
          rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope scaling 'llama3'"),
    (dict(LLAMA_SHAPE, model_type="llama",
          rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope scaling 'yarn'"),
    (dict(LLAMA_SHAPE, model_type="llama", hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="llama", vocab_size=V), "lacks the field"),
])
def test_unsupported_hf_configs(tmp_path: Path, config: dict[str, Any], match: str) -> None:
    with pytest.raises(UserError, match=match):
        load_hf(write_config(tmp_path, **config))


def test_bad_hf_directories(tmp_path: Path) -> None:
    d = write_config(tmp_path / "pickled", **LLAMA_SHAPE, model_type="llama")
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="never loads"):
        load_hf(d)

    d = tmp_path / "missing"
    hf_model("llama-gqa-untied").save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf(d)

    (d / "config.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        load_hf(d)


@pytest.mark.parametrize("overrides, match", [
    (dict(norm="rmsnorm", positions="learned"), "positions=learned"),
    (dict(bias=True, qkv_bias=False), "qkv_bias"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(sliding_window=4, global_every=2), "global_every"),
    (dict(sliding_window=4, rope_local_theta=1e3), "rope_local_theta"),
    (dict(norm="layernorm", positions="learned", mlp="gelu", bias=True), "n_kv_head"),
    (dict(mlp="geglu", qk_norm=True, post_norms=True, embed_scale=True, attn_scale=0.3),
     "query_pre_attn_scalar"),
])
def test_unexportable_models(tmp_path: Path, overrides: dict[str, Any], match: str) -> None:
    model = Transformer(preset("tiny", **overrides))
    with pytest.raises(UserError, match=match):
        save_hf(tmp_path / "out", model)
    assert not (tmp_path / "out" / "model.safetensors").exists()
