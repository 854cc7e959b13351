"""GGUF files (llama.cpp's format): import into `Transformer` and export from it.

A GGUF file is a header of typed key/value metadata (architecture, hyperparameters, the whole
tokenizer, the chat template) followed by tensors, each in its own storage type (F32, F16,
BF16 or a block quantisation such as Q4_K). Import turns the metadata into a `ModelConfig`,
dequantizes every tensor to floating point with `gguf.quants` and rebuilds the tokenizer as a
`tokenizers.Tokenizer`; export writes the same layout with `gguf.GGUFWriter`, so llama.cpp,
llama-cpp-python, Ollama and transformers open what kotonoha writes.

Architectures: `llama` (Llama 2/3, SmolLM2, Mistral), `qwen2` (biases on q/k/v) and `gemma3`.
Differences from our layout that are more than a rename:

- llama.cpp's `llama` rotates adjacent pairs of each head (GPT-J layout) where we rotate its two
  halves (HF layout), so its converter permuted the rows of Q and K; we undo that permutation on
  import and redo it on export. `qwen2` and `gemma3` use the half-split layout already.
- Gemma's norms multiply by (1 + w); llama.cpp's converter stored 1 + w, which is exactly the
  w our RMSNorm multiplies by, so Gemma norms are copied unchanged (the HF converter adds 1).
- Gemma 3 facts llama.cpp hard-codes rather than stores (every 6th layer global, RoPE base 10000
  on the sliding-window layers, the attention scale) are the defaults here too.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
)
from gguf import quants as gguf_quants
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from kotonoha.checkpoint import _atomic_target, build_model, check_output
from kotonoha.errors import UserError
from kotonoha.model import ModelConfig, Transformer
from kotonoha.tokenizer import Tokenizer

Q = GGMLQuantizationType
# Storage types we dequantize; gguf.quants implements these (and the rarer IQ types, which we
# refuse because no file we test uses them).
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
ARCHITECTURES = ("llama", "qwen2", "gemma3")
EXPORT_DTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
               "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
MAGIC = b"GGUF"

# ---------------------------------------------------------------------------------------------
# Reading the container
#
# Why not gguf.GGUFReader: it builds a numpy view for every element of every array, which takes
# 15-40 s on the 49k-262k-entry token lists of real models. The format is simple enough that a
# struct-based reader of the header is short; tensor payloads are still decoded by gguf.quants.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows first); GGUF lists dimensions the other way
    data: np.ndarray  # raw bytes (quantized) or values (F32/F16), memory-mapped

    def dequantize(self) -> np.ndarray:
        out = np.asarray(gguf_quants.dequantize(self.data, self.type), dtype=np.float32)
        if not out.flags.writeable:  # F32 comes back as a view of the read-only file mapping
            out = out.copy()
        return out.reshape(self.shape)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, source: Path) -> None:
        self.buf, self.pos, self.source = buf, 0, source

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise _Truncated
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos = end
                return arr.tolist()
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise UserError(f"{self.source} has a metadata array of unknown type {etype}; the "
                            "file is corrupt or from a newer GGUF version.")
        if vtype == 6:  # float32: the shortest decimal that round-trips (1e-05, not 9.99e-06)
            return float(str(np.float32(self.take("<f"))))
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        raise UserError(f"{self.source} has metadata of unknown type {vtype}; the file is corrupt "
                        "or from a newer GGUF version.")


class _Truncated(Exception):
    pass


class GGUFFile:
    """The metadata (`fields`, plain Python values) and tensors of one GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist.")
        with open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise UserError(f"{path} is truncated (shorter than a GGUF header); download or "
                                "copy it again.")
            if head != MAGIC:
                raise UserError(f"{path} is not a GGUF file (it starts with {head!r}, not the "
                                "magic number b'GGUF').")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = buf
        try:
            self._parse(_Cursor(buf, path))
        except _Truncated:
            raise UserError(f"{path} is truncated (it ends inside its header); download or copy "
                            "it again.") from None

    def _parse(self, cur: _Cursor) -> None:
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            big = " (it looks big-endian, which kotonoha does not read)" if version > 0xFFFF else ""
            raise UserError(f"{self.path} is GGUF version {version}{big}; kotonoha reads versions "
                            "2 and 3.")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.fields[key] = cur.value(cur.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = cur.pos + (-cur.pos) % align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in infos:
            self.tensors[name] = self._tensor(name, dims, type_id, start + offset)

    def _tensor(self, name: str, dims: list[int], type_id: int, offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise UserError(f"{self.path}: tensor '{name}' has storage type {type_id}, which this "
                            "version of the gguf package does not know.") from None
        shape = tuple(reversed(dims)) or (1,)
        block, type_size = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise UserError(f"{self.path}: tensor '{name}' has rows of {shape[-1]} values, not a "
                            f"multiple of the {qtype.name} block of {block}; the file is corrupt.")
        rows = math.prod(shape[:-1])
        row_bytes = shape[-1] // block * type_size
        if offset + rows * row_bytes > len(self._buf):
            raise UserError(f"{self.path} is truncated (tensor '{name}' runs past the end of the "
                            "file); download or copy it again.")
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=rows * row_bytes, offset=offset)
        if qtype == Q.F32:
            data = raw.view(np.float32).reshape(shape)
        elif qtype == Q.F16:
            data = raw.view(np.float16).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], row_bytes)
        return GGUFTensor(name, qtype, shape, data)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise UserError(f"{self.path} lacks the metadata key '{key}', which a "
                            f"{self.fields.get('general.architecture')} model needs.")
        return self.fields[key]


