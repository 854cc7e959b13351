"""Reinforcement learning: the SFT policy optimised for a reward, on a KL leash to itself.

    kotonoha rl --config configs/pipeline-demo.yaml [key=value ...] [--resume]

One RL *iteration* is: pick `prompts_per_rollout` prompts, sample `group_size` replies to each
through the shared `Engine` (temperature 1, each reply with its own seed), score them, turn the
scores into group-relative advantages, then take `ppo_epochs` passes of optimizer steps over
those samples. The optimisation runs on the one trainer core (`train/loop.py`): a trainer step
is one optimizer step on `train.batch_size` of the samples, and `get_batch` produces a new
rollout whenever a step starts a new iteration. So the core's AdamW, schedule, clipping,
progress bar, metrics.jsonl, checkpoints and resume all apply unchanged.

The objective (per response token t of sample i, with r = pi_new / pi_old):

    loss = -min(r * A_i, clip(r, 1 - eps, 1 + eps) * A_i)  +  kl_coef * k3(pi_new || pi_ref)

- **Advantages** are GRPO's: A_i = (R_i - mean(group)) / (std(group) + 1e-6), so no value
  network is needed; a group whose replies all score the same teaches nothing (A = 0).
  `positive_only` keeps max(A_i, 0): the policy imitates its better replies and is never
  pushed away from its worse ones (whose tokens are mostly right too).
- **Old log-probabilities** come from the engine, which reports log-softmax of the raw logits:
  that is exactly pi_old when sampling at temperature 1 with no truncation, which is why
  rollouts always use temperature 1 (any other temperature samples from a different policy).
- **KL** is a per-token penalty in the loss (not reward shaping), with Schulman's k3 estimator
  exp(q) - q - 1, q = log pi_ref - log pi_new: unbiased for KL(pi_new || pi_ref) on tokens the
  policy sampled, never negative, and 0 exactly where the policy equals the reference. The
  logged `kl` is its mean over response tokens; `kl_budget` is the most the run may end with.
- **Length**: `length_penalty` subtracts `coef * tokens` from the reward (a guard against a
  reward model that likes long answers); the raw reward and the length are logged side by side.

Rewards: `reward: model` scores with the reward model in `reward_model` (a `kotonoha reward`
run); `reward: arithmetic` is the world's verifiable reward (1 if the reply's final number is
the prompt's `answer`, else 0); `reward: checker` is the world's rule-based checker on every
prompt that carries a `check` (the world's conversations do: the fact a reply must state, the
false premise it must not repeat, a request it must decline, the sum it must reach), 1 or 0;
and `reward: model+checker` adds `checker_weight` x that to the reward model's score, so the
policy keeps the reward model's preferences and is paid for being right.

Prompts: `prompts: world` are the world's practice conversations (`practice.jsonl`, cut before
their last reply): questions about a few entities that pretraining describes but neither the
SFT data nor the eval ever mentions. Like the held-out eval, they can only be answered from
what pretraining taught, and the SFT model gets some of them wrong, so a group of samples
disagrees and RL has something to learn. (On the SFT conversations themselves the SFT model is
right 95-99% of the time: the checker's reward was nearly constant and RL did not beat SFT.)
`prompts: world-sft` uses `sft.jsonl` instead. Evaluation after RL uses the checker on
*held-out* prompts, never the reward model.

Run directory: what the core writes (metrics.jsonl, train_state/, model files, loss.png), plus
`rollouts.jsonl` (one line per iteration: reward, length, KL, sample replies), `rollout/`
(the samples of the current iteration and of the one the latest checkpoint falls inside, so a
resume mid-iteration trains on the same samples),
`rl.png` (reward, KL and length curves) and `summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kotonoha.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_model,
)
from kotonoha.config import load_config
from kotonoha.data import checker
from kotonoha.data.chat import clean_message, collate_replies, cut_before_last_reply
from kotonoha.errors import UserError
from kotonoha.models import is_packaged
from kotonoha.train.loop import (
    Dist,
    TrainConfig,
    Trainer,
    check_run_dir,
    init_distributed,
    module_main,
    stage_main,
)
from kotonoha.train.lora import AdaptersOff, LoRAConfig, apply_lora, parse_lora
from kotonoha.train.sft import make_export

Prompt = dict[str, Any]  # {"messages": [...], optional "answer", "kind", "lang"}
# (prompts, reply texts) -> one reward per reply. Named ones live in REWARDS.
RewardFn = Callable[[Sequence[Prompt], Sequence[str]], list[float]]

ROLLOUT_DIR = "rollout"
ROLLOUTS_LOG = "rollouts.jsonl"
EVAL_BEFORE = "eval_before.json"


# RL wants a small constant learning rate: the policy starts good and must stay near it.
# (A dict, merged under the YAML and overrides, so setting one train.* key keeps the others.)
RL_TRAIN_DEFAULTS: dict[str, Any] = dict(steps=40, batch_size=16, lr=1e-5, schedule="constant",
                                         warmup_steps=0, weight_decay=0.0, log_interval=1,
                                         eval_interval=0)


@dataclass
class RLConfig:
    model: str = "runs/sft"  # the policy to start from (an SFT run)
    out: str = "runs/rl"
    reference: str | None = None  # the frozen KL reference; None = `model`
    reward: str = "model"  # model | arithmetic | checker | model+checker (see REWARDS)
    checker_weight: float = 4.0  # model+checker: reward = RM score + weight * (0 or 1)
    reward_model: str | None = "runs/reward"  # a `kotonoha reward` run, for reward: model
    # Prompts: "world" = the conversations of `world`/practice.jsonl cut before their last
    # assistant turn ("world-sft": of sft.jsonl); or a JSONL file of {"messages": [...],
    # "answer"?: ..., "check"?: ...}, used as they are.
    prompts: str = "world"
    world: str = "data/world"
    prompt_kinds: list[str] = field(default_factory=list)  # world SFT kinds to keep; [] = all
    max_prompts: int | None = None
    group_size: int = 4  # replies per prompt (G)
    prompts_per_rollout: int = 8  # prompts per iteration; samples = this x group_size
    ppo_epochs: int = 1  # passes over each iteration's samples
    max_new_tokens: int = 64
    rollout_batch_size: int = 32  # engine rows
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    kl_budget: float = 0.5  # the largest mean per-token KL the run may end with
    length_penalty: float = 0.0  # reward -= length_penalty * reply tokens
    normalize_std: bool = True  # GRPO's division by the group's std (False: Dr. GRPO)
    # Learn from the group's better replies only (negative advantages set to 0). A reply's
    # advantage lands on every token of it, so pushing down a reply that answers a bread
    # question with the price of tea also pushes down "tea" where tea was asked: RL then
    # answered held-out tea questions with bread, fathers with mothers (docs/PIPELINE.md §5).
    positive_only: bool = False
    # Evaluation with the rule-based checker on held-out eval items (per task and language).
    eval_tasks: list[str] = field(default_factory=lambda: ["qa", "false_premise", "refusal",
                                                           "benign", "arithmetic"])
    eval_split: str = "default"  # see eval/chat.py: held-out entities, in-range arithmetic
    eval_items: int = 8  # per task and language; 0 turns the evaluation off
    # Mean reward of sampled replies to this many pool prompts (group_size each, the same
    # seeds every time) before and after: the low-noise "did RL raise the reward" number.
    probe_prompts: int = 32
    samples_logged: int = 2  # replies per iteration written to rollouts.jsonl
    # LoRA on the policy; with no `reference` given, the KL reference is the same model with
    # its adapters off (no second copy of the weights).
    lora: str | LoRAConfig | None = None
    merge_lora: bool = True
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**RL_TRAIN_DEFAULTS))

    def __post_init__(self) -> None:
        self.lora = parse_lora(self.lora)
        if self.group_size < 2:
            raise UserError(f"group_size must be >= 2 (advantages compare replies to the same "
                            f"prompt), got {self.group_size}.")
        for name in ("prompts_per_rollout", "ppo_epochs", "max_new_tokens",
                     "rollout_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 < self.clip_eps < 1:
            raise UserError(f"clip_eps must be in (0, 1), got {self.clip_eps}.")
        if self.kl_coef < 0:
            raise UserError(f"kl_coef must be >= 0, got {self.kl_coef}.")


# ---------------------------------------------------------------------------------------------
# The maths (pure functions, tested by hand computations)


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     positive_only: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean (over / its std), groups of
    `group_size` consecutive samples; with `positive_only`, the negative ones set to 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    if positive_only:
        adv = adv.clamp_min(0.0)
    return adv.flatten()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) on tokens sampled from pi: e^q - q - 1 with
    q = log ref - log pi. Non-negative, and 0 where the two agree."""
    q = (ref_logp - logp).clamp(-20.0, 20.0)  # exp() of a huge gap would overflow
    return (torch.exp(q) - q - 1.0).clamp_min(0.0)  # >= 0 exactly, not -1e-9 from rounding


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                  clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss and a 0/1 tensor of where the clip was the active term.

    `adv` broadcasts over tokens (shape (B, 1) for per-sequence advantages).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Prompts and rewards


