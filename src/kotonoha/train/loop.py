"""The one trainer core: every training stage (pretrain, SFT, reward, RL, DPO) runs through it.

A stage supplies three things and gets everything else:

- `get_batch(step, rows)`: the micro-batch made of rows `rows` of the global batch of optimizer
  step `step` (a pure function of its arguments, so a resumed run sees the same data);
- `loss_fn(model, batch) -> (loss, metrics)`: the objective (a scalar to minimise, plus floats
  to log);
- optionally `evaluate(model) -> metrics` and `export(state_dict, step)` (write the model files).

The trainer owns: AdamW (fused where the device supports it), or Muon on the blocks' matrices
with AdamW on the rest (`optimizer=muon`, train/muon.py), with decoupled weight decay on every
matrix (embeddings included, as in nanoGPT/GPT-3, since a tied embedding *is* the output
matrix) and none on norms and biases; warmup + cosine or WSD (warmup-stable-decay) learning
rates; gradient accumulation; clipping; bf16 autocast; optional `torch.compile`; DDP or FSDP2
when launched by torchrun; a progress bar (loss, tokens/s, MFU, ETA); `metrics.jsonl`;
checkpoints written atomically; `resume` that restores weights, optimizer, schedule step, RNG
and data position exactly; and a loss-curve PNG at the end.

Run directory layout (rank 0 writes everything except its own RNG file per rank):

    metrics.jsonl  loss.png  model.safetensors + model.json (via `export`)
    train_state/latest.json            -> {"step": N, "dir": "step_00000N"}
    train_state/step_00000N/           model.safetensors, optimizer.pt, state.json, rng_rank{r}.pt

`latest.json` is replaced atomically only after the step folder is complete, so a SIGKILL at
any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from kotonoha.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    parse_device,
    read_safetensors,
    save_safetensors_atomic,
)
from kotonoha.config import dump_yaml
from kotonoha.errors import UserError

Batch = Any  # a tensor, or a tuple/list/dict of tensors; moved to the device by the trainer
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
GetBatch = Callable[[int, range], Batch]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, all ranks and micro-batches together
    micro_batch_size: int | None = None  # per forward on one rank; None = batch_size / ranks
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # adamw | muon: Muon on the blocks' weight matrices, AdamW on the rest (train/muon.py)
    optimizer: str = "adamw"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on CUDA when supported, else fp32) | fp32 | bf16
    # true | false | auto: compile where it was measured to pay, a CPU training in bf16 with
    # a C++ compiler at hand (compile_pays; docs/BENCHMARKS.md), eager elsewhere
    compile: bool | str = False
    parallel: str = "ddp"  # ddp | fsdp | none: what to do when torchrun starts several ranks
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 200  # 0 = evaluate only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation
    checkpoint_interval: int = 0  # 0 = checkpoint only at the end
    peak_flops: float | None = None  # per device, for MFU; None = table (CUDA) or measured (CPU)
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise UserError(f"schedule must be cosine, wsd or constant, not '{self.schedule}'.")
        if isinstance(self.compile, str) and self.compile != "auto":
            raise UserError(f"compile must be true, false or auto, not '{self.compile}'.")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise UserError(f"dtype must be auto, fp32 or bf16, not '{self.dtype}'.")
        if self.optimizer not in ("adamw", "muon"):
            raise UserError(f"optimizer must be adamw or muon, not '{self.optimizer}'.")
        if self.parallel not in ("ddp", "fsdp", "none"):
            raise UserError(f"parallel must be ddp, fsdp or none, not '{self.parallel}'.")
        for name in ("steps", "batch_size", "log_interval"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise UserError(f"micro_batch_size must be positive, got {self.micro_batch_size}.")
        if self.warmup_steps < 0:
            raise UserError(f"warmup_steps must be 0 or more, got {self.warmup_steps}.")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":  # stable at the peak, then a linear cooldown to the minimum
        decay_start = cfg.steps - int(cfg.decay_fraction * cfg.steps)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start + 1) / max(1, cfg.steps - decay_start)
        return cfg.lr - (cfg.lr - lo) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(1.0, frac)))


# ---------------------------------------------------------------------------------------------
# Devices, distributed setup, FLOPs


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (gloo has no AVG, so everything is a SUM)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return parse_device(name)  # an unknown name or a missing GPU: one sentence


def init_distributed(device: str = "auto") -> Dist:
    """Single process, or one rank of a torchrun job (RANK/WORLD_SIZE/LOCAL_RANK in env)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, local, world, dev)


