"""Supervised fine-tuning: next-token loss on the assistant's tokens of chat conversations.

    kotonoha sft --config configs/sft-tiny.yaml [init_from=runs/base lora=r=16,alpha=32 ...]

The starting model is anything `load_model` opens (a pretrain run, a Hugging Face directory,
a .gguf file) or a packaged model's name. Conversations are rendered with the model's chat template, or ChatML when a base
model has none (its vocabulary must have the ChatML tokens; otherwise pass `chat_template=`).
The run directory is a normal model directory whose tokenizer carries the template, so
`kotonoha chat --model RUN` works on it. With `lora`, only low-rank adapters train; the run
directory then also holds `adapter.safetensors` + `adapter.json`, and the merged model unless
`merge_lora: false`.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kotonoha.checkpoint import build_model, load_model, save_model
from kotonoha.config import load_config
from kotonoha.data.chat import (
    SFTData,
    conversation_kinds,
    ensure_chat_template,
    load_conversations,
    repeat_by_kind,
    split_conversations,
)
from kotonoha.errors import UserError
from kotonoha.model import Transformer, flops_per_token
from kotonoha.models import resolve
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
from kotonoha.train.lora import LoRAConfig, apply_lora, merge_state_dict, parse_lora, save_adapter


@dataclass
class SFTConfig:
    data: str | list[str] = "data/world/sft.jsonl"  # JSONL conversation file(s)
    val_data: str | list[str] | None = None  # None = hold out val_fraction of `data`
    val_fraction: float = 0.05
    init_from: str = "runs/pretrain"  # a run/model directory or a .gguf file
    out: str = "runs/sft"
    chat_template: str | None = None  # Jinja text or a .jinja file; None = the model's/ChatML
    context_length: int | None = None  # longer conversations are cut; None = the model's
    # Glue conversations into examples of up to a context each (they see each other); batches
    # are padding-free either way, so this only changes how many fit in one step.
    packing: bool = False
    epochs: float | None = None  # when set it decides train.steps
    # Replay: pretraining documents (any `data prepare` source) mixed into the training set,
    # `replay_fraction` x the number of conversations, with loss on all their tokens. Without
    # it, fine-tuning on conversations about some entities erodes what the model knew about
    # the others (the world demo: held-out cloze 96% -> 76%).
    replay_data: str | list[str] | None = None
    replay_fraction: float = 0.0
    # Oversampling by the rows' "kind" field, e.g. {false_premise: 3}: each training
    # conversation of that kind counts 3 times (the world's kinds; see docs/WORLD.md).
    kind_weights: dict[str, float] = field(default_factory=dict)
    # NEFTune: uniform noise of +-alpha/sqrt(width * d_model) added to the token embeddings
    # while training (never when evaluating), so SFT cannot learn replies by heart as easily.
    neftune_alpha: float = 0.0
    lora: str | LoRAConfig | None = None  # e.g. "r=16,alpha=32"; None = full fine-tuning
    merge_lora: bool = True  # also write the merged model (what chat and later stages load)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.lora = parse_lora(self.lora)
        if self.neftune_alpha < 0:
            raise UserError(f"neftune_alpha must be >= 0, got {self.neftune_alpha}.")
        if self.replay_fraction < 0:
            raise UserError(f"replay_fraction must be >= 0, got {self.replay_fraction}.")
        if not isinstance(self.kind_weights, dict) or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and w >= 0
                for w in self.kind_weights.values()):
            raise UserError("kind_weights must map conversation kinds to numbers >= 0, e.g. "
                            "kind_weights.false_premise=3.")


# --- pieces the reward and DPO stages share ------------------------------------------------


def load_chat_model(init_from: str, chat_template: str | None,
                    ) -> tuple[Transformer, Tokenizer]:
    """The starting model in fp32 (the trainer autocasts) and its tokenizer, with a template.
    `init_from` is a model/run directory, a Hugging Face directory, a .gguf file or the name
    of a packaged model (`smollm2`)."""
    model, tok = load_model(resolve(init_from), dtype=torch.float32)
    if tok is None:
        raise UserError(f"{init_from} has no tokenizer (tokenizer.json); post-training needs "
                        "the model's tokenizer next to its weights.")
    ensure_chat_template(tok, chat_template, init_from)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"The tokenizer of {init_from} has {tok.vocab_size} tokens but the "
                        f"model only {model.cfg.vocab_size}; they do not belong together.")
    return model.train(), tok


def context_for(model: Transformer, context_length: int | None) -> int:
    ctx = context_length or model.cfg.context_length
    if ctx > model.cfg.context_length:
        raise UserError(f"context_length={ctx} is longer than the model's "
                        f"{model.cfg.context_length}.")
    return ctx


def steps_for(train: TrainConfig, epochs: float | None, n_examples: int) -> None:
    if epochs:
        train.steps = max(1, math.ceil(epochs * n_examples / train.batch_size))


def make_export(run_dir: Path, model: Transformer, tok: Tokenizer, lora: LoRAConfig | None,
                merge: bool, extra: dict[str, Any]) -> Callable[[dict[str, torch.Tensor], int],
                                                                None]:
    """The trainer's export hook: the model files (and the adapter, for LoRA runs)."""
    mcfg = model.cfg

    def export(state: dict[str, torch.Tensor], step: int) -> None:
        info = {**extra, "step": step}
        if lora is not None:
            save_adapter(run_dir, state, lora, base=extra.get("init_from"), extra=info)
            if not merge:
                tok.save(run_dir)
                return
            state = merge_state_dict(state, lora)
        save_model(run_dir, build_model(mcfg, state, source=run_dir), tok, extra=info)

    return export