WORLD_PROMPTS = {"world": "practice.jsonl", "world-sft": "sft.jsonl"}


def load_prompts(cfg: RLConfig) -> list[Prompt]:
    """The prompt pool, in a fixed order (iterations draw from it by a seeded shuffle)."""
    prompts: list[Prompt] = []
    from_world = cfg.prompts in WORLD_PROMPTS
    if from_world:
        path = Path(cfg.world) / WORLD_PROMPTS[cfg.prompts]
        if not path.is_file():
            raise UserError(f"{path} does not exist; generate the world with `kotonoha data "
                            f"world --out {cfg.world}` or set rl.world / rl.prompts.")
    else:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise UserError(f"Prompt file {path} does not exist; give a JSONL file of "
                            '{"messages": [...]} lines, or prompts=world.')
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = row.get("messages", row.get("prompt"))
                if not isinstance(messages, list) or not messages:
                    raise ValueError
            except (ValueError, AttributeError):
                raise UserError(f"{path}:{n} must be a JSON object with a non-empty "
                                '"messages" list.') from None
            kind = row.get("kind")
            if cfg.prompt_kinds and kind not in cfg.prompt_kinds:
                continue
            msgs, reference = (cut_before_last_reply(messages)
                               if from_world else ([clean_message(m) for m in messages], None))
            if not msgs or msgs[-1]["role"] != "user":
                continue  # nothing for the assistant to answer
            prompt: Prompt = {"messages": msgs, "kind": kind, "lang": row.get("lang")}
            if isinstance(row.get("check"), dict):
                prompt["check"] = row["check"]
            if cfg.reward in ("checker", "model+checker") and "check" not in prompt:
                continue  # only prompts the checker can score
            if "answer" in row:
                prompt["answer"] = row["answer"]
            elif kind == "arithmetic" and reference is not None:
                prompt["answer"] = checker.final_number(reference)
            prompts.append(prompt)
            if cfg.max_prompts and len(prompts) >= cfg.max_prompts:
                break
    if not prompts:
        raise UserError(f"No usable prompts in {path}"
                        + (f" of kinds {cfg.prompt_kinds}" if cfg.prompt_kinds else "") + ".")
    return prompts


