"""A real model on a laptop CPU: kotonoha vs transformers vs llama.cpp on SmolLM2-135M.

    python bench/real_models.py                 # all systems, 2 threads, markdown table
    python bench/real_models.py --runs 5 --json runs/bench/real_models.json

Every system runs the same 128 prompt token ids and greedily generates 128 new tokens
(end-of-text ignored) from the same GGUF file (`--model`, default the packaged `smollm2`):

- kotonoha: `load_gguf` (dequantized to fp32 or bf16, or then quantized again to int8 or int4
  weights by `kotonoha.quantize`) and the `Engine`, eager and with `compile=True`;
- transformers: `AutoModelForCausalLM.from_pretrained(gguf_file=...)` (dequantized, fp32)
  and `generate`;
- llama.cpp through llama-cpp-python (skipped if not installed), running the file's own
  quantized weights: `eval` of the prompt, then sample + `eval` per token.

prefill tok/s = prompt tokens / time to first token; decode tok/s = (new tokens - 1) / time
of the rest. Each system runs in its own subprocess (so peak RSS is its own), with one warm-up
run (and compilation) and the median of --runs timed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SYSTEMS = [f"kotonoha {w} {mode}" for w in ("fp32", "bf16", "int8", "int4")
           for mode in ("eager", "compiled")] + ["transformers fp32", "llama.cpp"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prompt_ids(model: str, n: int) -> list[int]:
    """The first n tokens of the bundled English sample text, by the model's own tokenizer."""
    from kotonoha.convert.gguf import GGUFFile, tokenizer_from_gguf
    from kotonoha.tokenizer import sample_text_paths

    tok = tokenizer_from_gguf(GGUFFile(model))
    ids = tok.encode(sample_text_paths()[0].read_text(encoding="utf-8"))
    if len(ids) < n:
        raise SystemExit(f"The sample text has only {len(ids)} tokens; use --prompt-len <= that.")
    return ids[:n]


def timed(run: Callable[[], tuple[float, float]], runs: int) -> dict:
    t = time.perf_counter()
    run()  # warm-up (and compilation)
    warmup = time.perf_counter() - t
    ttft, rest = zip(*(run() for _ in range(runs)))
    return {"ttft_s": statistics.median(ttft), "rest_s": statistics.median(rest),
            "warmup_s": warmup}


# --------------------------------------------------------------------------- the systems


def run_kotonoha(model: str, ids: list[int], new: int, runs: int, weights: str,
                 compiled: bool) -> dict:
    import torch

    from kotonoha.convert.gguf import load_gguf
    from kotonoha.engine import Engine
    from kotonoha.quantize import quantize_model
    from kotonoha.sampling import SamplingParams

    t = time.perf_counter()
    m, tok = load_gguf(model, dtype=torch.bfloat16 if weights == "bf16" else torch.float32)
    if weights in ("int8", "int4"):
        m = quantize_model(m, weights)
    load_s = time.perf_counter() - t
    engine = Engine(m, tok, max_batch_size=1, max_seq_len=len(ids) + new, compile=compiled)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)

    def run() -> tuple[float, float]:
        engine.submit(ids, params)
        t0 = time.perf_counter()
        engine.step()  # prefill + the first token
        t1 = time.perf_counter()
        while engine.has_work():
            engine.step()
        return t1 - t0, time.perf_counter() - t1

    return {**timed(run, runs), "load_s": load_s}


def run_transformers(model: str, ids: list[int], new: int, runs: int) -> dict:
    import torch
    import transformers

    path = Path(model)
    t = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    x = torch.tensor([ids])
    mask = torch.ones_like(x)

    @torch.inference_mode()
    def gen(n: int) -> float:
        t = time.perf_counter()
        hf.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0)
        return time.perf_counter() - t

    # Prefill = generate(1 token); decode = the difference to generate(all).
    def run() -> tuple[float, float]:
        first = gen(1)
        return first, gen(new) - first

    return {**timed(run, runs), "load_s": load_s}


def run_llama_cpp(model: str, ids: list[int], new: int, runs: int, threads: int) -> dict:
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_ctx=len(ids) + new, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t

    def run() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = llm.sample(top_k=1, temp=0.0)
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = llm.sample(top_k=1, temp=0.0)
        return t1 - t0, time.perf_counter() - t1

    return {**timed(run, runs), "load_s": load_s, "version": llama_cpp.__version__}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    ids = json.loads(args.ids)
    name = args.worker
    if name.startswith("kotonoha"):
        _, weights, mode = name.split()
        out = run_kotonoha(args.model, ids, args.new_tokens, args.runs, weights,
                           mode == "compiled")
    elif name == "transformers fp32":
        out = run_transformers(args.model, ids, args.new_tokens, args.runs)
    else:
        out = run_llama_cpp(args.model, ids, args.new_tokens, args.runs, args.threads)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


# --------------------------------------------------------------------------- orchestration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a .gguf file or a packaged name")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS, metavar="SYSTEM",
                    help=f"which to run (default all): {', '.join(SYSTEMS)}")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    from kotonoha.models import resolve

    args.model = str(resolve(args.model))
    ids = prompt_ids(args.model, args.prompt_len)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict] = {}
    load_before = os.getloadavg()[0]  # other work on the machine skews every number
    for name in args.systems:
        if name == "llama.cpp":
            import importlib.util

            if importlib.util.find_spec("llama_cpp") is None:
                print("llama.cpp: skipped (pip install llama-cpp-python to include it)",
                      file=sys.stderr)
                continue
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model,
               "--ids", json.dumps(ids), "--new-tokens", str(args.new_tokens),
               "--runs", str(args.runs), "--threads", str(args.threads)]
        print(f"{name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(line.removeprefix("RESULT "))
        r["prefill_tok_s"] = args.prompt_len / r["ttft_s"]
        r["decode_tok_s"] = (args.new_tokens - 1) / r["rest_s"]
        results[name] = r

    import torch

    print(f"\n`python bench/real_models.py --prompt-len {args.prompt_len} --new-tokens "
          f"{args.new_tokens} --runs {args.runs} --threads {args.threads}`\n")
    print(f"{cpu_name()}, {args.threads} threads; torch {torch.__version__}; "
          f"{Path(args.model).name}; greedy, median of {args.runs} runs after a warm-up; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    ref = results.get("transformers fp32")
    lcpp = results.get("llama.cpp")
    print("| system | prefill tok/s | decode tok/s | decode vs transformers "
          "| decode vs llama.cpp | prefill vs transformers | peak RSS MiB | load s | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(a: dict, b: dict | None, key: str) -> str:
        return f"{a[key] / b[key]:.2f}x" if b else "-"

    for name, r in results.items():
        print(f"| {name} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} "
              f"| {ratio(r, ref, 'decode_tok_s')} | {ratio(r, lcpp, 'decode_tok_s')} "
              f"| {ratio(r, ref, 'prefill_tok_s')} | {r['peak_rss_mib']:,.0f} "
              f"| {r['load_s']:.1f} | {r['warmup_s']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_name(), "args": {
            k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
