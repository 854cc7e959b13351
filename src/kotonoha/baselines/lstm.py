"""An LSTM language model, trained on the same shards with the same trainer as the transformer.

The recurrent baseline: embedding -> `torch.nn.LSTM` -> linear head tied to the embedding (as
the transformer's is). It is trained on the same `context_length` windows, by the same
`Trainer` (AdamW, warmup + cosine, clipping), and scored with the same bits-per-byte code, so
the only difference left is the architecture. `match_transformer` sizes it to a transformer's
parameter count; training both on the same number of tokens then gives comparable compute,
since both spend ~6 FLOPs per parameter per token.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kotonoha.data.shards import ShardDataset, read_meta
from kotonoha.eval.bpb import bits_per_byte


@dataclass
class LSTMConfig:
    vocab_size: int = 512
    d_model: int = 128  # embedding width = hidden width, so the head can share the embedding
    n_layer: int = 2
    context_length: int = 128  # the training window (an LSTM itself has no limit)
    dropout: float = 0.0


class LSTMLM(nn.Module):
    """`model(idx) -> logits`, the same interface as the transformer's training path."""

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied, like the transformer presets
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.drop(self.embed(idx)))
        return self.head(self.norm(self.drop(h)))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied matrix once


def lstm_params(vocab_size: int, d: int, n_layer: int) -> int:
    """Parameters of `LSTMLM`: embedding (= head), 4 gates x (input + recurrent + 2 biases),
    final norm."""
    return vocab_size * d + n_layer * 4 * (2 * d * d + 2 * d) + 2 * d


def flops_per_token(cfg: LSTMConfig) -> dict[str, float]:
    """Forward/training FLOPs per token: 2 per matmul weight (gates and head), x3 to train."""
    matmul = cfg.n_layer * 8 * cfg.d_model**2 + cfg.d_model * cfg.vocab_size
    return {"forward": 2.0 * matmul, "training": 6.0 * matmul}


def match_params(target: int, vocab_size: int, n_layer: int = 2, multiple: int = 8) -> int:
    """The width (a multiple of `multiple`) whose `LSTMLM` has closest to `target` params."""
    # 8·L·d² + (V + 8L + 2)·d = target, solved for d.
    a, b = 8 * n_layer, vocab_size + 8 * n_layer + 2
    d = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    lo = max(multiple, multiple * math.floor(d / multiple))
    return min((lo, lo + multiple), key=lambda w: abs(lstm_params(vocab_size, w, n_layer) - target))


def match_transformer(model: nn.Module, n_layer: int = 2) -> LSTMConfig:
    """An LSTM with (nearly) the transformer's parameter count, vocabulary and window."""
    cfg = model.cfg  # type: ignore[attr-defined]
    n = sum(p.numel() for p in model.parameters())
    return LSTMConfig(vocab_size=cfg.vocab_size, d_model=match_params(n, cfg.vocab_size, n_layer),
                      n_layer=n_layer, context_length=cfg.context_length)


def seconds_per_step(cfg: LSTMConfig, batch_size: int, device: str = "cpu",
                     repeats: int = 2) -> float:
    """Measured time of one training step (forward, backward, AdamW) on random tokens.

    A recurrence runs its time steps one after another, so on a CPU an LSTM trains several
    times slower per token than a transformer of the same size; this lets a caller fit the
    number of steps to a time budget.
    """
    import time

    model = LSTMLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length), device=device)
    times = []
    for _ in range(repeats + 1):  # the first step pays one-off allocation costs
        t0 = time.perf_counter()
        logits = model(x)
        F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def train_lstm(data_dir: str | Path, cfg: LSTMConfig | None = None, *, steps: int = 300,
               batch_size: int = 16, lr: float = 3e-3, warmup_steps: int | None = None,
               seed: int = 0, device: str = "cpu", run_dir: str | Path | None = None,
               eval_tokens: int | None = None, progress: bool = True,
               ) -> tuple[LSTMLM, dict[str, Any]]:
    """Train an LSTM on the train split of `data_dir`; returns (model, results).

    Results: {"bpb", "loss", ... (val, see `eval.bpb`), "params", "flops" (training total),
    "time_s", "tokens", "train_loss" (first and last logged)}. `run_dir` keeps the
    trainer's files (metrics.jsonl, the final checkpoint); by default a temporary folder.
    """
    from kotonoha.train.loop import TrainConfig, Trainer, read_metrics

    meta = read_meta(data_dir)
    cfg = cfg or LSTMConfig(vocab_size=meta["vocab_size"])
    if cfg.vocab_size < meta["vocab_size"]:
        raise ValueError(f"LSTM vocab {cfg.vocab_size} < shard vocab {meta['vocab_size']}")
    torch.manual_seed(seed)
    model = LSTMLM(cfg)
    train = ShardDataset(data_dir, "train", cfg.context_length, seed=seed)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                       warmup_steps=warmup_steps if warmup_steps is not None else steps // 10,
                       device=device, dtype="fp32", parallel="none", seed=seed,
                       log_interval=max(1, steps // 20), eval_interval=0, progress=progress,
                       plot=False)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                ) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        logits = m(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)), {}

    fpt = flops_per_token(cfg)["training"]
    with tempfile.TemporaryDirectory(prefix="kotonoha-lstm-") as tmp:
        rd = Path(run_dir) if run_dir is not None else Path(tmp)
        trainer = Trainer(model, tcfg, rd, get_batch=lambda step, rows: train.batch(
            step, batch_size, rows), loss_fn=loss_fn, flops_per_token=fpt)
        trainer.fit()
        logged = [r["loss"] for r in read_metrics(rd / "metrics.jsonl") if "loss" in r]
    result = bits_per_byte(model, data_dir, max_tokens=eval_tokens, batch_size=batch_size)
    result.update(params=model.num_params(), flops=fpt * trainer.tokens_seen,
                  time_s=trainer.elapsed, train_tokens=trainer.tokens_seen,
                  train_loss=[logged[0], logged[-1]], config=asdict(cfg))
    return model.eval(), result