def arithmetic_reward(prompts: Sequence[Prompt], replies: Sequence[str]) -> list[float]:
    """1 when the reply's final number is the prompt's answer (the world's checker rule)."""
    out = []
    for p, reply in zip(prompts, replies):
        if p.get("answer") is None:
            raise UserError("reward: arithmetic needs an 'answer' for every prompt; use "
                            "prompt_kinds=[arithmetic] with the world, or add answers.")
        out.append(float(checker.final_number(reply) == int(p["answer"])))
    return out


def checker_reward(prompts: Sequence[Prompt], replies: Sequence[str]) -> list[float]:
    """1 when the world's rule-based checker accepts the reply to the prompt's `check` (an
    eval item, which carries the checker's fields itself, is its own check)."""
    return [float(checker.check(p.get("check", p), reply)) for p, reply in zip(prompts, replies)]


REWARDS: dict[str, RewardFn] = {"arithmetic": arithmetic_reward, "checker": checker_reward}


def make_reward_fn(cfg: RLConfig, device: torch.device) -> RewardFn:
    if cfg.reward in REWARDS:
        return REWARDS[cfg.reward]
    if cfg.reward == "model+checker":
        rm_score = _reward_model_fn(cfg, device)

        def combined(prompts: Sequence[Prompt], replies: Sequence[str]) -> list[float]:
            return [m + cfg.checker_weight * c for m, c in
                    zip(rm_score(prompts, replies), checker_reward(prompts, replies))]

        return combined
    if cfg.reward != "model":
        raise UserError(f"Unknown reward '{cfg.reward}'; choose model, model+checker or one "
                        f"of: {', '.join(REWARDS)}.")
    return _reward_model_fn(cfg, device)


def _reward_model_fn(cfg: RLConfig, device: torch.device) -> RewardFn:
    if not cfg.reward_model:
        raise UserError("reward: model needs reward_model (a `kotonoha reward` run directory).")
    from kotonoha.train.reward import load_reward_model

    rm = load_reward_model(cfg.reward_model, device=device)

    def score(prompts: Sequence[Prompt], replies: Sequence[str]) -> list[float]:
        return [float(s) for s in rm.score([p["messages"] for p in prompts], list(replies))]

    return score


# ---------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """One iteration's samples on this rank, row i = prompt i // G, reply i % G."""

    index: int
    ids: torch.Tensor  # (N, T) prompt + reply token ids, right-padded with 0
    mask: torch.Tensor  # (N, T-1) 1 where target t+1 is a reply token
    old_logp: torch.Tensor  # (N, T-1) log pi_old(target), from the engine
    ref_logp: torch.Tensor  # (N, T-1) log pi_ref(target)
    adv: torch.Tensor  # (N,)
    reward: torch.Tensor  # (N,) before the length penalty
    length: torch.Tensor  # (N,) reply tokens

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("ids", "mask", "old_logp", "ref_logp", "adv",
                                              "reward", "length")}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.tensors().items()}, str(tmp),
                  metadata={"index": str(self.index)})
        os.replace(tmp, path)  # a crash mid-write leaves the previous file, never half a file

    @classmethod
    def load(cls, path: Path, index: int) -> Rollout | None:
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("index") != str(index):
                return None
        return cls(index=index, **load_file(str(path)))


