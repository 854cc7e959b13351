"""Direct preference optimisation (Rafailov et al. 2023): preferences without a reward model.

    kotonoha dpo --config configs/dpo-tiny.yaml [init_from=runs/sft beta=0.1 lora=r=16 ...]

The policy starts as a copy of the reference (the starting model, frozen). With
log-probabilities summed over each reply's tokens, the implicit reward of a reply is
β·(log π(y|x) − log π_ref(y|x)) and the loss is −log σ(reward_chosen − reward_rejected): raise
the chosen reply's likelihood relative to the rejected one's, measured against the reference so
the policy cannot drift far for free. Same data as `kotonoha reward`; "test" pairs are held
out and `dpo_eval.json` compares them before and after. With `lora`, the reference is the same
network with its adapters switched off, so no second copy of the model is kept.

`mistakes: FILE` trains on the starting model's own mistakes instead of `data`'s train pairs:
it answers every conversation of FILE that carries a `check` (the world's `practice.jsonl`:
questions about entities that neither SFT nor the eval ever names) greedily through the shared
engine; each reply the world's rule-based checker rejects becomes a pair, with the
conversation's own reply as the chosen one (`mistakes.jsonl` in the run directory). With
`mistake_samples: N` it also samples N replies per conversation and adds each distinct wrong
one: the mistakes the model makes often without making them greedily. This is the
checker's one use in DPO, as `reward: checker` is RL's: it picks which pairs to train on,
about entities the eval never uses. `data` still supplies the held-out "test" pairs.
`mistakes: world` is short for `WORLD/practice.jsonl`, with WORLD the `world` setting.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kotonoha.checkpoint import atomic_write_json, atomic_write_text
from kotonoha.config import load_config
from kotonoha.data.chat import (
    PairData,
    PreferencePair,
    per_sequence,
    train_test_pairs,
)
from kotonoha.errors import UserError
from kotonoha.eval.practice import answer_checkable
from kotonoha.model import flops_per_token
from kotonoha.train.loop import TrainConfig, Trainer, check_run_dir, init_distributed, module_main
from kotonoha.train.lora import AdaptersOff, LoRAConfig, apply_lora, parse_lora
from kotonoha.train.sft import (
    announce,
    context_for,
    load_chat_model,
    make_export,
    stage_main,
    steps_for,
)

Batch = dict[str, torch.Tensor]
LogpFn = Callable[[Batch], torch.Tensor]


@dataclass
class DPOConfig:
    data: str | list[str] = "data/world/preferences.jsonl"  # same format as `kotonoha reward`
    val_data: str | list[str] | None = None  # None = the "test" pairs of `data`
    test_fraction: float = 0.1  # held out when `data` marks no pair as "test"
    init_from: str = "runs/sft"  # the policy's start and the frozen reference
    out: str = "runs/dpo"
    chat_template: str | None = None
    context_length: int | None = None
    beta: float = 0.1  # larger = stay closer to the reference
    # + sft_weight x the chosen replies' mean per-token NLL (RPO, TRL's rpo_alpha): the
    # sigmoid loss alone can lower the chosen replies' likelihood too, as long as the
    # rejected ones fall faster; this term keeps the chosen ones likely.
    sft_weight: float = 0.0
    # A conversation file with checks: train on the starting model's wrong greedy replies to
    # it (see the module docstring); None = the train pairs of `data`; "world" = the
    # practice conversations of the world in `world`.
    mistakes: str | None = None
    world: str = "data/world"
    max_new_tokens: int = 64  # the greedy replies' length limit, for `mistakes`
    # Also sample this many replies per conversation (at `mistake_temperature`) and learn from
    # the wrong ones too: mistakes the model makes often but not greedily.
    mistake_samples: int = 0
    mistake_temperature: float = 1.0
    epochs: float | None = None  # when set it decides train.steps
    lora: str | LoRAConfig | None = None
    merge_lora: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)  # batch_size counts pairs

    def __post_init__(self) -> None:
        self.lora = parse_lora(self.lora)
        if self.beta <= 0:
            raise UserError(f"beta must be positive, got {self.beta}.")
        if self.sft_weight < 0:
            raise UserError(f"sft_weight must be >= 0, got {self.sft_weight}.")
        if self.mistake_samples < 0:
            raise UserError(f"mistake_samples must be >= 0, got {self.mistake_samples}.")
        if self.mistake_temperature <= 0:
            raise UserError("mistake_temperature must be positive (the samples are drawn "
                            f"at it), got {self.mistake_temperature}.")


def sequence_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """log π(reply | prompt) for every sequence of a `collate_replies` batch: the sum over
    the reply's tokens (chosen replies first, then the rejected ones)."""
    ids, mask = batch["ids"], batch["mask"]
    keep = mask != 0  # the output head runs on the replies' tokens only
    logits = model(ids[:, :-1], positions=batch["positions"][:, :-1],
                   segments=batch["segments"][:, :-1], select=keep).float()
    logp = torch.zeros_like(mask, dtype=logits.dtype)
    logp[keep] = -F.cross_entropy(logits, ids[:, 1:][keep], reduction="none")
    return per_sequence(logp * mask, batch)


