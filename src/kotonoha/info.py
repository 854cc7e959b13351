"""`kotonoha model-info`: size, compute and memory of a model, without allocating it."""

from __future__ import annotations

from pathlib import Path

import torch

from kotonoha.errors import UserError
from kotonoha.model import PRESETS, ModelConfig, Transformer, flops_per_token, preset

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "int8 (q8_0)": 34 / 32, "int4 (q4_0)": 18 / 32}


def model_config_from_spec(spec: str) -> ModelConfig:
    """A preset name, a kotonoha model/run directory or a Hugging Face directory."""
    path = Path(spec)
    if path.is_dir() and (path / "model.json").is_file():
        from kotonoha.checkpoint import read_model_config

        return read_model_config(path)
    if path.is_dir() and (path / "config.json").is_file():
        from kotonoha.checkpoint import read_json
        from kotonoha.convert.hf import config_from_hf

        where = path / "config.json"
        return config_from_hf(read_json(where, "describing this model"), where=str(where))
    if spec in PRESETS:
        return preset(spec)
    if path.exists():
        raise UserError(f"{spec} holds no model (expected model.json or config.json).")
    raise UserError(f"'{spec}' is neither a model directory nor a preset ({', '.join(PRESETS)}).")


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, without embeddings), counted on the meta device: no memory is allocated."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return model.num_params(), model.num_params(exclude_embeddings=True)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def human_bytes(n: float) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per_value: float) -> float:
    """Keys and values for every layer, one sequence of `context` tokens."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * context * bytes_per_value


def describe(cfg: ModelConfig, context: int | None = None) -> str:
    context = cfg.context_length if context is None else context
    if context <= 0:
        raise UserError("--context must be a positive number of tokens.")
    total, non_embed = count_params(cfg)
    flops = flops_per_token(cfg, context)
    arch = (f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads "
            f"({cfg.n_kv_head} kv), head_dim {cfg.head_dim}, d_ff {cfg.d_ff}, {cfg.mlp}, "
            f"{cfg.norm}, {cfg.positions} positions, vocab {cfg.vocab_size}")
    lines = [
        f"model: {cfg.name}",
        f"architecture: {arch}",
        f"parameters: {total:,} ({human(total)}), without embeddings {non_embed:,}",
        f"FLOPs per token at context {context}: inference {human(flops['forward'], 'FLOP')}, "
        f"training {human(flops['training'], 'FLOP')}",
        "weight memory:",
    ]
    for name, b in BYTES_PER_PARAM.items():
        lines.append(f"  {name:<12} {human_bytes(total * b)}")
    lines.append(f"KV cache for one sequence of {context} tokens:")
    for name in ("float32", "bfloat16"):
        lines.append(f"  {name:<12} {human_bytes(kv_cache_bytes(cfg, context, BYTES_PER_PARAM[name]))}")
    return "\n".join(lines)