def rollout_path(run_dir: Path, index: int, rank: int) -> Path:
    return run_dir / ROLLOUT_DIR / f"iter{index:06d}.rank{rank}.safetensors"


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's latest committed checkpoint, or None when it has none."""
    latest = run_dir / "train_state" / "latest.json"
    if not latest.is_file():
        return None
    return int(json.loads(latest.read_text(encoding="utf-8"))["step"])


@torch.no_grad()
def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None,
                      batch_size: int = 16) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) in fp32: (N, T-1), for every position or only where
    `mask` (N, T-1) is set (0 elsewhere; the output head then runs only there)."""
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=ids.device)
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size]
        keep = (torch.ones_like(x[:, 1:], dtype=torch.bool) if mask is None
                else mask[i:i + batch_size].bool())
        logits = model(x[:, :-1], select=keep).float()  # (selected, V)
        logp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:][keep][:, None])[:, 0]
        out[i:i + batch_size][keep] = logp
    return out


def pack_rollout_rows(batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Rows of a `Rollout` (right-padded prompt + reply) laid end to end, padding-free, in rows
    of up to `width` tokens (`collate_replies`: segments, positions from 0 per sequence).
    mask, old_logp, ref_logp and adv become per target of the packed rows (seq: which row of
    `batch` each target belongs to, -1 for none); reward and length stay per sequence. The
    demo's rollouts were 41% padding."""
    mask = batch["mask"]
    # Each sequence runs through its last reply token (target index t is token t + 1).
    ends = [int(m.nonzero().max()) + 2 if m.any() else 1 for m in mask]
    seqs = [(ids[:n].tolist(), [0.0, *m[:n - 1].tolist()])
            for ids, m, n in zip(batch["ids"], mask, ends)]
    packed = collate_replies(seqs, 0, width)
    own = packed["seq"] >= 0
    seq = packed["seq"].clamp(min=0)
    target = (packed["positions"][:, 1:] - 1).clamp(min=0)  # its index in the padded row
    out = {k: packed[k] for k in ("ids", "positions", "segments", "mask", "seq")}
    for k in ("old_logp", "ref_logp"):
        out[k] = batch[k][seq, target] * own
    out["adv"] = batch["adv"][seq] * own
    out["reward"], out["length"] = batch["reward"], batch["length"]
    return out


