"""Generation speed of the engine: prefill and decode tokens per second, eager vs compiled.

    python bench/decode.py --preset demo --threads 2
    python bench/decode.py --preset smollm2-135m --device cuda --dtype bfloat16 --batch 8

Random weights (speed does not depend on them), greedy decoding with `ignore_eos` so every
run produces exactly --new-tokens tokens per row. Each mode gets one warm-up run (which is
also when torch.compile compiles), then --runs timed runs; the table shows medians.

prefill tok/s = batch x prompt-len / time of the first `step()` (which prefills every row and
also runs the first decode step, i.e. time to first token); decode tok/s = batch x
(new-tokens - 1) / time of the remaining steps.

References measured in the same run: `bare loop` (one batched prefill, then model + argmax
over the same static cache: what the engine's bookkeeping costs) and, with `--reference hf`,
`transformers` generate on a Llama of the same shapes (Llama-shaped presets only).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kotonoha.engine import Engine, cache_dtype
from kotonoha.model import KVCache, Transformer, preset
from kotonoha.sampling import SamplingParams


class NumberTokenizer:
    """Stands in for a real tokenizer: decoding costs about as little as a real one's."""

    stop_ids: list[int] = []

    def decode(self, ids: list[int]) -> str:
        return "".join(f" {i}" for i in ids)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
    """(seconds to first token, seconds for the rest) for one batch through the engine."""
    for p in prompts:
        engine.submit(p, params)
    sync(engine.device)
    t0 = time.perf_counter()
    engine.step()
    sync(engine.device)
    t1 = time.perf_counter()
    n = 1
    while engine.has_work():
        engine.step()
        n += 1
    sync(engine.device)
    t2 = time.perf_counter()
    assert n == params.max_tokens, (n, params.max_tokens)
    return t1 - t0, t2 - t1


def bench_mode(model: Transformer, args: argparse.Namespace, compiled: bool) -> dict:
    engine = Engine(model, NumberTokenizer(), max_batch_size=args.batch,
                    max_seq_len=args.prompt_len + args.new_tokens, compile=compiled)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (args.batch, args.prompt_len),
                            generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    return timed("engine, compiled" if compiled else "engine, eager", args,
                 lambda: one_run(engine, prompts, params))


@torch.inference_mode()
def bench_bare(model: Transformer, args: argparse.Namespace) -> dict:
    """The floor under the engine: one batched prefill, then a plain argmax loop over the same
    static cache (no per-row settings, text, stops or bookkeeping); gpt-fast's shape."""
    device = next(model.parameters()).device
    cache = KVCache(model.cfg, args.batch, args.prompt_len + args.new_tokens, device,
                    cache_dtype(device, next(model.parameters()).dtype))  # as the engine
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (args.batch, args.prompt_len),
                            generator=g).to(device)

    def run() -> tuple[float, float]:
        sync(device)
        t0 = time.perf_counter()
        pos = torch.arange(args.prompt_len, device=device).expand(args.batch, -1)
        tok = model(prompts, positions=pos, cache=cache, kv_len=args.prompt_len)[:, -1:]
        tok = tok.argmax(-1)
        sync(device)
        t1 = time.perf_counter()
        for p in range(args.prompt_len, args.prompt_len + args.new_tokens - 1):
            pos = torch.full((args.batch, 1), p, device=device)
            kv_len = min(cache.max_len, 64 * math.ceil((p + 1) / 64))
            tok = model(tok, positions=pos, cache=cache, kv_len=kv_len)[:, -1:].argmax(-1)
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    return timed("bare loop", args, run)


def hf_llama(model: Transformer):  # -> transformers.LlamaForCausalLM
    """The same shapes as a `transformers` Llama (random weights), for presets that are one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    if (c.norm, c.positions, c.mlp, c.bias, c.qk_norm, c.post_norms) != (
            "rmsnorm", "rope", "swiglu", False, False, False):
        raise SystemExit(f"--hf needs a Llama-shaped preset; {c.name} is not one.")
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                      num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                      num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
                      max_position_embeddings=c.context_length, rms_norm_eps=c.norm_eps,
                      rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                      attention_bias=False, mlp_bias=False)
    p = next(model.parameters())
    return LlamaForCausalLM(cfg).to(device=p.device, dtype=p.dtype).eval()


@torch.inference_mode()
def bench_hf(model: Transformer, args: argparse.Namespace) -> dict:
    """transformers' `generate` (greedy, its default dynamic cache) on the same shapes."""
    hf = hf_llama(model)
    device = next(hf.parameters()).device
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (args.batch, args.prompt_len),
                            generator=g).to(device)
    mask = torch.ones_like(prompts)

    def gen(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        hf.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    # Prefill = generate(1 token); decode = the difference to generate(all), per token.
    return timed("transformers", args, lambda: (first := gen(1), gen(args.new_tokens) - first))


def timed(mode: str, args: argparse.Namespace, run: Callable[[], tuple[float, float]]) -> dict:
    t = time.perf_counter()
    run()  # warm-up (and compilation)
    warmup = time.perf_counter() - t
    ttft, rest = zip(*(run() for _ in range(args.runs)))
    ttft_s, rest_s = statistics.median(ttft), statistics.median(rest)
    return {
        "mode": mode, "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "ttft_ms": 1000 * ttft_s,
        "prefill_tok_s": args.batch * args.prompt_len / ttft_s,
        "decode_tok_s": args.batch * (args.new_tokens - 1) / rest_s,
        "ms_per_step": 1000 * rest_s / (args.new_tokens - 1),
        "warmup_s": warmup,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", default="both", choices=["both", "on", "off"])
    ap.add_argument("--reference", default="bare", choices=["none", "bare", "hf", "both"],
                    help="also time a bare decode loop and/or transformers' generate")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (one for prefill, one or more to decode).")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    if args.prompt_len + args.new_tokens > cfg.context_length:
        ap.error(f"--prompt-len + --new-tokens exceeds the context of {cfg.context_length}.")
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(dtype=getattr(torch, args.dtype)).eval()

    modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    results = [bench_mode(model, args, compiled) for compiled in modes]
    if args.reference in ("bare", "both"):
        results.append(bench_bare(model, args))
    if args.reference in ("hf", "both"):
        results.append(bench_hf(model, args))

    machine = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "device": str(device), "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "preset": args.preset, "params": model.num_params(),
    }
    print(f"\n`python bench/decode.py --preset {args.preset} --batch {args.batch} "
          f"--prompt-len {args.prompt_len} --new-tokens {args.new_tokens} --runs {args.runs} "
          f"--threads {args.threads} --device {args.device} --dtype {args.dtype} "
          f"--compile {args.compile} --reference {args.reference}`\n")
    print(f"{machine['cpu']}, {machine['threads']} threads"
          + (f", {machine['gpu']}" if machine["gpu"] else "")
          + f"; torch {machine['torch']}; {args.preset} ({machine['params'] / 1e6:.1f}M params, "
          f"random weights), {args.dtype}\n")
    print("| mode | batch | prompt | new | prefill tok/s | decode tok/s | ms/step | TTFT ms "
          "| warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} "
              f"| {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} | {r['ms_per_step']:.2f} "
              f"| {r['ttft_ms']:.1f} | {r['warmup_s']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args) | {
            "json": str(args.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