# ---------------------------------------------------------------------------------------------
# Config: GGUF metadata <-> ModelConfig


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{g.path}: architecture '{arch}' is not supported; kotonoha imports GGUF "
                        f"architectures {', '.join(ARCHITECTURES)}.")

    def key(name: str, default: Any = None) -> Any:
        full = f"{arch}.{name}"
        return g.require(full) if default is None else g.get(full, default)

    if int(g.get(f"{arch}.expert_count", 0) or 0) > 0:
        raise UserError(f"{g.path} is a mixture-of-experts model, which kotonoha does not run.")
    scaling = g.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in g.tensors:
        kind = scaling if scaling not in ("none", None) else "llama3 (rope_freqs)"
        raise UserError(f"{g.path} uses rope scaling '{kind}', which kotonoha does not implement "
                        "(only plain RoPE is supported).")
    if "token_embd.weight" not in g.tensors:
        raise UserError(f"{g.path} has no token_embd.weight tensor; it is not a language model.")
    vocab_size, d_model = g.tensors["token_embd.weight"].shape
    if int(key("embedding_length")) != d_model:
        raise UserError(f"{g.path}: embedding_length {key('embedding_length')} disagrees with "
                        f"token_embd.weight of width {d_model}; the file is corrupt.")
    n_head = int(key("attention.head_count"))
    n_kv = int(key("attention.head_count_kv", n_head))
    head_dim = int(key("attention.key_length", d_model // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise UserError(f"{g.path}: key_length and value_length differ, which kotonoha does not "
                        "support.")
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise UserError(f"{g.path} rotates only {key('rope.dimension_count')} of {head_dim} "
                        "dimensions per head (partial RoPE), which kotonoha does not implement.")
    common: dict[str, Any] = dict(
        name=str(g.get("general.name") or arch), vocab_size=vocab_size,
        context_length=int(key("context_length", 2048)), n_layer=int(key("block_count")),
        n_head=n_head, n_kv_head=n_kv, d_model=d_model, head_dim=head_dim,
        d_ff=int(key("feed_forward_length")), norm="rmsnorm",
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)), positions="rope",
        rope_theta=float(key("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in g.tensors,
    )
    if arch == "gemma3":
        return _gemma3_config(g, common, key)
    has = g.tensors.__contains__
    qkv_bias = has("blk.0.attn_q.bias")
    bias = has("blk.0.attn_output.bias")
    if bias and not (qkv_bias and has("blk.0.ffn_up.bias")):
        raise UserError(f"{g.path} has biases on some projections only (not q/k/v alone, not all "
                        "of them), which kotonoha does not support.")
    return ModelConfig(**common, mlp="swiglu", bias=bias, qkv_bias=qkv_bias)


def _gemma3_config(g: GGUFFile, common: dict[str, Any], key: Any) -> ModelConfig:
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if g.get(f"gemma3.{name}"):
            raise UserError(f"{g.path}: {name} is not supported by kotonoha.")
    n_layer, head_dim = common["n_layer"], common["head_dim"]
    window = int(key("attention.sliding_window", 0)) or None
    pattern = key("attention.sliding_window_pattern", 6)  # llama.cpp's fixed default
    global_every: int | None
    if isinstance(pattern, list):  # per layer: true = sliding window
        local = [bool(x) for x in pattern]
        global_every = next((k for k in range(1, n_layer + 1)
                             if all(loc == ((i + 1) % k != 0) for i, loc in enumerate(local))),
                            None)
        if global_every is None and not all(local):
            raise UserError(f"{g.path}: sliding_window_pattern {pattern} is not 'every k-th layer "
                            "global', the only layout kotonoha supports.")
    else:
        global_every = int(pattern) or None
    # llama.cpp: 1/sqrt(key_length), except Gemma 3 27B (62 layers) uses 1/sqrt(d_model/n_head).
    scalar = common["d_model"] // common["n_head"] if n_layer == 62 else head_dim
    scale = float(key("attention.scale", 0.0)) or scalar**-0.5
    return ModelConfig(
        **common, mlp="geglu", bias=False, qkv_bias=False, qk_norm=True, post_norms=True,
        embed_scale=True, attn_scale=scale, sliding_window=window, global_every=global_every,
        rope_local_theta=float(key("rope.freq_base_swa", 10000.0)),
    )


def gguf_arch(cfg: ModelConfig) -> str:
    """The GGUF architecture that represents `cfg` exactly (UserError naming the field if none)."""
    arch = {("rope", "swiglu"): "llama", ("rope", "geglu"): "gemma3"}.get((cfg.positions, cfg.mlp))
    if cfg.norm != "rmsnorm" or arch is None:
        raise UserError(f"Cannot export to GGUF: norm={cfg.norm}, positions={cfg.positions}, "
                        f"mlp={cfg.mlp} is neither Llama (rmsnorm, rope, swiglu) nor Gemma 3 "
                        "(rmsnorm, rope, geglu).")
    if arch == "llama" and cfg.qkv_bias and not cfg.bias:
        arch = "qwen2"

    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise UserError(f"Cannot export to GGUF {arch}: {field}={getattr(cfg, field)!r} {why}.")

    if arch != "gemma3":
        need(not cfg.qk_norm, "qk_norm", "needs the Gemma 3 layout")
        need(not cfg.post_norms, "post_norms", "needs the Gemma 3 layout")
        need(not cfg.embed_scale, "embed_scale", "needs the Gemma 3 layout")
        need(cfg.attn_scale is None or math.isclose(cfg.attn_scale, cfg.head_dim**-0.5),
             "attn_scale", "differs from 1/sqrt(head_dim), which llama.cpp assumes")
        need(cfg.bias == cfg.qkv_bias or arch == "qwen2", "qkv_bias",
             f"differs from bias={cfg.bias}; GGUF llama biases all projections or none")
        # llama.cpp's llama/qwen2 attend over the whole context: a window that can bite differs.
        need(cfg.sliding_window is None or cfg.sliding_window >= cfg.context_length,
             "sliding_window", "is shorter than the context, and llama.cpp's llama has no window")
    else:
        need(not cfg.bias and not cfg.qkv_bias, "bias", "but Gemma 3 has no biases")
        need(cfg.qk_norm and cfg.post_norms and cfg.embed_scale, "qk_norm",
             "(with post_norms and embed_scale) is required by Gemma 3")
        scalar = cfg.d_model // cfg.n_head if cfg.n_layer == 62 else cfg.head_dim
        need(cfg.attn_scale is None or math.isclose(cfg.attn_scale, scalar**-0.5), "attn_scale",
             f"differs from 1/sqrt({scalar}), which llama.cpp's gemma3 assumes")
        if cfg.sliding_window is not None:
            need(cfg.global_every == 6, "global_every", "is not 6, which llama.cpp's gemma3 assumes")
            need((cfg.rope_local_theta or cfg.rope_theta) == 10000.0, "rope_local_theta",
                 "is not 10000, which llama.cpp's gemma3 assumes for sliding-window layers")
    return arch


def _write_config(w: GGUFWriter, cfg: ModelConfig, arch: str) -> None:
    w.add_name(cfg.name)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gemma3" and cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern(int(cfg.global_every or 6))  # gguf_arch: it is 6
        w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)


