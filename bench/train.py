"""Training throughput: kotonoha's trainer step vs a plain nanoGPT-style step, same shapes.

    python bench/train.py                          # demo shapes on the CPU
    python bench/train.py --untied                 # ... with configs/demo.yaml's untied head
    python bench/train.py --device cuda --preset gpt2 --batch-size 16 --json

For each mode (eager / torch.compile) x dtype (fp32 / bf16 autocast) it times, alternating
step by step after `--warmup` untimed steps (compilation happens there), the median of
`--steps` optimizer steps of

- kotonoha: `Trainer.train_step` on `Transformer(preset)`, the code path `kotonoha pretrain`
  runs (AdamW, clipping, autocast, accumulation bookkeeping);
- reference: a minimal GPT written below in the nanoGPT style (LayerNorm, learned positions,
  GELU MLP, fused QKV, tied head) with the same layers / width / heads / vocab / context, and
  nanoGPT's step (autocast forward, backward, clip, fused AdamW, zero_grad).

MFU uses the training FLOPs per token of each model (6N + attention, `flops_per_token`) and a
matmul peak measured in the same run on the same device and dtype (the best of several short
square-matmul timings; on CUDA the data-sheet peak is reported too). Batches are random tokens made on the CPU and copied to the device, for both.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kotonoha.model import ModelConfig, Transformer, flops_per_token, preset
from kotonoha.train.loop import (
    Dist,
    TrainConfig,
    Trainer,
    cpu_has_fast_bf16,
    make_optimizer,
    peak_flops,
    resolve_device,
)
from kotonoha.train.pretrain import lm_loss

# --- the reference: nanoGPT's model, condensed ------------------------------------------------


class RefAttention(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = RefAttention(d, n_head)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)
        self.h = nn.ModuleList(RefBlock(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# --- timing -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(vocab: int, batch: int, ctx: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        data = torch.randint(0, vocab, (batch, ctx + 1), generator=g)
        out.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, tries: int = 20) -> float:
    """Best FLOP/s of a square matmul over several short tries (a peak is a maximum)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(tries + 2):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 8 * n**3 / (time.perf_counter() - t0))
    return best


def time_interleaved(steps: dict[str, Any], warmup: int, n: int,
                     device: torch.device) -> dict[str, float]:
    """Median seconds per step of each stepper, timed in alternation after `warmup` steps.

    Alternating step by step means a busy neighbour slows both sides alike; the median drops
    the steps that got descheduled.
    """
    for step in steps.values():
        for i in range(warmup):  # compilation happens here
            step(i)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup, warmup + n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(i)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def kotonoha_step(cfg: ModelConfig, args: argparse.Namespace, device: torch.device,
                  compiled: bool, dtype: str, data: list, run_dir: str) -> Any:
    torch.manual_seed(0)
    tcfg = TrainConfig(steps=10**9, batch_size=args.batch_size, lr=3e-4, warmup_steps=10,
                       device=str(device), dtype=dtype, compile=compiled, progress=False)
    trainer = Trainer(Transformer(cfg), tcfg, run_dir,
                      get_batch=lambda step, rows: data[step % len(data)], loss_fn=lm_loss,
                      dist_info=Dist(device=device))
    trainer.model.train()
    return lambda i: trainer.train_step()


