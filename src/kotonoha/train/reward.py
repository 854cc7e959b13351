"""Reward model: the transformer with a scalar head, trained on preference pairs.

    kotonoha reward --config configs/reward-tiny.yaml [init_from=runs/sft data=pairs.jsonl]

The head reads the last layer's final-normed hidden state at the reply's last token (its
end-of-turn token), so the score sees the whole conversation. Training minimises the
Bradley-Terry loss -log σ(r_chosen - r_rejected - margin) (Ouyang et al. 2022; the margin term
is Llama 2's, per pair from the data plus `margin` from the config). Pairs marked
`"split": "test"` (the world's held-out entities) are never trained on; the run reports their
pairwise accuracy in metrics.jsonl and `reward_eval.json`.

A reward run directory is a model directory (the backbone, which `load_model` opens as a
language model) plus `reward_head.safetensors`; `load_reward_model` opens the pair, and
`RewardModel.score` is what RL calls.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kotonoha.checkpoint import (
    atomic_write_json,
    build_model,
    load_model,
    read_safetensors,
    save_model,
    save_safetensors_atomic,
)
from kotonoha.config import load_config
from kotonoha.data.chat import (
    PairData,
    collate_replies,
    encode_response,
    fit_context,
    pad_id,
    train_test_pairs,
)
from kotonoha.errors import UserError
from kotonoha.model import Transformer, flops_per_token
from kotonoha.tokenizer import Tokenizer
from kotonoha.train.loop import TrainConfig, Trainer, check_run_dir, init_distributed, module_main
from kotonoha.train.lora import LoRAConfig, apply_lora, merge_state_dict, parse_lora
from kotonoha.train.sft import (
    announce,
    context_for,
    load_chat_model,
    stage_main,
    steps_for,
)

HEAD_FILE = "reward_head.safetensors"
REWARD_INPUTS = ("ids", "last", "positions", "segments")  # of a `collate_replies` batch


class RewardModel(nn.Module):
    """A `Transformer` backbone plus Linear(d_model, 1) on the final-normed hidden state."""

    def __init__(self, backbone: Transformer, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        d = backbone.cfg.d_model
        w = backbone.embed.weight
        self.head = nn.Linear(d, 1, device=w.device, dtype=w.dtype)
        # A small random start (OpenAI's lm-human-preferences): rewards begin near 0.
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(d + 1))
        nn.init.zeros_(self.head.bias)
        self.tokenizer = tokenizer

    @property
    def blocks(self) -> nn.ModuleList:  # lets the trainer shard block by block under FSDP
        return self.backbone.blocks

    def forward(self, ids: torch.Tensor, last: torch.Tensor,
                positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (N,) read at `last` (N,), indices into ids.flatten() (a `collate_replies`
        batch: several sequences per row, told apart by `segments`)."""
        nothing = torch.zeros_like(ids, dtype=torch.bool)  # no logits: skip the output head
        out = self.backbone(ids, positions=positions, segments=segments,
                            output_hidden_states=True, select=nothing)
        h = self.backbone.norm(out.hidden_states[-1])
        return self.head(h.flatten(0, 1)[last]).squeeze(-1).float()

    @torch.no_grad()
    def score(self, prompts: Sequence[list[dict[str, Any]]], responses: Sequence[str],
              batch_size: int = 16) -> torch.Tensor:
        """Reward (float32, on the CPU) of each assistant `response` to its `prompt`
        (a list of chat messages), rendered with the chat template as in training."""
        tok = self._tok()
        ctx = self.backbone.cfg.context_length
        seqs = [fit_context(*encode_response(tok, p, r), ctx) for p, r in zip(prompts, responses)]
        return self._score(seqs, batch_size)

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """Rewards of already-tokenised conversations, read at each one's last token (pass
        prompt + reply ids ending with the end-of-turn token, as the engine returns them)."""
        ctx = self.backbone.cfg.context_length
        return self._score([(list(s)[-ctx:], [1] * min(len(s), ctx)) for s in seqs], batch_size)

    def _score(self, seqs: list[tuple[list[int], list[int]]], batch_size: int) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        out = []
        for i in range(0, len(seqs), batch_size):
            b = collate_replies(seqs[i:i + batch_size], pad_id(self._tok()),
                                self.backbone.cfg.context_length)
            out.append(self(*(b[k].to(device) for k in REWARD_INPUTS)).cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("RewardModel.score needs the model's tokenizer; load the model "
                             "with load_reward_model or pass tokenizer=.")
        return self.tokenizer

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        return save_reward_model(directory, self.state_dict(), self.backbone, self.tokenizer,
                                 extra)


def save_reward_model(directory: str | Path, state: dict[str, torch.Tensor],
                      backbone: Transformer, tokenizer: Tokenizer | None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write the backbone (a normal model directory) and the head from a RewardModel state."""
    d = Path(directory)
    body = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    save_safetensors_atomic(head, d / HEAD_FILE)  # before model.json, which marks completion
    save_model(d, build_model(backbone.cfg, body, source=d), tokenizer,
               extra={"reward_head": HEAD_FILE, **(extra or {})})
    return d


def load_reward_model(directory: str | Path, *, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> RewardModel:
    """Open a `kotonoha reward` run directory (eval mode, with its tokenizer)."""
    d = Path(directory)
    if not (d / HEAD_FILE).is_file():
        raise UserError(f"{d} is not a reward model (it has no {HEAD_FILE}); train one with "
                        "`kotonoha reward`.")
    backbone, tok = load_model(d, device=device, dtype=dtype)
    model = RewardModel(backbone, tok)
    head = read_safetensors(d / HEAD_FILE)
    if set(head) != {"weight", "bias"} or head["weight"].shape != model.head.weight.shape:
        raise UserError(f"{d / HEAD_FILE} does not fit the backbone in {d}; retrain the reward "
                        "model.")
    model.head.load_state_dict(head)
    return model.eval()


# --- training -------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    data: str | list[str] = "data/world/preferences.jsonl"  # preference pair JSONL file(s)
    val_data: str | list[str] | None = None  # None = the "test" pairs of `data`
    test_fraction: float = 0.1  # held out when `data` marks no pair as "test"
    init_from: str = "runs/sft"  # usually the SFT model
    out: str = "runs/reward"
    chat_template: str | None = None
    context_length: int | None = None
    margin: float = 0.0  # added to each pair's own "margin"
    epochs: float | None = None  # when set it decides train.steps
    # LoRA on the backbone (the head always trains); the saved reward model is merged.
    lora: str | LoRAConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)  # batch_size counts pairs

    def __post_init__(self) -> None:
        self.lora = parse_lora(self.lora)


def bt_loss(margin: float = 0.0) -> Callable[[nn.Module, dict[str, torch.Tensor]],
                                             tuple[torch.Tensor, dict[str, float]]]:
    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor],
                ) -> tuple[torch.Tensor, dict[str, float]]:
        r = model(*(batch[k] for k in REWARD_INPUTS))
        n = len(batch["margin"])
        diff = r[:n] - r[n:]
        loss = -F.logsigmoid(diff - batch["margin"] - margin).mean()
        return loss, {"accuracy": (diff > 0).float().mean().item(),
                      "reward_margin": diff.mean().item()}

    return loss_fn


@torch.no_grad()
def evaluate_pairs(model: nn.Module, data: PairData, micro: int, device: torch.device,
                   ) -> dict[str, Any]:
    """Held-out pairwise accuracy, BT loss and mean reward margin (overall and per kind)."""
    diffs = []
    for b in data.chunks(micro):
        r = model(*(b[k].to(device) for k in REWARD_INPUTS)).float().cpu()
        diffs.append(r[:len(b["margin"])] - r[len(b["margin"]):])
    diff = torch.cat(diffs)
    out: dict[str, Any] = {"val_accuracy": (diff > 0).float().mean().item(),
                           "val_loss": -F.logsigmoid(diff).mean().item(),
                           "val_reward_margin": diff.mean().item()}
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for pair, d in zip(data.pairs, diff.tolist()):
        by_kind[pair.kind or "-"].append(d > 0)
    out["by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    return out


def run_reward(cfg: RewardConfig, resume: bool = False) -> Path:
    """Train the reward model and return its run directory."""
    run_dir = Path(cfg.out)
    check_run_dir(run_dir, resume)
    train_pairs, test_pairs = train_test_pairs(cfg.data, cfg.val_data, cfg.test_fraction,
                                               cfg.train.seed, "a reward model")
    d = init_distributed(cfg.train.device)
    backbone, tok = load_chat_model(cfg.init_from, cfg.chat_template)
    ctx = context_for(backbone, cfg.context_length)
    lora = cfg.lora if isinstance(cfg.lora, LoRAConfig) else None
    if lora is not None:
        # Freezes the backbone's own weights, not the head's.
        apply_lora(backbone, lora, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # the same head on every rank
    model = RewardModel(backbone, tok).train()
    train = PairData(tok, train_pairs, ctx, seed=cfg.train.seed)
    test = PairData(tok, test_pairs, ctx) if test_pairs else None
    steps_for(cfg.train, cfg.epochs, len(train))
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // d.world_size)

    final: dict[str, Any] = {}  # the latest evaluation in full (per-kind accuracy too)

    def evaluate(m: nn.Module) -> dict[str, float]:
        assert test is not None
        final.update(evaluate_pairs(m, test, micro, d.device))
        return {k: v for k, v in final.items() if isinstance(v, float)}

    def export(state: dict[str, torch.Tensor], step: int) -> None:
        if lora is not None:
            state = merge_state_dict(state, lora)
        save_reward_model(run_dir, state, backbone, tok,
                          {"stage": "reward", "step": step, "init_from": cfg.init_from})

    trainer = Trainer(
        model, cfg.train, run_dir,
        get_batch=lambda step, rows: train.batch(step, cfg.train.batch_size, rows),
        loss_fn=bt_loss(cfg.margin), evaluate=evaluate if test else None, export=export,
        flops_per_token=flops_per_token(backbone.cfg, ctx, logits_share=0.0)["training"],
        dist_info=d, stage_config=cfg,
    )
    announce("reward", model, len(train), cfg.train, d)
    trainer.fit(resume=resume)
    if test is not None and not final:  # resumed after the last step: nothing evaluated yet
        trainer.run_eval()
    report: dict[str, Any] = {"train_pairs": len(train), "test_pairs": len(test_pairs), **final}
    if d.is_main:
        atomic_write_json(run_dir / "reward_eval.json", report)
        if test is not None and cfg.train.progress:
            print(f"reward: held-out pairwise accuracy {report['val_accuracy']:.1%} on "
                  f"{len(test)} pairs", file=sys.stderr)
    return run_dir


def reward_main(config_path: str | None, overrides: list[str], resume: bool) -> Path:
    """Entry point for `kotonoha reward --config X.yaml [key=value ...] [--resume]`."""
    return stage_main(run_reward, load_config(RewardConfig, config_path, overrides), resume)


if __name__ == "__main__":
    sys.exit(module_main(reward_main, "python -m kotonoha.train.reward"))