# ---------------------------------------------------------------------------------------------
# Weights: names and the Q/K permutation

_MODULES = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn_post_norm": "post_attention_norm",
            "mlp_post_norm": "post_ffw_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
            "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm",
            "attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
_GLOBAL = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, i, rest = name.split(".", 2)
    module, _, param = rest.rpartition(".")
    return f"blk.{i}.{_MODULES[module]}.{param}"


def _rope_heads(name: str, cfg: ModelConfig) -> int | None:
    """Heads of a Q or K tensor (the unit of llama.cpp's permutation), else None."""
    if ".attn.q_proj." in name:
        return cfg.n_head
    if ".attn.k_proj." in name:
        return cfg.n_kv_head
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved-pair rows of Q/K -> our half-split rows (per head)."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `_unpermute`: what llama.cpp's convert_hf_to_gguf.py does to Q/K."""
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_to_kotonoha(g: GGUFFile, cfg: ModelConfig, arch: str,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        names = list(Transformer(cfg).state_dict())
    if cfg.tie_embeddings:
        names.remove("lm_head.weight")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        gname = gguf_name(name)
        t = g.tensors.get(gname)
        if t is None:
            raise UserError(f"{g.path} is missing tensor '{gname}' (for {name}); the weights do "
                            "not match the metadata.")
        if t.type not in SUPPORTED_TYPES:
            raise UserError(f"{g.path}: tensor '{gname}' is stored as {t.type.name}, which kotonoha "
                            f"does not dequantize (supported: "
                            f"{', '.join(q.name for q in SUPPORTED_TYPES)}).")
        w = torch.from_numpy(t.dequantize())
        heads = _rope_heads(name, cfg)
        if arch == "llama" and heads is not None:
            w = _unpermute(w, heads)
        # Cast tensor by tensor so a bf16 load never holds the whole model in fp32.
        out[name] = w.to(dtype).contiguous()
    used = {gguf_name(n) for n in names}
    extra = [k for k in g.tensors if k not in used]
    if extra:
        raise UserError(f"{g.path} has tensor '{extra[0]}' that a {arch} model with this metadata "
                        "does not use; kotonoha cannot run this variant.")
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer: GGUF vocabulary <-> tokenizers.Tokenizer

# llama.cpp's pre-tokenizer names -> the split regex its merges were learned with (None: GPT-2's).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_SPLITS: dict[str, str | None] = {
    "default": None, "gpt-2": None, "gpt2": None,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_DIGIT_PRE = ("smollm",)  # GPT-2's regex after splitting every digit on its own
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # SentencePiece's visible space


def _bpe_pre_tokenizer(pre: str, source: Path) -> Any:
    if pre in _DIGIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=True)])
    if pre not in _BPE_SPLITS:
        raise UserError(f"{source} uses the pre-tokenizer '{pre}', which kotonoha does not know; "
                        f"known: {', '.join([*_BPE_SPLITS, *_DIGIT_PRE])}.")
    split = _BPE_SPLITS[pre]
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