def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks for reuse instead of unmapping them.

    A CPU training step allocates and frees the same big tensors every step: the demo's
    logits alone are 16 x 256 x 3,557 floats (58 MB). glibc serves blocks over 32 MB with a
    fresh mmap and returns them to the OS on free, so each step page-faults and zeroes them
    again: about a tenth of a demo step on a 2-core AVX2 machine (docs/BENCHMARKS.md).
    Serving everything from the heap (and trimming it only past 1 GB free) reuses them.
    No-op where the C library is not glibc. Returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold,
                                                                         1 << 30))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AVX512_BF16 or AMX on x86.

    oneDNN's own "bf16 supported" only asks for AVX-512 and then converts to fp32 inside the
    kernel: on an Intel Ice Lake (AVX-512 without AVX512_BF16) that ran the demo model's
    training 3x slower than fp32 (measured). On an AVX2-only CPU torch emulates bf16, 63x
    slower. Off x86 (ARM with its bf16 extension) oneDNN's answer is the one there is.
    """
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported()
                        or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpp_compiler() -> str | None:
    """The C++ compiler inductor builds its CPU kernels with ($CXX, else g++), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler; or a torch whose inductor moved the function
        return None


def compile_pays(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """`compile: auto`. Measured on the demo's pretraining (docs/BENCHMARKS.md): on a CPU that
    trains in bf16 the compiled stage took 0.62x the eager one's time, cold compile included;
    in fp32 it saved little (Ice Lake) or nothing (AVX2), and inductor needs a C++ compiler.
    GPUs stay eager until measured. (The demo itself trains eager: its compiled models
    completed fewer held-out facts.)"""
    if cfg.compile != "auto":
        return bool(cfg.compile)
    return device.type == "cpu" and amp_dtype == torch.bfloat16 and cpp_compiler() is not None


@contextlib.contextmanager
def ordered_cpu_kernels() -> Iterator[None]:
    """Compile CPU kernels that add in a fixed order, for as long as the block runs.

    Inductor's CPU kernel for the embedding's gradient adds rows with atomic adds, in whatever
    order the threads get there: two compiled runs of the demo with one seed parted by the 4th
    step (each pair tried), where eager runs are bit for bit the same. With PyTorch's
    deterministic mode on while it compiles, inductor calls ATen's ordered kernel instead; then
    6 of 7 runs gave the same losses (the odd one differed from the first forward pass: another
    cause, not found). No slower in the one full demo run measured (21.6k against 18.3-19.1k
    tokens/s). `warn_only`: no eager CPU op is refused, and new memory is not filled with NaN
    (a cost deterministic mode adds otherwise).
    """
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None for plain fp32. `bf16` on a CPU that would only emulate it
    trains in fp32 instead, with a warning: a demo config must not become 50x slower."""
    if cfg.dtype == "bf16":
        if device.type == "cpu" and not cpu_has_fast_bf16():
            print("dtype bf16: this CPU has no bf16 matrix multiply in hardware (AVX512_BF16 "
                  "or AMX), so bf16 would run 3-60x slower than fp32; training in fp32.",
                  file=sys.stderr)
            return None
        return torch.bfloat16
    if cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; TF32 is half of these.
GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                 ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
                 ("4090", 165e12), ("3090", 71e12)]
_measured_peak: dict[tuple[str, torch.dtype], float] = {}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32,
                        n: int = 1024, seconds: float = 0.5, again: bool = False) -> float:
    """FLOP/s of a square matmul on this device: the practical peak MFU is measured against.

    The best of many short timings, not their mean: a busy moment (another process, the OS)
    only slows a timing down, and a peak measured too low would put MFU above 100%. Measured
    once per process; `again` measures once more and keeps the better of the two (for a peak
    measured while another process kept the cores busy).
    """
    key = (str(device), dtype)
    if again or key not in _measured_peak:
        # A generator of its own: drawing from the global one would shift a run's randomness
        # (dropout, embedding noise) by when this process measured the peak (after the seed in
        # a fresh run, after the restored state in a resumed one), so a resume would not be exact.
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        for _ in range(3):
            a @ b
        _sync(device)
        best, start = 0.0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            for _ in range(2):
                a @ b
            _sync(device)
            best = max(best, 2 * 2 * n**3 / (time.perf_counter() - t0))
        _measured_peak[key] = max(best, _measured_peak.get(key, 0.0))
    return _measured_peak[key]


def peak_flops(cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None,
               remeasure: bool = False) -> float:
    """The configured peak, a GPU's data-sheet peak, or a measured one (`remeasure`: measure
    it again, see `measure_matmul_peak`)."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf16 in GPU_PEAK_BF16:
            if key in name:
                return bf16 if dtype == torch.bfloat16 else bf16 / 2
    return measure_matmul_peak(device, dtype or torch.float32, again=remeasure)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (>= 2-D: linear weights, embeddings); not norms' gains or biases."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   ) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kw: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "muon":
        from kotonoha.train.muon import MuonAdamW, hidden_matrices

        muon_ids = hidden_matrices(model)
        split = [{**g, "params": [p for p in g["params"] if (id(p) in muon_ids) == muon],
                  "muon": muon} for muon in (True, False) for g in groups]
        fast_bf16 = ((device.type == "cuda" and torch.cuda.is_bf16_supported())
                     or (device.type == "cpu" and cpu_has_fast_bf16()))
        return MuonAdamW([g for g in split if g["params"]], **kw,
                         ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    # Fused kernels exist for CUDA and CPU; MPS and others use the default (foreach) path.
    if device.type in ("cuda", "cpu"):
        with contextlib.suppress(RuntimeError, TypeError):
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _tokens_in(batch: Batch) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return first.numel() if isinstance(first, torch.Tensor) else 0


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start a fresh run over an existing one (call before writing anything)."""
    if not resume and (run_dir / "train_state" / "latest.json").exists():
        raise UserError(f"{run_dir} already holds a training run; pass --resume to continue "
                        "it, or choose another output directory.")


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Optimises `model` on `loss_fn` over batches from `get_batch`; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, run_dir: str | Path, *,
                 get_batch: GetBatch, loss_fn: LossFn,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 export: Callable[[dict[str, torch.Tensor], int], None] | None = None,
                 flops_per_token: float | None = None, tokens_per_step: int | None = None,
                 dist_info: Dist | None = None, stage_config: Any = None) -> None:
        self.cfg = cfg
        self.stage_config = stage_config  # the whole stage config: fit() writes config.yaml
        self.run_dir = Path(run_dir)
        self.get_batch, self.loss_fn, self.evaluate, self.export = (get_batch, loss_fn,
                                                                    evaluate, export)
        self.dist = d = dist_info or init_distributed(cfg.device)
        self.device = d.device
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step

        if cfg.batch_size % d.world_size:
            raise UserError(f"batch_size={cfg.batch_size} must be divisible by the number of "
                            f"processes ({d.world_size}).")
        per_rank = cfg.batch_size // d.world_size
        self.micro = cfg.micro_batch_size or per_rank
        if per_rank % self.micro:
            raise UserError(f"micro_batch_size={self.micro} must divide the {per_rank} "
                            f"sequences each of the {d.world_size} process(es) gets per step.")
        self.accum = per_rank // self.micro
        first = d.rank * per_rank
        self.micro_rows = [range(first + i * self.micro, first + (i + 1) * self.micro)
                           for i in range(self.accum)]

        if self.device.type == "cpu":
            keep_freed_memory()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" on GPUs means TF32 matmuls
            torch.backends.cudnn.allow_tf32 = True
        self.raw_model = model.to(self.device)
        self.model = self._wrap(model)
        self.optimizer = make_optimizer(self.raw_model, cfg, self.device)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.last: dict[str, float] = {}
        torch.manual_seed(cfg.seed + 1000 * d.rank)  # dropout differs per rank, reproducibly

    # --- setup ------------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        d, cfg = self.dist, self.cfg
        if d.world_size > 1 and cfg.parallel == "none":
            raise UserError("Started with several processes but parallel=none; use parallel=ddp "
                            "or parallel=fsdp (or launch a single process).")
        if d.world_size > 1 and cfg.parallel == "fsdp":
            if cfg.optimizer == "muon":
                raise UserError("optimizer=muon needs whole weight matrices on every process; "
                                "use parallel=ddp (FSDP shards them).")
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (d.world_size,))
            # Shard each block, then the root (embeddings, final norm, head): a block's
            # parameters are gathered just before it runs and freed right after.
            for block in getattr(model, "blocks", []):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped: nn.Module = model
        elif d.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda"
                          else None)
        else:
            wrapped = model
        self.compiled = compile_pays(cfg, self.device, self.amp_dtype)
        if self.compiled:
            if d.is_main and cfg.progress:
                print("torch.compile: the first steps wait while the model compiles.",
                      file=sys.stderr)
            wrapped.compile()  # in place: parameter names (and checkpoints) stay unchanged
        return wrapped

    def _sync_context(self, last_micro: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.accum == 1 or self.dist.world_size == 1:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return contextlib.nullcontext() if last_micro else self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train to `cfg.steps`; with `resume`, continue from the last checkpoint if any."""
        cfg, d = self.cfg, self.dist
        check_run_dir(self.run_dir, resume)
        if resume:
            self.load_checkpoint()
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Only once the checkpoint has loaded: a resume refused for another model shape or
            # batch size leaves the config the run was trained with.
            if self.stage_config is not None:
                atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.stage_config))
            self._trim_metrics()
        peak = peak_flops(cfg, self.device, self.amp_dtype) if self.flops_per_token else None
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(tqdm(
                total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and d.is_main), file=sys.stderr))
            metrics_file = (stack.enter_context(open(self.run_dir / "metrics.jsonl", "a",
                                                     encoding="utf-8"))
                            if d.is_main else None)
            if self.compiled and self.device.type == "cpu":
                stack.enter_context(ordered_cpu_kernels())
            self._loop(bar, metrics_file, peak)
        if cfg.plot and d.is_main:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return dict(self.last)

    def _loop(self, bar: tqdm, metrics_file: Any, peak: float | None) -> None:
        cfg, d = self.cfg, self.dist
        self.model.train()
        window_t0, window_tokens = time.perf_counter(), 0
        remeasured = False
        # Not the step a resume loaded: its run may have died while exporting the model (the
        # checkpoint commits first), so a run resumed at its final step saves and exports again.
        saved_at = -1
        while self.step < cfg.steps:
            lr = lr_at(cfg, self.step)
            loss_sum, extra, grad_norm, step_tokens = self.train_step()
            window_tokens += step_tokens
            bar.update(1)

            last_step = self.step == cfg.steps
            if self.step % cfg.log_interval == 0 or last_step:
                _sync(self.device)
                now = time.perf_counter()
                dt = now - window_t0
                self.elapsed += dt
                loss_val, *extra_vals = d.all_sum([loss_sum.item() / self.accum,
                                                   *extra.values()])
                rec = {"step": self.step, "loss": loss_val / d.world_size, "lr": lr,
                       "tokens": self.tokens_seen, "tok_per_s": window_tokens / dt,
                       "elapsed_s": self.elapsed,
                       **{k: v / d.world_size for k, v in zip(extra, extra_vals)}}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if peak and self.flops_per_token:
                    rec["mfu"] = rec["tok_per_s"] * self.flops_per_token / (peak * d.world_size)
                    if rec["mfu"] > 1 and not remeasured:
                        # Above 100%: the peak was measured while something else was busy.
                        # Measure it once more (outside the throughput window) and keep the best.
                        peak = peak_flops(cfg, self.device, self.amp_dtype, remeasure=True)
                        rec["mfu"] = (rec["tok_per_s"] * self.flops_per_token
                                      / (peak * d.world_size))
                        remeasured = True
                self._log(metrics_file, rec)
                post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tok_per_s']:,.0f}"}
                if "mfu" in rec:
                    post["mfu"] = f"{100 * rec['mfu']:.1f}%"
                bar.set_postfix(post, refresh=False)
                window_tokens = 0
                window_t0 = time.perf_counter()
            evaluate = self.evaluate is not None and (
                last_step or bool(cfg.eval_interval and self.step % cfg.eval_interval == 0))
            checkpoint = last_step or bool(cfg.checkpoint_interval
                                           and self.step % cfg.checkpoint_interval == 0)
            if evaluate or checkpoint:
                # Not training throughput: the window's clock skips the pause (the window may
                # hold steps since the last log line, whose device work must finish first).
                _sync(self.device)
                paused = time.perf_counter()
                if evaluate:
                    rec = {"step": self.step, **self.run_eval()}
                    self._log(metrics_file, rec)
                    if d.is_main:
                        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                           else f"{k}={v}" for k, v in rec.items()))
                if checkpoint:
                    self.save_checkpoint()
                    saved_at = self.step
                window_t0 += time.perf_counter() - paused
        if saved_at != self.step:  # e.g. resumed at the final step: still export the model
            self.save_checkpoint()

    def train_step(self) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None, int]:
        """One optimizer step at `self.step`: (summed micro-batch losses, mean extra metrics,
        gradient norm, tokens). Nothing here waits for the device, so GPUs stay busy."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        loss_sum = torch.zeros((), device=self.device)
        extra: dict[str, float] = {}
        tokens = 0
        for i, rows in enumerate(self.micro_rows):
            batch = _to_device(self.get_batch(self.step, rows), self.device)
            tokens += _tokens_in(batch)
            with self._sync_context(i == self.accum - 1), self.autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            (loss / self.accum).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / self.accum
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = self.tokens_per_step or tokens * self.dist.world_size
        self.tokens_seen += tokens
        return loss_sum, extra, grad_norm, tokens

    def run_eval(self) -> dict[str, float]:
        assert self.evaluate is not None
        self.model.eval()
        # Eager even in a compiled run: the no-grad forward would be a second graph to compile
        # (27 s cold for the demo on a 2-core CPU, against under a second per evaluation).
        with torch.no_grad(), self.autocast(), torch.compiler.set_stance("force_eager"):
            out = self.evaluate(self.model)
        self.model.train()
        self.last.update(out)
        return out

    def _log(self, f: Any, rec: dict[str, Any]) -> None:
        self.last.update({k: v for k, v in rec.items() if isinstance(v, int | float)})
        if f is not None:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def _trim_metrics(self) -> None:
        """After a resume, drop log lines from steps the crashed run did past its checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("step", 0) <= self.step:
                    kept.append(line + "\n")
        atomic_write_bytes(path, "".join(kept).encode())

    # --- checkpoints ------------------------------------------------------------------------

    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Full (unsharded) tensors on the CPU: one format for plain, DDP and FSDP runs, so a
        # run may resume on a different number of GPUs.
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.raw_model, options=opts)
        optim_sd = get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        return model_sd, optim_sd

    def _frozen_names(self) -> set[str]:
        """State-dict names of the weights nothing trains (a LoRA run's base model)."""
        trained = {id(p) for p in self.raw_model.parameters() if p.requires_grad}
        return {name for name, p in self.raw_model.named_parameters(remove_duplicate=False)
                if id(p) not in trained}

    def save_checkpoint(self) -> Path:
        d = self.dist
        state_dir = self.run_dir / "train_state"
        step_dir = state_dir / f"step_{self.step:08d}"
        model_sd, optim_sd = self._state_dicts()  # collective under FSDP: every rank calls it
        step_dir.mkdir(parents=True, exist_ok=True)
        _save_rng(step_dir / f"rng_rank{d.rank}.pt", self.device)
        if d.is_main:
            # Frozen weights are not saved: a resume rebuilds them from the run's own model
            # source, as the run began. For LoRA on a 270M model that is a few MB, not 1.7 GB.
            frozen = self._frozen_names()
            save_safetensors_atomic({k: v for k, v in model_sd.items() if k not in frozen},
                                    step_dir / "model.safetensors")
            buf = io.BytesIO()
            torch.save(optim_sd, buf)
            atomic_write_bytes(step_dir / "optimizer.pt", buf.getvalue())
            atomic_write_json(step_dir / "state.json", {
                "step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                "world_size": d.world_size, "train_config": asdict(self.cfg)})
        d.barrier()  # every rank's files are in place before the pointer moves
        if d.is_main:
            atomic_write_json(state_dir / "latest.json", {"step": self.step,
                                                          "dir": step_dir.name})
            for old in state_dir.glob("step_*"):
                if old != step_dir:
                    shutil.rmtree(old, ignore_errors=True)
            if self.export is not None:
                self.export(model_sd, self.step)
        d.barrier()
        return step_dir

    def load_checkpoint(self) -> bool:
        """Restore the latest checkpoint; False (and a fresh start) when there is none."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        latest = self.run_dir / "train_state" / "latest.json"
        if not latest.exists():
            if self.dist.is_main:
                print(f"No checkpoint in {self.run_dir}; starting from step 0.", file=sys.stderr)
            return False
        pointer = json.loads(latest.read_text(encoding="utf-8"))
        step_dir = latest.parent / pointer["dir"]
        state = json.loads((step_dir / "state.json").read_text(encoding="utf-8"))
        saved_batch = state["train_config"]["batch_size"]
        if saved_batch != self.cfg.batch_size:
            raise UserError(f"The checkpoint was trained with batch_size={saved_batch}; resume "
                            f"with the same batch_size (got {self.cfg.batch_size}).")
        saved_optimizer = state["train_config"].get("optimizer", "adamw")
        if saved_optimizer != self.cfg.optimizer:
            raise UserError(f"The checkpoint was trained with optimizer={saved_optimizer}; "
                            f"resume with the same optimizer (got {self.cfg.optimizer}).")
        model_sd = read_safetensors(step_dir / "model.safetensors")
        # A checkpoint without the frozen weights (see save_checkpoint) loads non-strictly,
        # but it must hold every trained weight and nothing else.
        frozen = self._frozen_names()
        expected = set(self.raw_model.state_dict()) - frozen
        partial = bool(frozen) and set(model_sd) == expected
        opts = StateDictOptions(full_state_dict=True, strict=not partial)
        # weights_only: an optimizer state is tensors, numbers and strings; never run code.
        optim_sd = torch.load(step_dir / "optimizer.pt", map_location="cpu", weights_only=True)
        try:
            set_model_state_dict(self.raw_model, model_sd, options=opts)
            set_optimizer_state_dict(self.raw_model, self.optimizer, optim_sd, options=opts)
        except (RuntimeError, KeyError, ValueError) as e:  # other tensors: names or shapes
            raise UserError(f"The checkpoint in {self.run_dir} was trained with a different "
                            "model shape; resume with the same model settings or start a new "
                            "out=.") from e
        rng = step_dir / f"rng_rank{self.dist.rank}.pt"
        if rng.exists():  # absent when resuming on more ranks than the run had
            _load_rng(rng, self.device)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed = float(state["elapsed_s"])
        if self.dist.is_main:
            print(f"Resumed {self.run_dir} at step {self.step}.", file=sys.stderr)
        return True


def _save_rng(path: Path, device: torch.device) -> None:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_rng(path: Path, device: torch.device) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), float(cached)))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, list | tuple) else x


# ---------------------------------------------------------------------------------------------
# Metrics


def read_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                yield json.loads(line)


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Training (and validation) loss against step, written atomically as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    train = [(r["step"], r["loss"]) for r in read_metrics(metrics_path) if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in read_metrics(metrics_path) if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(png_path, buf.getvalue())


# ---- entry points shared by every stage ----------------------------------------------


def stage_main(run: Callable[[Any, bool], Path], cfg: Any, resume: bool) -> Path:
    try:
        return run(cfg, resume)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def module_main(entry: Callable[[str | None, list[str], bool], Any], prog: str,
                argv: list[str] | None = None) -> int:
    """`python -m kotonoha.<module> --config X [--resume] [key=value ...]` for a stage, the
    pipeline or the scaling sweep (what torchrun launches)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config")
    p.add_argument("--resume", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    try:
        entry(args.config, args.overrides, args.resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