def reference_step(cfg: ModelConfig, args: argparse.Namespace, device: torch.device,
                   compiled: bool, dtype: str, data: list) -> Any:
    torch.manual_seed(0)
    raw = RefGPT(cfg).to(device)
    model: nn.Module = torch.compile(raw) if compiled else raw  # nanoGPT: model = compile(model)
    opt = make_optimizer(raw, TrainConfig(lr=3e-4), device)  # fused AdamW, same decay groups
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
           else torch.autocast(device.type, enabled=False))

    def step(i: int) -> None:
        x, y = data[i % len(data)]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp:
            loss = model(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, default=None, help="default: the preset's")
    p.add_argument("--untied", action="store_true",
                   help="kotonoha's model with an output head of its own, as configs/demo.yaml "
                        "trains it (the reference keeps nanoGPT's tied head)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 CPU/50 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 / 10)")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = p.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.steps = args.steps or (50 if gpu else 10)
    args.warmup = args.warmup or (10 if gpu else 3)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # both models: fp32 means TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True

    cfg = preset(args.preset)
    if args.context:
        cfg = replace(cfg, context_length=args.context)
    if args.untied:
        cfg = replace(cfg, tie_embeddings=False)
    T = cfg.context_length
    ref_cfg = ModelConfig(vocab_size=cfg.vocab_size, context_length=T, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, d_model=cfg.d_model)  # GPT-2 style, 4x GELU MLP
    flops = {"kotonoha": flops_per_token(cfg, T)["training"],
             "nanogpt": flops_per_token(ref_cfg, T)["training"]}
    data = batches(cfg.vocab_size, args.batch_size, T, 8)
    tokens = args.batch_size * T
    n_params = sum(p.numel() for p in Transformer(cfg).parameters())

    rows: list[dict[str, Any]] = []
    peaks: dict[str, float] = {}
    dtypes = args.dtypes.split(",")
    if not gpu and "bf16" in dtypes and not cpu_has_fast_bf16():
        # bf16 without AVX512_BF16 or AMX runs 3-60x slower than fp32: nothing worth timing.
        print("bf16 skipped: this CPU has no bf16 matrix multiply in hardware (AVX512_BF16, AMX)",
              file=sys.stderr)
        dtypes.remove("bf16")
    for dtype in dtypes:
        tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        peaks[dtype] = matmul_peak(device, tdtype, n=4096 if gpu else 1024)
        sheet = (peak_flops(TrainConfig(), device, tdtype if dtype == "bf16" else None)
                 if gpu else None)
        for mode in args.modes.split(","):
            compiled = mode == "compiled"
            with tempfile.TemporaryDirectory() as tmp:
                steppers = {
                    "nanogpt": reference_step(ref_cfg, args, device, compiled, dtype, data),
                    "kotonoha": kotonoha_step(cfg, args, device, compiled, dtype, data, tmp),
                }
                secs = time_interleaved(steppers, args.warmup, args.steps, device)
            for name, sec in secs.items():
                row = {"model": name, "mode": mode, "dtype": dtype, "ms_per_step": 1e3 * sec,
                       "tok_per_s": tokens / sec, "mfu": tokens / sec * flops[name] / peaks[dtype]}
                if sheet:
                    row["mfu_datasheet"] = tokens / sec * flops[name] / sheet
                rows.append(row)
                print(f"  {name:8s} {mode:8s} {dtype}: {row['tok_per_s']:,.0f} tok/s",
                      file=sys.stderr)
            del steppers
    for r in rows:
        ref = next(x for x in rows if x["model"] == "nanogpt" and x["mode"] == r["mode"]
                   and x["dtype"] == r["dtype"])
        r["vs_nanogpt"] = r["tok_per_s"] / ref["tok_per_s"]

    info = {
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": args.preset,
        "untied": args.untied,
        "shapes": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
                   "vocab": cfg.vocab_size, "context": T, "batch": args.batch_size},
        "params": n_params, "flops_per_token": flops, "matmul_peak_flops": peaks,
        "steps": args.steps, "warmup": args.warmup, "rows": rows,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"device: {info['device']} ({info['threads']} threads), torch {torch.__version__}; "
          f"preset {args.preset}{' (untied head)' if args.untied else ''}: "
          f"{n_params / 1e6:.2f}M params, {cfg.n_layer} layers x "
          f"{cfg.d_model}, vocab {cfg.vocab_size}, batch {args.batch_size} x {T}; "
          "measured matmul peak "
          + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()) + "\n")
    extra = " MFU (data sheet) |" if any("mfu_datasheet" in r for r in rows) else ""
    print(f"| model | mode | dtype | tok/s | ms/step | MFU (measured peak) |{extra} vs nanoGPT |")
    print("|---|---|---|---:|---:|---:|" + ("---:|" if extra else "") + "---:|")
    for r in rows:
        sheet_col = f" {100 * r['mfu_datasheet']:.1f}% |" if extra else ""
        print(f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['tok_per_s']:,.0f} | "
              f"{r['ms_per_step']:.1f} | {100 * r['mfu']:.1f}% |{sheet_col} "
              f"{r['vs_nanogpt']:.2f}x |")
    return 0 if all(math.isfinite(r["tok_per_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