def _spm_merges(tokens: list[str], rank: list[float], skip: set[str]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary, which stores none: every split of
    a token into two tokens, best-ranked first (the rule transformers' converter uses)."""
    vocab = {t: i for i, t in enumerate(tokens) if t not in skip}
    found = []
    for i, (t, score) in enumerate(zip(tokens, rank)):
        if t not in vocab:
            continue
        # transformers' order: score, then the lengths of the two halves, then file order.
        found += [(-score, k, len(t) - k, i, k) for k in range(1, len(t))
                  if t[:k] in vocab and t[k:] in vocab]
    found.sort()
    return [(tokens[i][:k], tokens[i][k:]) for *_, i, k in found]


def tokenizer_from_gguf(g: GGUFFile) -> Tokenizer:
    """Rebuild the file's tokenizer as a `tokenizers.Tokenizer` (llama.cpp's rules)."""
    kind = g.get("tokenizer.ggml.model")
    tokens: list[str] = list(g.get("tokenizer.ggml.tokens") or [])
    if kind is None or not tokens:
        raise UserError(f"{g.path} carries no tokenizer (tokenizer.ggml.model/tokens); kotonoha "
                        "needs one to run the model.")
    types = list(g.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens))
    hf_json = g.get("tokenizer.huggingface.json")
    add_bos = bool(g.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    backend: Backend
    if isinstance(hf_json, str):  # written by kotonoha's export: the exact original tokenizer
        try:
            backend = Backend.from_str(hf_json)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(f"{g.path} has an unreadable tokenizer.huggingface.json ({e}).") from e
    elif kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges") or []]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        backend.pre_tokenizer = _bpe_pre_tokenizer(str(g.get("tokenizer.ggml.pre", "default")),
                                                   g.path)
        backend.decoder = decoders.ByteLevel()
    elif kind == "llama":
        backend = _spm_backend(g, tokens, types)
    else:
        raise UserError(f"{g.path} uses the '{kind}' tokenizer; kotonoha rebuilds 'gpt2' (byte-level "
                        "BPE) and 'llama' (SentencePiece BPE) tokenizers.")
    if not isinstance(hf_json, str):
        # Control tokens (<|im_end|>, <start_of_turn>) are special: matched whole, and never
        # produced from user text; user-defined ones (<table>, "\n\n") are matched whole.
        vocab = backend.get_vocab()
        added = [AddedToken(t, special=ty == TokenType.CONTROL, normalized=False)
                 for t, ty in zip(tokens, types)
                 if ty in (TokenType.CONTROL, TokenType.USER_DEFINED) and t in vocab]
        backend.add_tokens(added)

    def role(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = role("bos")
    if add_bos and bos is not None and not isinstance(hf_json, str):
        # What HF tokenizer.json files do, so an HF export of this model adds <bos> too.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return Tokenizer(backend, chat_template=g.get("tokenizer.chat_template"), bos_token=bos,
                     eos_token=role("eos"), pad_token=role("padding"), add_bos_token=add_bos)


def _spm_backend(g: GGUFFile, tokens: list[str], types: list[int]) -> Backend:
    """A SentencePiece BPE vocabulary as a `tokenizers` BPE with byte fallback."""
    arch = g.get("general.architecture")
    # llama.cpp stores Gemma's runs-of-spaces tokens with real spaces; the model sees them as ▁.
    tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    if arch == "gemma3":  # Gemma's scores do not follow its merge order; the token order does
        rank = [-float(i) for i in range(len(tokens))]
    else:
        rank = [float(s) for s in g.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
    # Control and byte tokens are never the result of a merge: user text cannot forge them.
    skip = {t for t, ty in zip(tokens, types) if ty in (TokenType.CONTROL, TokenType.BYTE,
                                                        TokenType.UNUSED)}
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = g.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab=vocab, merges=_spm_merges(tokens, rank, skip),
                                 unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(g.get("tokenizer.ggml.add_space_prefix", arch != "gemma3"))
    # llama.cpp prefixes a space to every text fragment (after each special token), as this does.
    norm = [normalizers.Prepend(_SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", _SPACE)])
    dec = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    return backend


def _components(node: Any) -> list[dict[str, Any]]:
    """A tokenizer.json normalizer/pre-tokenizer/decoder, flattened out of its Sequences."""
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders")
    if node.get("type") == "Sequence" and isinstance(inner, list):
        return [c for n in inner for c in _components(n)]
    return [node]


def _tokenizer_metadata(w: GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    """Write the tokenizer the way llama.cpp reads it (+ the exact tokenizer.json if needed)."""
    data = json.loads(tok.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"Cannot export a {model.get('type')} tokenizer to GGUF; kotonoha exports "
                        "BPE tokenizers (byte-level or SentencePiece-style).")
    pres, norms = _components(data.get("pre_tokenizer")), _components(data.get("normalizer"))
    byte_level = any(p.get("type") == "ByteLevel" for p in pres)
    n = tok.vocab_size
    if n > vocab_size:
        raise UserError(f"The tokenizer has {n} tokens but the model only {vocab_size} "
                        "embeddings; they do not belong together.")
    tokens = [tok.id_to_token(i) or f"[PAD{i}]" for i in range(n)]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]  # llama.cpp needs one per embedding
    added = {t.content: t.special for t in tok.backend.get_added_tokens_decoder().values()}
    types = []
    for i, t in enumerate(tokens):
        if i >= n or tok.id_to_token(i) is None:
            types.append(TokenType.UNUSED)
        elif t in added:
            types.append(TokenType.CONTROL if added[t] else TokenType.USER_DEFINED)
        elif not byte_level and _BYTE_TOKEN.fullmatch(t):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []]
    exact = True
    if byte_level:
        w.add_tokenizer_model("gpt2")
        pre = _pre_name(pres)
        exact = pre is not None
        # Our script-aware split has no llama.cpp name; GPT-2's regex is its closest relative.
        # Digits match (no merge joins two; ours splits them, GPT-2's keeps runs); only the bytes
        # of a character that is not one token can merge across a script boundary there (none
        # in the world's text at the demo's vocabulary; tests/test_gguf.py).
        w.add_tokenizer_pre(pre or "gpt-2")
        w.add_token_merges(merges)
    elif model.get("byte_fallback"):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        # SentencePiece ranks merges by the score of the merged token: first merge = best score.
        first: dict[str, int] = {}
        for r, m in enumerate(merges):
            first.setdefault(m.replace(" ", "", 1), r)
        w.add_token_scores([-float(first.get(t, len(merges))) if ty == TokenType.NORMAL
                            else -1000.0 for t, ty in zip(tokens, types)])
        w.add_add_space_prefix(any(x.get("type") == "Prepend" for x in norms)
                               or any(p.get("type") == "Metaspace"
                                      and p.get("prepend_scheme") != "never" for p in pres))
    else:
        raise UserError("Cannot export this tokenizer to GGUF: it is neither byte-level BPE nor "
                        "SentencePiece-style BPE with byte fallback.")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    for role, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if value is not None:
            getattr(w, f"add_{role}_token_id")(value)
    stops = [i for i in tok.stop_ids if i != tok.eos_id]
    if stops:
        w.add_eot_token_id(stops[0])
    w.add_add_bos_token(bool(tok.add_bos_token and tok.bos_id is not None))
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    if not exact:  # lets kotonoha (and transformers-style readers) restore the tokenizer exactly
        w.add_string("tokenizer.huggingface.json", tok.backend.to_str())


def _pre_name(pres: list[dict[str, Any]]) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, None if it has none."""
    kinds = [p.get("type") for p in pres]
    if kinds == ["ByteLevel"] and pres[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pres[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (pres[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


# ---------------------------------------------------------------------------------------------
# Public API


def load_gguf(path: str | Path, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """Import a GGUF file: (model in eval mode, tokenizer). Quantized weights are dequantized
    to `dtype` (default float32)."""
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    tokenizer = tokenizer_from_gguf(g)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{g.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                        f"only {cfg.vocab_size} embeddings; the file is inconsistent.")
    tensors = gguf_to_kotonoha(g, cfg, g.get("general.architecture"), dtype or torch.float32)
    model = build_model(cfg, tensors, source=g.path, device=device, dtype=dtype or torch.float32)
    return model, tokenizer


def save_gguf(path: str | Path, model: Transformer, tokenizer: Tokenizer | None, *,
              dtype: str = "f32") -> Path:
    """Export to a GGUF file that llama.cpp loads. `dtype`: f32, f16, bf16 or q8_0 for the
    matrices (norms stay f32, as llama.cpp expects); written atomically."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"GGUF export dtype '{dtype}' is not supported; choose one of "
                        f"{', '.join(EXPORT_DTYPES)}.")
    if tokenizer is None:
        raise UserError("GGUF files carry their tokenizer, and this model has none; pass one.")
    cfg = model.cfg
    arch = gguf_arch(cfg)  # refuse before writing anything
    path = check_output(path, "gguf")  # a file ending in .gguf, which loaders recognise
    qtype = EXPORT_DTYPES[dtype]
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # llama.cpp ties when output.weight is absent
    with _atomic_target(path) as tmp:
        w = GGUFWriter(tmp, arch)
        _write_config(w, cfg, arch)
        w.add_file_type(int(_FILE_TYPES[dtype]))
        w.add_quantization_version(GGML_QUANT_VERSION)
        _tokenizer_metadata(w, tokenizer, cfg.vocab_size)
        for name, t in state.items():
            heads = _rope_heads(name, cfg)
            if arch == "llama" and heads is not None:
                t = _permute(t, heads)
            arr = t.contiguous().numpy()
            kind = qtype if arr.ndim == 2 else Q.F32
            if kind == Q.Q8_0 and arr.shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
                kind = Q.F16  # rows must be whole 32-value blocks
            if kind == Q.F32:
                w.add_tensor(gguf_name(name), arr)
            elif kind == Q.F16:
                w.add_tensor(gguf_name(name), arr.astype(np.float16))
            else:
                w.add_tensor(gguf_name(name), gguf_quants.quantize(arr, kind), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