def make_reference(model: nn.Module, lora: LoRAConfig | None,
                   device: torch.device | None = None) -> LogpFn:
    """A frozen copy of the starting model (or, for LoRA, the model minus its adapters)."""
    ref = (AdaptersOff(model) if lora is not None
           else copy.deepcopy(model).to(device).eval().requires_grad_(False))

    def frozen(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(ref, batch)

    return frozen


def dpo_loss(reference: LogpFn, beta: float, sft_weight: float = 0.0,
             ) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]:
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logps, ref = sequence_logps(model, batch), reference(batch)
        n = len(logps) // 2
        chosen = beta * (logps[:n] - ref[:n])  # implicit rewards
        rejected = beta * (logps[n:] - ref[n:])
        loss = -F.logsigmoid(chosen - rejected).mean()
        nll = -(logps[:n] / per_sequence(batch["mask"], batch)[:n].clamp(min=1)).mean()
        if sft_weight:
            loss = loss + sft_weight * nll
        return loss, {"reward_chosen": chosen.mean().item(),
                      "reward_rejected": rejected.mean().item(),
                      "reward_margin": (chosen - rejected).mean().item(),
                      "reward_accuracy": (chosen > rejected).float().mean().item(),
                      "nll_chosen": nll.item()}

    return loss_fn


@torch.no_grad()
def reference_logps(reference: LogpFn, data: PairData, micro: int, device: torch.device,
                    ) -> list[torch.Tensor]:
    """The frozen reference's log-probabilities of each chunk of `data`: computed once, since
    every evaluation needs the same ones."""
    return [reference({k: v.to(device) for k, v in b.items()}).float().cpu()
            for b in data.chunks(micro)]


@torch.no_grad()
def evaluate_dpo(policy: LogpFn | None, ref_logps: list[torch.Tensor], data: PairData,
                 micro: int, beta: float, device: torch.device) -> dict[str, float]:
    """On held-out pairs: the DPO loss and reward accuracy, and how much more likely the policy
    finds chosen than rejected replies (`val_logp_margin`, comparable before and after).
    `ref_logps` are `reference_logps` of the same data and micro batch; `policy=None`
    evaluates the reference itself (the starting point)."""
    margins, logp_diffs = [], []
    for b, ref in zip(data.chunks(micro), ref_logps, strict=True):
        b = {k: v.to(device) for k, v in b.items()}
        logps = ref if policy is None else policy(b).float().cpu()
        n = len(logps) // 2
        logp_diffs.append(logps[:n] - logps[n:])
        margins.append(beta * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:])))
    m, diff = torch.cat(margins), torch.cat(logp_diffs)
    return {"val_loss": -F.logsigmoid(m).mean().item(),
            "val_reward_accuracy": (m > 0).float().mean().item(),
            "val_reward_margin": m.mean().item(),
            "val_logp_margin": diff.mean().item(),
            "val_logp_accuracy": (diff > 0).float().mean().item()}


def mistake_pairs(model: nn.Module, tok: Any, path: str | Path, max_new_tokens: int,
                  context: int, batch_size: int = 32, samples: int = 0,
                  temperature: float = 1.0, seed: int = 0,
                  ) -> tuple[list[PreferencePair], int]:
    """The model's wrong greedy replies to the checkable conversations of `path` (and, with
    `samples`, its wrong sampled ones: each distinct wrong reply once per conversation), each
    against the conversation's own reply; and how many conversations were asked."""
    answers = answer_checkable(model, tok, path, max_new_tokens, context, batch_size,
                               samples, temperature, seed)
    pairs, seen = [], set()
    for a in answers:
        key = (id(a.row), a.text.strip())  # a conversation's sampled replies share its row
        if a.correct or a.text.strip() == a.reply.strip() or key in seen:
            continue
        seen.add(key)
        pairs.append(PreferencePair(a.prompt, a.reply, a.text, kind=a.row.get("kind")))
    return pairs, len(answers) // (1 + samples)


