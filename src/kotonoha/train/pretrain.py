"""Pretraining: next-token prediction on prepared shards, through the one trainer core.

    kotonoha data prepare --source shakespeare --tokenizer runs/tok --out data/shakespeare
    kotonoha pretrain --config configs/shakespeare.yaml [train.lr=1e-3 ...] [--resume]
    torchrun --nproc_per_node=2 -m kotonoha.train.pretrain --config ... train.parallel=fsdp

The model comes from a preset plus overrides (`preset: demo`, `model: {n_layer: 6}`), or from
an existing model directory (`init_from: runs/base`) for continued pretraining. The run
directory gets `config.yaml` with the fully resolved model, so `--config run/config.yaml`
reproduces the run even if presets change later.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kotonoha.checkpoint import atomic_write_text, build_model, load_model, save_model
from kotonoha.config import load_config
from kotonoha.data.shards import TOKENIZER_SUBDIR, ShardDataset, read_meta, tokenizer_hash
from kotonoha.errors import UserError
from kotonoha.model import Transformer, flops_per_token, preset
from kotonoha.tokenizer import Tokenizer
from kotonoha.train.loop import (
    Dist,
    TrainConfig,
    Trainer,
    check_run_dir,
    init_distributed,
    module_main,
    stage_main,
)


@dataclass
class PretrainConfig:
    data: str = "data/world"  # a folder written by `kotonoha data prepare`
    out: str = "runs/pretrain"  # the run directory
    preset: str = "demo"  # model preset (kotonoha.model.PRESETS)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides of the preset
    init_from: str | None = None  # continue pretraining this model instead of a new one
    tokenizer: str | None = None  # None = the tokenizer the shards were prepared with
    context_length: int | None = None  # training window; None = the model's context
    tokens: int | None = None  # token budget; when set it decides train.steps
    # After training, continue each prompt and write the texts to samples.txt.
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    train: TrainConfig = field(default_factory=TrainConfig)


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy (nats/token); the objective of pretraining."""
    x, y = batch
    return model(x, targets=y, reduction="mean"), {}


