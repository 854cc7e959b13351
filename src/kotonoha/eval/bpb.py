"""Bits per byte: a loss that does not depend on the tokenizer.

A model's mean next-token loss in nats/token depends on how long its tokens are: a tokenizer
with longer tokens has fewer, harder predictions. Dividing the total information by the
UTF-8 bytes of the text it encodes removes that, so an n-gram, an LSTM and transformers with
different tokenizers can be ranked on one scale:

    bits per byte = (sum over scored tokens of -ln p(token | context)) / ln 2 / bytes scored

`meta.json` of a shard folder records the tokens and the UTF-8 bytes of each split. When a
whole split is scored, "bytes scored" is exact; when only part of it is (`max_tokens`, or the
tail that does not fill a window), it is estimated as tokens scored x (split bytes /
split tokens). The end-of-document token after each document carries no bytes, yet predicting
it is part of modelling the text, so its loss counts in the numerator.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kotonoha.data.shards import read_meta
from kotonoha.errors import UserError

LN2 = math.log(2)


def nats_to_bpb(total_nats: float, n_bytes: float) -> float:
    """Total loss in nats over a text of `n_bytes` UTF-8 bytes -> bits per byte."""
    return total_nats / LN2 / n_bytes


def trained_context(model_path: str | Path) -> int | None:
    """The window a run trained on (its config.yaml's `context_length`), if it says.

    It can be shorter than the model's context, and positions never trained on would make
    the score worse than the model is where it was trained.
    """
    import yaml

    path = Path(model_path)
    for d in (path, path.parent):
        cfg = d / "config.yaml"
        if cfg.is_file():
            try:
                value = yaml.safe_load(cfg.read_text(encoding="utf-8")).get("context_length")
            except (yaml.YAMLError, AttributeError):
                return None
            return int(value) if isinstance(value, int) and value > 0 else None
    return None


def _context_length(model: nn.Module, context_length: int | None) -> int:
    if context_length is not None:
        return context_length
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "context_length"):
        raise ValueError("The model has no cfg.context_length; pass context_length=.")
    return int(cfg.context_length)


def split_tokens(data_dir: str | Path, split: str) -> tuple[np.ndarray, float]:
    """The token ids of a split (memory-mapped) and its UTF-8 bytes per token."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise UserError(f"{data_dir} has no '{split}' split.")
    info = meta["splits"][split]
    if not info["tokens"]:
        raise UserError(f"The {split} split of {data_dir} is empty; prepare it with a "
                        "validation fraction above 0.")
    tokens = np.memmap(Path(data_dir) / info["file"], dtype=np.dtype(meta["dtype"]), mode="r")
    return tokens, info["bytes"] / info["tokens"]


@torch.no_grad()
def bits_per_byte_tokens(model: nn.Module, tokens: np.ndarray, bytes_per_token: float, *,
                         context_length: int, max_tokens: int | None = None,
                         batch_size: int = 8, device: torch.device | str | None = None,
                         ) -> dict[str, Any]:
    """Bits per byte of `model` (`model(idx) -> logits`) on a token stream.

    The stream is cut into non-overlapping windows of `context_length` predictions from its
    start (like nanoGPT's evaluation), so every call and every model with the same context
    scores the same tokens; the tail that does not fill a window is left out.
    `max_tokens=None` scores the whole stream.
    """
    if device is None:
        device = next(model.parameters()).device
    T = context_length
    n_avail = len(tokens) - 1
    if n_avail < 1:
        raise UserError("Bits per byte needs at least two tokens of text.")
    if n_avail < T:
        T = n_avail  # a split shorter than one window: score it all as one shorter window
    limit = n_avail if max_tokens is None else min(n_avail, max_tokens)
    n_windows = max(1, limit // T)
    was_training = model.training
    model.eval()
    total_nats, n_tokens = 0.0, 0
    try:
        for first in range(0, n_windows, batch_size):
            rows = range(first, min(first + batch_size, n_windows))
            data = torch.from_numpy(np.stack([np.asarray(tokens[i * T:(i + 1) * T + 1],
                                                         dtype=np.int64) for i in rows]))
            x, y = data[:, :-1].to(device), data[:, 1:].to(device)
            logits = model(x).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                   reduction="sum")
            total_nats += float(loss)
            n_tokens += y.numel()
    finally:
        model.train(was_training)
    n_bytes = n_tokens * bytes_per_token
    return {
        "bpb": nats_to_bpb(total_nats, n_bytes),
        "loss": total_nats / n_tokens,  # nats/token: depends on the tokenizer
        "tokens": n_tokens,
        "bytes": n_bytes,
        "bytes_per_token": bytes_per_token,
    }


def bits_per_byte(model: nn.Module, data_dir: str | Path, split: str = "val", *,
                  max_tokens: int | None = None, batch_size: int = 8,
                  context_length: int | None = None,
                  device: torch.device | str | None = None) -> dict[str, Any]:
    """Bits per byte of `model` on `split` of the shard folder `data_dir` (see module doc).

    `context_length` defaults to the model's own (`model.cfg.context_length`). Returns
    {"split", "bpb", "loss" (nats/token), "tokens", "bytes", "bytes_per_token"}.
    """
    tokens, bytes_per_token = split_tokens(data_dir, split)
    result = bits_per_byte_tokens(model, tokens, bytes_per_token,
                                  context_length=_context_length(model, context_length),
                                  max_tokens=max_tokens, batch_size=batch_size, device=device)
    return {"split": split, **result}