class RLRun:
    """State shared by `get_batch`, `loss_fn` and `evaluate` of one RL run."""

    def __init__(self, cfg: RLConfig, policy: nn.Module, reference: nn.Module, tokenizer: Any,
                 prompts: list[Prompt], reward_fn: RewardFn, d: Dist, run_dir: Path) -> None:
        self.cfg, self.policy, self.reference, self.tok = cfg, policy, reference, tokenizer
        self.reward_fn, self.d, self.run_dir = reward_fn, d, run_dir
        # Encode once; a prompt must leave room for a whole reply in the model's context.
        room = policy.cfg.context_length - cfg.max_new_tokens
        self.prompts = []
        for p in prompts:
            ids = tokenizer.encode_chat(p["messages"], add_generation_prompt=True)[0]
            if len(ids) <= room:
                self.prompts.append({**p, "ids": ids})
        if not self.prompts:
            raise UserError(f"No prompt fits the context of {policy.cfg.context_length} tokens "
                            f"with room for max_new_tokens={cfg.max_new_tokens}; lower it.")
        self.dropped = len(prompts) - len(self.prompts)
        G, P, B = cfg.group_size, cfg.prompts_per_rollout, cfg.train.batch_size
        if P % d.world_size:
            raise UserError(f"prompts_per_rollout={P} must be divisible by the number of "
                            f"processes ({d.world_size}).")
        self.n_samples = P * G  # per iteration, all ranks
        if self.n_samples % B:
            raise UserError(f"train.batch_size={B} must divide the {self.n_samples} samples "
                            f"of an iteration (prompts_per_rollout x group_size).")
        self.minibatches = self.n_samples // B
        self.steps_per_rollout = self.minibatches * cfg.ppo_epochs
        self.per_rank = B // d.world_size
        self.local_prompts = P // d.world_size
        self.engine: Any = None
        self.rollout: Rollout | None = None

    # --- which prompts and samples ---------------------------------------------------------

    def prompts_for(self, index: int) -> list[Prompt]:
        """This rank's prompts of iteration `index`: consecutive slices of a seeded shuffle of
        the pool, reshuffled every pass (a pure function of the index, for resume)."""
        P, n = self.cfg.prompts_per_rollout, len(self.prompts)
        out = []
        first = index * P + self.d.rank * self.local_prompts
        for k in range(first, first + self.local_prompts):
            epoch, pos = divmod(k, n)
            order = list(range(n))
            random.Random(f"rl-prompts/{self.cfg.train.seed}/{epoch}").shuffle(order)
            out.append(self.prompts[order[pos]])
        return out

    def get_batch(self, step: int, rows: range) -> dict[str, torch.Tensor]:
        index, within = divmod(step, self.steps_per_rollout)
        if self.rollout is None or self.rollout.index != index:
            self.rollout = self._load_or_make(index)
        epoch, mb = divmod(within, self.minibatches)
        n_local = self.rollout.ids.shape[0]
        order = torch.randperm(n_local, generator=torch.Generator().manual_seed(
            self.cfg.train.seed * 1_000_003 + index * 101 + epoch))
        local = [r - self.d.rank * self.per_rank for r in rows]
        pick = order[[mb * self.per_rank + r for r in local]]
        batch = {k: v[pick] for k, v in self.rollout.tensors().items()}
        return pack_rollout_rows(batch, self.policy.cfg.context_length)

    def _load_or_make(self, index: int) -> Rollout:
        path = rollout_path(self.run_dir, index, self.d.rank)
        saved = Rollout.load(path, index)
        if saved is not None:  # resumed in the middle of an iteration: the same samples
            return saved
        rollout = self.make_rollout(index)
        rollout.save(path)
        # Keep the rollout of the iteration the latest checkpoint falls inside: a resume
        # from it trains on those samples, not on ones drawn again from newer weights.
        step = checkpoint_step(self.run_dir)
        keep = {path} | ({rollout_path(self.run_dir, step // self.steps_per_rollout,
                                       self.d.rank)} if step is not None else set())
        for old in path.parent.glob(f"*.rank{self.d.rank}.safetensors"):
            if old not in keep:
                old.unlink(missing_ok=True)
        return rollout

    # --- sampling and scoring ----------------------------------------------------------------

    def _engine(self) -> Any:
        if self.engine is None:
            from kotonoha.engine import Engine

            G = self.cfg.group_size
            rows = min(self.cfg.rollout_batch_size, self.local_prompts * G)
            self.engine = Engine(self.policy, self.tok, max_batch_size=max(1, rows))
        return self.engine

    def make_rollout(self, index: int) -> Rollout:
        from kotonoha.sampling import SamplingParams

        cfg, G = self.cfg, self.cfg.group_size
        t0 = time.perf_counter()
        prompts = self.prompts_for(index)
        was_training = self.policy.training  # before _engine(): creating one calls .eval()
        engine = self._engine()
        prompt_ids = [p["ids"] for p in prompts]
        base = (cfg.train.seed * 1_000_003 + index) * 100_000 + self.d.rank * self.local_prompts * G
        # Temperature 1 and no truncation: the engine's logprobs are then pi_old exactly.
        params = [SamplingParams(temperature=1.0, max_tokens=cfg.max_new_tokens, seed=base + i,
                                 lstrip=True)
                  for i in range(len(prompts) * G)]
        self.policy.eval()
        try:
            comps = engine.generate([ids for ids in prompt_ids for _ in range(G)], params)
        finally:
            self.policy.train(was_training)
        flat_prompts = [p for p in prompts for _ in range(G)]
        texts = [c.text for c in comps]
        raw = torch.tensor(self.reward_fn(flat_prompts, texts), dtype=torch.float32)
        if raw.shape != (len(texts),):
            raise RuntimeError(f"the reward function returned {raw.shape} for {len(texts)} replies")
        length = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float32)
        shaped = raw - cfg.length_penalty * length
        adv = group_advantages(shaped, G, cfg.normalize_std, cfg.positive_only)

        T = max(len(c.prompt_ids) + len(c.token_ids) for c in comps)
        N = len(comps)
        ids = torch.zeros(N, T, dtype=torch.long)
        mask = torch.zeros(N, T - 1)
        old = torch.zeros(N, T - 1)
        for i, c in enumerate(comps):
            seq = c.prompt_ids + c.token_ids
            ids[i, :len(seq)] = torch.tensor(seq)
            start, end = len(c.prompt_ids) - 1, len(seq) - 1  # targets seq[start+1 .. end]
            mask[i, start:end] = 1.0
            old[i, start:end] = torch.tensor(c.logprobs, dtype=torch.float32)
        ref = sequence_logprobs(self.reference, ids.to(self.d.device),
                                mask.to(self.d.device)).cpu()
        kl = float(masked_mean(kl_k3(old, ref), mask))
        rollout = Rollout(index, ids, mask, old, ref, adv, raw, length)
        self._log_rollout(rollout, prompts, texts, kl, time.perf_counter() - t0)
        return rollout

    def _log_rollout(self, r: Rollout, prompts: list[Prompt], texts: list[str], kl: float,
                     seconds: float) -> None:
        stats = self.d.all_sum([float(r.reward.sum()), float((r.reward ** 2).sum()),
                                float(r.length.sum()), kl, float(r.reward.numel())])
        n = stats[4]
        mean = stats[0] / n
        rec = {"iteration": r.index, "step": r.index * self.steps_per_rollout,
               "reward": mean, "reward_std": math.sqrt(max(0.0, stats[1] / n - mean ** 2)),
               "length": stats[2] / n, "kl": stats[3] / self.d.world_size,
               "rollout_s": seconds,
               "samples": [{"messages": prompts[i // self.cfg.group_size]["messages"],
                            "reply": texts[i], "reward": float(r.reward[i])}
                           for i in range(0, len(texts), self.cfg.group_size)
                           ][:self.cfg.samples_logged]}
        if not self.d.is_main:
            return
        with open(self.run_dir / ROLLOUTS_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self.cfg.train.progress:
            tqdm.write(f"rollout {r.index}: reward {mean:.3f} ± {rec['reward_std']:.3f}, "
                       f"length {rec['length']:.1f}, kl {rec['kl']:.4f}, {seconds:.1f}s",
                       file=sys.stderr)

    def probe_reward(self) -> float:
        """Mean reward of `group_size` sampled replies to each of the first `probe_prompts`
        pool prompts (a fixed seeded pick), with fixed seeds: comparing two policies on the
        same prompts and random numbers removes most of the noise of the rollouts' means."""
        from kotonoha.sampling import SamplingParams

        cfg, G = self.cfg, self.cfg.group_size
        order = list(range(len(self.prompts)))
        random.Random(f"rl-probe/{cfg.train.seed}").shuffle(order)
        prompts = [self.prompts[i] for i in order[:cfg.probe_prompts] for _ in range(G)]
        params = [SamplingParams(temperature=1.0, max_tokens=cfg.max_new_tokens,
                                 seed=cfg.train.seed * 7919 + 10**12 + i, lstrip=True)
                  for i in range(len(prompts))]
        was_training = self.policy.training
        self.policy.eval()
        try:
            comps = self._engine().generate([p["ids"] for p in prompts], params)
        finally:
            self.policy.train(was_training)
        scores = self.reward_fn(prompts, [c.text for c in comps])
        return sum(scores) / len(scores)

    # --- the objective -----------------------------------------------------------------------

    def loss_fn(self, model: nn.Module, batch: dict[str, torch.Tensor],
                ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        # A `pack_rollout_rows` batch. Every term is per reply token, so the output head runs
        # on those only: (N,) below.
        keep = batch["mask"] != 0
        mask = batch["mask"][keep]
        logits = model(batch["ids"][:, :-1], positions=batch["positions"][:, :-1],
                       segments=batch["segments"][:, :-1], select=keep).float()
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, batch["ids"][:, 1:][keep][:, None])[:, 0]
        pg, clipped = ppo_clip_loss(logp, batch["old_logp"][keep], batch["adv"][keep],
                                    cfg.clip_eps)
        kl = kl_k3(logp, batch["ref_logp"][keep])
        loss = masked_mean(pg + cfg.kl_coef * kl, mask)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            metrics = {
                "reward": float(batch["reward"].mean()),
                "kl": float(masked_mean(kl, mask)),
                "entropy": float(masked_mean(entropy, mask)),
                "clip_frac": float(masked_mean(clipped, mask)),
                "length": float(batch["length"].mean()),
                "pg_loss": float(masked_mean(pg, mask)),
            }
        return loss, metrics


# ---------------------------------------------------------------------------------------------
# Running


def _load_policy(spec: str, what: str) -> tuple[nn.Module, Any]:
    if not Path(spec).exists() and not is_packaged(spec):
        raise UserError(f"The {what} {spec} does not exist; train it first (kotonoha sft) or "
                        "point rl.model at a model directory.")
    model, tok = load_model(spec, dtype=torch.float32)
    if tok is None:
        raise UserError(f"{spec} has no tokenizer; RL needs the model's tokenizer.")
    if tok.chat_template is None:
        raise UserError(f"{spec} has no chat template; RL starts from a chat (SFT) model.")
    return model, tok


def run_rl(cfg: RLConfig, resume: bool = False, reward_fn: RewardFn | None = None) -> Path:
    """Optimise `cfg.model` for the reward; returns the run directory.

    `reward_fn` overrides `cfg.reward` with any Python function (for experiments and tests).
    """
    run_dir = Path(cfg.out)
    check_run_dir(run_dir, resume)
    d = init_distributed(cfg.train.device)
    if d.world_size > 1 and cfg.train.parallel == "fsdp":
        raise UserError("RL generates with whole-model rollouts on every rank; use "
                        "train.parallel=ddp (or one process).")
    policy, tok = _load_policy(cfg.model, "policy")
    lora = cfg.lora if isinstance(cfg.lora, LoRAConfig) else None
    if lora is not None:
        apply_lora(policy, lora, seed=cfg.train.seed)
    reference: nn.Module
    if lora is not None and cfg.reference is None:
        reference = AdaptersOff(policy)
    else:
        ref_spec = cfg.reference or cfg.model
        reference, ref_tok = _load_policy(ref_spec, "reference")
        if ref_tok.backend.get_vocab() != tok.backend.get_vocab():
            raise UserError(f"The reference {ref_spec} uses a different tokenizer than "
                            f"{cfg.model}.")
        reference = reference.to(d.device).eval().requires_grad_(False)
    prompts = load_prompts(cfg)
    reward = reward_fn or make_reward_fn(cfg, d.device)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.train.seed)
    run = RLRun(cfg, policy, reference, tok, prompts, reward, d, run_dir)
    if d.is_main:
        _drop_stale_files(run_dir, resume, run.steps_per_rollout)
    d.barrier()  # no rank reads a rollout or eval_before.json before they are cleaned up
    export = make_export(run_dir, policy, tok, lora, cfg.merge_lora,
                         {"stage": "rl", "init_from": str(cfg.model), "reward": cfg.reward})

    evaluate = (_make_evaluate(cfg, run, tok) if cfg.eval_items or cfg.probe_prompts
                else None)
    trainer = Trainer(policy, cfg.train, run_dir, get_batch=run.get_batch, loss_fn=run.loss_fn,
                      evaluate=evaluate, export=export, dist_info=d, stage_config=cfg)
    if d.is_main and cfg.train.progress:
        iters = math.ceil(cfg.train.steps / run.steps_per_rollout)
        print(f"rl: {iters} iterations x {cfg.prompts_per_rollout} prompts x "
              f"{cfg.group_size} replies ({len(run.prompts)} prompts in the pool"
              + (f", {run.dropped} too long skipped" if run.dropped else "") + "), "
              f"{run.steps_per_rollout} optimizer step(s) each, reward={cfg.reward}, "
              f"kl_coef={cfg.kl_coef} on {d.device}", file=sys.stderr)
    before_path = run_dir / EVAL_BEFORE
    if evaluate is not None and not before_path.is_file():  # the SFT policy, once
        before = trainer.run_eval()
        if d.is_main:
            atomic_write_json(before_path, before)
    trainer.fit(resume=resume)
    if d.is_main:
        before = json.loads(before_path.read_text()) if before_path.is_file() else {}
        write_summary(run_dir, cfg, before, "custom" if reward_fn else cfg.reward)
        if cfg.train.plot:
            plot_rl(run_dir / ROLLOUTS_LOG, run_dir / "metrics.jsonl", run_dir / "rl.png")
    return run_dir


def _drop_stale_files(run_dir: Path, resume: bool, steps_per_rollout: int) -> None:
    """Remove what an interrupted run in `run_dir` left that this run must not reuse."""
    step = checkpoint_step(run_dir) if resume else None
    if step is None:  # a fresh start (or nothing to resume): none of it belongs to this run
        shutil.rmtree(run_dir / ROLLOUT_DIR, ignore_errors=True)
        (run_dir / ROLLOUTS_LOG).unlink(missing_ok=True)
        (run_dir / EVAL_BEFORE).unlink(missing_ok=True)
        return
    _trim_rollouts(run_dir, step, steps_per_rollout)
    # Only the rollout of the iteration the checkpoint falls inside is reused; ones the run
    # made after its checkpoint are made again (and logged again: their lines were dropped).
    index, within = divmod(step, steps_per_rollout)
    needed = f"iter{index:06d}." if within else None
    for path in (run_dir / ROLLOUT_DIR).glob("*.safetensors"):
        if needed is None or not path.name.startswith(needed):
            path.unlink(missing_ok=True)


def _trim_rollouts(run_dir: Path, step: int, steps_per_rollout: int) -> None:
    """Drop rollouts.jsonl lines of iterations the checkpoint did not reach (they are redone)."""
    path = run_dir / ROLLOUTS_LOG
    if not path.exists():
        return
    keep_below = math.ceil(step / steps_per_rollout)  # iterations started before `step`
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
             if ln.strip() and json.loads(ln).get("iteration", 0) < keep_below]
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def _make_evaluate(cfg: RLConfig, run: RLRun, tok: Any,
                   ) -> Callable[[nn.Module], dict[str, float]]:
    """`probe_reward` on training prompts, and greedy replies to held-out eval items: the
    checker's accuracy per task (what RL really changed) and their mean reward."""
    from kotonoha.eval.chat import evaluate_chat, load_chat_items

    items = (load_chat_items(cfg.world, tasks=cfg.eval_tasks, split=cfg.eval_split,
                             max_items=cfg.eval_items) if cfg.eval_items else [])
    by_id = {item["id"]: item for item in items}
    # The arithmetic reward scores arithmetic items only (a QA item's answer is a name, not a
    # number); the other rewards score any item.
    verifiable = cfg.reward == "arithmetic"

    def evaluate(_: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        if cfg.probe_prompts:
            out["probe_reward"] = run.probe_reward()
        if not items:
            return out
        result = evaluate_chat(run.policy, tok, items=items)
        out.update({f"eval_{task}": rate for task, rate in result["rates"].items()})
        out["eval_accuracy"] = result["accuracy"]
        out["eval_length"] = result["length"]
        rows = [r for r in result["items"]
                if not verifiable or by_id[r["id"]]["task"] == "arithmetic"]
        if rows:
            scores = run.reward_fn([by_id[r["id"]] for r in rows],
                                   [r["response"] for r in rows])
            out["eval_reward"] = sum(scores) / len(scores)
        return out

    return evaluate


def read_rollouts(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def write_summary(run_dir: Path, cfg: RLConfig, before: dict[str, float],
                  reward_name: str) -> dict[str, Any]:
    """summary.json: held-out evaluation before and after, the reward of the first and last
    iterations' samples, and the final KL against its budget."""
    from kotonoha.train.loop import read_metrics

    last: dict[str, Any] = {}  # the latest value of every logged number (also after a resume)
    if (run_dir / "metrics.jsonl").is_file():
        for rec in read_metrics(run_dir / "metrics.jsonl"):
            last.update(rec)
    rolls = read_rollouts(run_dir / ROLLOUTS_LOG)
    k = max(1, len(rolls) // 4)  # average a few iterations: single ones are noisy

    def avg(rs: list[dict[str, Any]], key: str) -> float | None:
        return sum(r[key] for r in rs) / len(rs) if rs else None

    kl_final = float(last["kl"]) if "kl" in last else avg(rolls[-1:], "kl")
    summary = {
        "iterations": len(rolls),
        "reward": reward_name,
        "reward_first": avg(rolls[:k], "reward"), "reward_last": avg(rolls[-k:], "reward"),
        "length_first": avg(rolls[:k], "length"), "length_last": avg(rolls[-k:], "length"),
        "kl_final": kl_final, "kl_budget": cfg.kl_budget,
        "kl_within_budget": kl_final is not None and kl_final <= cfg.kl_budget,
        "probe_reward_before": before.get("probe_reward"),
        "probe_reward_after": last.get("probe_reward"),
        "eval_before": before,
        "eval_after": {k: v for k, v in last.items()
                       if k.startswith("eval_") or k == "probe_reward"},
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def plot_rl(rollouts_path: Path, metrics_path: Path, png_path: Path) -> None:
    """Reward, length and KL per iteration: reward rising with length flat is the good case."""
    from matplotlib.figure import Figure

    rolls = read_rollouts(rollouts_path)
    if not rolls:
        return
    it = [r["iteration"] for r in rolls]
    fig = Figure(figsize=(10, 3.2), dpi=100)
    axes = fig.subplots(1, 3)
    axes[0].plot(it, [r["reward"] for r in rolls], "o-", markersize=3)
    axes[0].set_title("mean reward")
    axes[1].plot(it, [r["length"] for r in rolls], "o-", markersize=3, color="tab:orange")
    axes[1].set_title("reply length (tokens)")
    axes[2].plot(it, [r["kl"] for r in rolls], "o-", markersize=3, color="tab:red")
    axes[2].set_title("KL to reference (per token)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(png_path, buf.getvalue())


def rl_main(config_path: str | None, overrides: list[str], resume: bool) -> Path:
    """Entry point for `kotonoha rl --config X.yaml [key=value ...] [--resume]`."""
    cfg = load_config(RLConfig, config_path, overrides, base={"train": RL_TRAIN_DEFAULTS})
    return stage_main(run_rl, cfg, resume)


if __name__ == "__main__":
    sys.exit(module_main(rl_main, "python -m kotonoha.train.rl"))