def make_evaluate(val: ShardDataset, cfg: TrainConfig, d: Dist,
                  ) -> Callable[[nn.Module], dict[str, float]]:
    """Validation loss and bits per byte on the same fixed windows every time."""
    n = min(val.n_windows, max(1, cfg.eval_tokens // val.T))
    n = max(d.world_size, n - n % d.world_size)  # equal work per rank (FSDP needs lockstep)
    mine = list(range(d.rank, n, d.world_size))
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // d.world_size)

    def evaluate(model: nn.Module) -> dict[str, float]:
        total = torch.zeros((), dtype=torch.float64, device=d.device)
        count = 0
        for i in range(0, len(mine), micro):
            x, y = (t.to(d.device) for t in val.windows([w % val.n_windows
                                                         for w in mine[i:i + micro]]))
            total += model(x, targets=y, reduction="sum").double()
            count += y.numel()
        loss_sum, tokens = d.all_sum([total.item(), float(count)])
        loss = loss_sum / tokens
        # Nats per token -> bits per UTF-8 byte: independent of the tokenizer's granularity.
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / val.bytes_per_token}

    return evaluate


def _build_model(cfg: PretrainConfig, tokenizer: Tokenizer, data_dir: Path) -> Transformer:
    vocab_size = tokenizer.vocab_size
    if cfg.init_from:
        if cfg.model:
            raise UserError("Model overrides cannot be combined with init_from; the model's "
                            "shape comes from the checkpoint.")
        model, tok = load_model(cfg.init_from, dtype=torch.float32)
        if tok is not None and tok.backend.get_vocab() != tokenizer.backend.get_vocab():
            raise UserError(f"{cfg.init_from} uses a different tokenizer than {data_dir}; "
                            "prepare the data with the model's tokenizer "
                            f"(--tokenizer {cfg.init_from}).")
        if model.cfg.vocab_size < vocab_size:
            raise UserError(f"{cfg.init_from} has vocab_size {model.cfg.vocab_size}, smaller than "
                            f"the data's tokenizer ({vocab_size}); prepare the data with the "
                            "model's own tokenizer.")
        return model.train()
    overrides = dict(cfg.model)
    overrides.setdefault("vocab_size", vocab_size)
    mcfg = preset(cfg.preset, **overrides)
    if mcfg.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                        f"{vocab_size} tokens in {data_dir}.")
    torch.manual_seed(cfg.train.seed)  # same seed, same initial weights, on every rank
    return Transformer(mcfg)


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    """Train and return the run directory (model files, metrics.jsonl, loss.png, ...)."""
    data_dir, run_dir = Path(cfg.data), Path(cfg.out)
    check_run_dir(run_dir, resume)
    meta = read_meta(data_dir)
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else data_dir / TOKENIZER_SUBDIR
    if cfg.tokenizer and tokenizer_hash(tok_dir) != meta["tokenizer_hash"]:
        raise UserError(f"Tokenizer {tok_dir} is not the one {data_dir} was prepared with; "
                        "re-run `kotonoha data prepare` with it or drop the tokenizer setting.")
    tokenizer = Tokenizer.load(tok_dir)
    d = init_distributed(cfg.train.device)
    model = _build_model(cfg, tokenizer, data_dir)
    mcfg = model.cfg
    ctx = cfg.context_length or mcfg.context_length
    if ctx > mcfg.context_length:
        raise UserError(f"context_length={ctx} is longer than the model's {mcfg.context_length}.")
    if cfg.tokens:
        cfg.train.steps = max(1, math.ceil(cfg.tokens / (cfg.train.batch_size * ctx)))

    train = ShardDataset(data_dir, "train", ctx, seed=cfg.train.seed)
    val = ShardDataset(data_dir, "val", ctx, seed=cfg.train.seed)
    # config.yaml (the trainer writes it) holds the fully resolved shape (the preset's name is
    # in `preset`), unless it comes from init_from's checkpoint.
    shape = {k: v for k, v in mcfg.to_dict().items() if k != "name"}
    resolved = PretrainConfig(**{**cfg.__dict__, "model": {} if cfg.init_from else shape})

    def export(state: dict[str, torch.Tensor], step: int) -> None:
        save_model(run_dir, build_model(mcfg, state, source=run_dir), tokenizer,
                   extra={"step": step, "stage": "pretrain", "data": str(data_dir)})

    trainer = Trainer(
        model, cfg.train, run_dir,
        get_batch=lambda step, rows: train.batch(step, cfg.train.batch_size, rows),
        loss_fn=lm_loss, evaluate=make_evaluate(val, cfg.train, d), export=export,
        flops_per_token=flops_per_token(mcfg, ctx)["training"],
        tokens_per_step=cfg.train.batch_size * ctx, dist_info=d, stage_config=resolved,
    )
    if d.is_main and cfg.train.progress:
        n = sum(p.numel() for p in model.parameters())
        print(f"pretrain: {n / 1e6:.2f}M parameters, {cfg.train.steps} steps x "
              f"{cfg.train.batch_size} x {ctx} tokens on {d.device}"
              + (f" x {d.world_size} ranks ({cfg.train.parallel})" if d.world_size > 1 else ""),
              file=sys.stderr)
    trainer.fit(resume=resume)
    if d.is_main and cfg.sample_prompts:
        write_samples(run_dir, cfg)
    return run_dir


def write_samples(run_dir: Path, cfg: PretrainConfig) -> Path:
    """Continue each of `cfg.sample_prompts` with the saved model (as any consumer loads it)."""
    from kotonoha.engine import Engine
    from kotonoha.sampling import SamplingParams

    model, tok = load_model(run_dir)
    assert tok is not None
    engine = Engine(model, tok, max_batch_size=len(cfg.sample_prompts))
    params = SamplingParams(temperature=cfg.sample_temperature, max_tokens=cfg.sample_tokens,
                            seed=cfg.train.seed)
    outs = engine.generate([tok.encode(p) for p in cfg.sample_prompts], params)
    text = "\n\n---\n\n".join(p + o.text for p, o in zip(cfg.sample_prompts, outs)) + "\n"
    atomic_write_text(run_dir / "samples.txt", text)
    if cfg.train.progress:
        print(text, file=sys.stderr)
    return run_dir / "samples.txt"


def pretrain_main(config_path: str | None, overrides: list[str], resume: bool) -> Path:
    """Entry point for `kotonoha pretrain --config X.yaml [key=value ...] [--resume]`."""
    cfg = load_config(PretrainConfig, config_path, overrides)
    return stage_main(run_pretrain, cfg, resume)


if __name__ == "__main__":
    sys.exit(module_main(pretrain_main, "python -m kotonoha.train.pretrain"))