def run_dpo(cfg: DPOConfig, resume: bool = False) -> Path:
    """Optimise the policy on preference pairs; return the run directory (a model dir)."""
    run_dir = Path(cfg.out)
    check_run_dir(run_dir, resume)
    train_pairs, test_pairs = train_test_pairs(cfg.data, cfg.val_data, cfg.test_fraction,
                                               cfg.train.seed, "DPO")
    d = init_distributed(cfg.train.device)
    model, tok = load_chat_model(cfg.init_from, cfg.chat_template)
    ctx = context_for(model, cfg.context_length)
    asked = None
    if cfg.mistakes:
        mistakes = cfg.mistakes
        if mistakes == "world":
            mistakes = str(Path(cfg.world) / "practice.jsonl")
            if not Path(mistakes).is_file():
                raise UserError(f"{mistakes} does not exist; generate the world with `kotonoha "
                                f"data world --out {cfg.world}` or set world= / mistakes=.")
        train_pairs, asked = mistake_pairs(model.to(d.device), tok, mistakes,
                                           cfg.max_new_tokens, ctx,
                                           samples=cfg.mistake_samples,
                                           temperature=cfg.mistake_temperature,
                                           seed=cfg.train.seed)
        if not train_pairs:
            raise UserError(f"{cfg.init_from} answered all {asked} conversations of "
                            f"{cfg.mistakes} correctly: no mistakes to learn from.")
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "mistakes.jsonl", "".join(
                json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in train_pairs))
    train = PairData(tok, train_pairs, ctx, seed=cfg.train.seed)
    test = PairData(tok, test_pairs, ctx) if test_pairs else None
    steps_for(cfg.train, cfg.epochs, len(train))
    lora = cfg.lora if isinstance(cfg.lora, LoRAConfig) else None
    if lora is not None:
        apply_lora(model, lora, seed=cfg.train.seed)
    reference = make_reference(model, lora, d.device)  # before the trainer wraps the model
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // d.world_size)

    def policy(batch: Batch) -> torch.Tensor:
        return sequence_logps(model, batch)

    final: dict[str, float] = {}

    test_ref: list[torch.Tensor] = []

    def evaluate(_: nn.Module) -> dict[str, float]:
        assert test is not None and test_ref  # test_ref: filled before training starts
        final.update(evaluate_dpo(policy, test_ref, test, micro, cfg.beta, d.device))
        return final

    trainer = Trainer(
        model, cfg.train, run_dir,
        get_batch=lambda step, rows: train.batch(step, cfg.train.batch_size, rows),
        loss_fn=dpo_loss(reference, cfg.beta, cfg.sft_weight), evaluate=evaluate if test else None,
        export=make_export(run_dir, model, tok, lora, cfg.merge_lora,
                           {"stage": "dpo", "init_from": cfg.init_from, "beta": cfg.beta}),
        flops_per_token=flops_per_token(model.cfg, ctx, train.logits_share())["training"],
        dist_info=d, stage_config=cfg,
    )
    report: dict[str, Any] = {"train_pairs": len(train), "test_pairs": len(test_pairs),
                              "beta": cfg.beta}
    if asked is not None:
        report["mistakes"] = {"asked": asked, "wrong": len(train_pairs), "file": cfg.mistakes,
                              "samples": cfg.mistake_samples}
    if test is not None:  # the reference *is* the starting policy: "before" needs no training
        with trainer.autocast():
            test_ref.extend(reference_logps(reference, test, micro, d.device))
            report["before"] = evaluate_dpo(None, test_ref, test, micro, cfg.beta, d.device)
    announce("dpo", model, len(train), cfg.train, d)
    trainer.fit(resume=resume)
    if test is not None:
        if not final:  # resumed after the last step: nothing evaluated yet
            trainer.run_eval()
        report["after"] = dict(final)
    if d.is_main:
        atomic_write_json(run_dir / "dpo_eval.json", report)
        if test is not None and cfg.train.progress:
            b, a = report["before"], report["after"]
            print(f"dpo: held-out log-prob margin (chosen - rejected) "
                  f"{b['val_logp_margin']:.2f} -> {a['val_logp_margin']:.2f}, policy prefers "
                  f"chosen {b['val_logp_accuracy']:.1%} -> {a['val_logp_accuracy']:.1%}",
                  file=sys.stderr)
    return run_dir


def dpo_main(config_path: str | None, overrides: list[str], resume: bool) -> Path:
    """Entry point for `kotonoha dpo --config X.yaml [key=value ...] [--resume]`."""
    return stage_main(run_dpo, load_config(DPOConfig, config_path, overrides), resume)


if __name__ == "__main__":
    sys.exit(module_main(dpo_main, "python -m kotonoha.train.dpo"))