def announce(stage: str, model: nn.Module, n_examples: int, train: TrainConfig, d: Dist) -> None:
    if d.is_main and train.progress:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        share = f" ({trainable / 1e6:.3f}M trainable)" if trainable != total else ""
        print(f"{stage}: {total / 1e6:.2f}M parameters{share}, {n_examples} examples, "
              f"{train.steps} steps x {train.batch_size} on {d.device}", file=sys.stderr)


# --- the objective --------------------------------------------------------------------------


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor],
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on masked (assistant) tokens, summed and scaled by the batch's `scale`.

    A sum, never a mean over zero tokens: a batch with nothing to learn gives loss 0 and
    zero gradients instead of NaN.
    """
    return masked_ce(model, batch).sum() * batch["scale"], {}


def masked_ce(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask-weighted cross-entropy of the masked tokens of a (possibly padding-free) batch of
    `SFTData`. The output head runs only where the mask is set: 1.11x on an SFT step of the
    demo, where 69% of the tokens are in the loss (bench/sft.py)."""
    keep = batch["mask"] != 0
    ce = model(batch["x"], positions=batch.get("positions"), segments=batch.get("segments"),
               select=keep, targets=batch["y"][keep])
    return ce * batch["mask"][keep]


def masked_lm_eval(val: SFTData, micro: int, device: torch.device,
                   ) -> Callable[[nn.Module], dict[str, float]]:
    """Mean loss per assistant token on the held-out conversations. Every rank evaluates all
    of them (they are few), which keeps FSDP ranks in lockstep without any bookkeeping."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        total = count = 0.0
        for i in range(0, len(val), micro):
            b = val.collate(list(range(i, min(len(val), i + micro))))
            b = {k: v.to(device) for k, v in b.items()}
            total += float(masked_ce(model, b).sum())
            count += float(b["mask"].sum())
        # No assistant token to score: no val_loss at all, rather than a perfect-looking 0.
        return {"val_loss": total / count} if count else {}

    return evaluate


def add_embedding_noise(model: nn.Module, alpha: float) -> None:
    """NEFTune (Jain et al., 2023): while the model trains, add uniform noise in
    +-alpha / sqrt(width * d_model) to its token embeddings, with width the batch's row length.
    A hook on the embedding, so the model file and its forward stay as they are."""

    def noisy(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None  # evaluation and export see the plain embeddings
        bound = alpha / math.sqrt(out.size(-2) * out.size(-1))
        return out + torch.empty_like(out).uniform_(-bound, bound)

    model.embed.register_forward_hook(noisy)


def replay_documents(cfg: SFTConfig, n_conversations: int) -> list[str]:
    """A seeded sample of `replay_fraction * n_conversations` documents of `replay_data`."""
    if not cfg.replay_fraction:
        return []
    from kotonoha.data.sources import iter_documents

    if not cfg.replay_data:
        raise UserError("replay_fraction > 0 needs replay_data (pretraining text, e.g. "
                        "data/world/pretrain.jsonl).")
    docs = list(iter_documents(cfg.replay_data))
    n = min(len(docs), round(cfg.replay_fraction * n_conversations))
    return random.Random(cfg.train.seed).sample(docs, n)


def run_sft(cfg: SFTConfig, resume: bool = False) -> Path:
    """Fine-tune and return the run directory."""
    run_dir = Path(cfg.out)
    check_run_dir(run_dir, resume)
    convs = load_conversations(cfg.data)
    if cfg.val_data:
        train_convs, val_convs = convs, load_conversations(cfg.val_data)
    else:
        train_convs, val_convs = split_conversations(convs, cfg.val_fraction, cfg.train.seed)
    if cfg.kind_weights:  # after the split, so no copy of a validation row is trained on
        kinds = conversation_kinds(cfg.data)
        missing = sorted(set(cfg.kind_weights) - set(kinds))
        if missing:
            raise UserError(f"kind_weights names {', '.join(missing)}, which no conversation "
                            f"in {cfg.data} has (kinds: "
                            f"{', '.join(sorted({k for k in kinds if k})) or 'none'}).")
        kind_of = {id(c): k for c, k in zip(convs, kinds)}
        train_convs = repeat_by_kind(train_convs, [kind_of[id(c)] for c in train_convs],
                                     cfg.kind_weights, cfg.train.seed)
    d = init_distributed(cfg.train.device)
    model, tok = load_chat_model(cfg.init_from, cfg.chat_template)
    ctx = context_for(model, cfg.context_length)
    replay = replay_documents(cfg, len(train_convs))
    train = SFTData(tok, train_convs, ctx, pack=cfg.packing, seed=cfg.train.seed,
                    replay=replay)
    val = SFTData(tok, val_convs, ctx, seed=cfg.train.seed) if val_convs else None
    steps_for(cfg.train, cfg.epochs, len(train))
    lora = cfg.lora if isinstance(cfg.lora, LoRAConfig) else None
    if lora is not None:
        apply_lora(model, lora, seed=cfg.train.seed)
    if cfg.neftune_alpha:
        add_embedding_noise(model, cfg.neftune_alpha)
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // d.world_size)
    trainer = Trainer(
        model, cfg.train, run_dir,
        get_batch=lambda step, rows: train.batch(step, cfg.train.batch_size, rows),
        loss_fn=sft_loss,
        evaluate=masked_lm_eval(val, micro, d.device) if val else None,
        export=make_export(run_dir, model, tok, lora, cfg.merge_lora,
                           {"stage": "sft", "init_from": cfg.init_from}),
        flops_per_token=flops_per_token(model.cfg, ctx, train.logits_share())["training"],
        dist_info=d, stage_config=cfg,
    )
    announce("sft", model, len(train), cfg.train, d)
    trainer.fit(resume=resume)
    return run_dir


# --- entry points ---------------------------------------------------------------------------


def sft_main(config_path: str | None, overrides: list[str], resume: bool) -> Path:
    """Entry point for `kotonoha sft --config X.yaml [key=value ...] [--resume]`."""
    return stage_main(run_sft, load_config(SFTConfig, config_path, overrides), resume)


if __name__ == "__main__":
    sys.exit(module_main(sft_main, "python -m kotonoha.train.sft"))
