"""Serving throughput and latency: aggregate output tokens/s for 1, 4, 8, 16 concurrent
streaming clients against a live `kotonoha serve` on 127.0.0.1, with latency percentiles.

    python bench/serve.py                       # demo preset, random weights, on the CPU
    python bench/serve.py --model runs/sft --clients 1,8 --max-tokens 128

Without --model the server runs the `demo` preset with random weights (speed does not depend
on the weights) and a BPE trained on the bundled sample text (4096 asked for; the small
sample saturates near 2.3k). Each client sends
--requests streaming /v1/completions requests one after another (temperature 0.8, its own
seed, `ignore_eos` so each yields exactly --max-tokens tokens). The server and the clients
share the machine, so on a small CPU the clients' own work is part of what is measured.

aggregate tok/s = completion tokens of all clients / wall time of the round; latency = time
from sending a request to its last token; TTFT = time to the first streamed token; ITL = mean
gap between tokens within a request. The goal: >= 3x the aggregate throughput at 8 clients as
at 1 (continuous batching shares each decode step between the active requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The river that runs through the capital", "Once upon a time, in a small village",
           "首都の近くを流れる川は", "The price of bread at the market was",
           "Two friends went to a café and", "昔々、ある小さな村に"]


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, seed: int,
                      max_tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed,
            "temperature": 0.8, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, stamps, tokens = None, [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                stamps.append(now)
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens,
            "itl": statistics.fmean(gaps) if gaps else 0.0}


async def run_round(url: str, model: str, clients: int, requests: int,
                    max_tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(c: int) -> list[dict[str, float]]:
            return [await one_request(client, model, PROMPTS[(c + i) % len(PROMPTS)],
                                      seed=1000 * c + i, max_tokens=max_tokens)
                    for i in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients)))
                   for r in rs]
        wall = time.perf_counter() - start
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    itl = [r["itl"] for r in results]
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": total, "wall_s": wall,
            "tok_per_s": total / wall,
            **{f"latency_p{q}": percentile(lat, q) for q in (50, 90, 99)},
            **{f"ttft_p{q}": percentile(ttft, q) for q in (50, 90, 99)},
            "itl_p50": percentile(itl, 50)}


def demo_model(directory: Path) -> Path:
    """The demo preset with random weights and a tokenizer trained on the sample text."""
    import torch

    from kotonoha.checkpoint import save_model
    from kotonoha.model import Transformer, preset
    from kotonoha.tokenizer import sample_text_paths, train_bpe_from_files

    tok = train_bpe_from_files(sample_text_paths(), 4096)
    torch.manual_seed(0)
    model = Transformer(preset("demo", vocab_size=tok.vocab_size))
    return save_model(directory / "demo-random", model, tok)


def start_server(model: str, port: int, db: Path, args: argparse.Namespace
                 ) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "kotonoha.serve", "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--db", str(db), "--log-level", "warning",
           "--max-batch-size", str(args.max_batch_size)]
    if args.device:
        cmd += ["--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start within 180 s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model to serve (default: the demo preset with random weights)")
    p.add_argument("--clients", default="1,4,8,16", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=4, help="requests per client per round")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="the server's torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(demo_model(Path(tmp)))
        port = free_port()
        server = start_server(model, port, Path(tmp) / "bench.db", args)
        url = f"http://127.0.0.1:{port}"
        try:
            name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            asyncio.run(run_round(url, name, 2, 1, 8))  # warm-up
            rows = [asyncio.run(run_round(url, name, c, args.requests, args.max_tokens))
                    for c in levels]
        finally:
            server.terminate()
            server.wait(timeout=30)

    base = rows[0]["tok_per_s"]
    print(f"\nmodel: {args.model or 'demo preset, random weights'} | {platform.machine()} "
          f"{os.cpu_count()} CPUs | device: {args.device or 'auto'} | "
          f"{args.requests} requests/client x {args.max_tokens} tokens | "
          f"max batch {args.max_batch_size} | server threads: {args.threads or 'default'}\n")
    print("| clients | requests | agg tok/s | vs 1 client | latency p50 / p90 / p99 (s) "
          "| TTFT p50 / p90 / p99 (ms) | ITL p50 (ms) |")
    print("|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tok_per_s']:.0f} | "
              f"{r['tok_per_s'] / base:.2f}x | "
              f"{r['latency_p50']:.2f} / {r['latency_p90']:.2f} / {r['latency_p99']:.2f} | "
              f"{1000 * r['ttft_p50']:.0f} / {1000 * r['ttft_p90']:.0f} / "
              f"{1000 * r['ttft_p99']:.0f} | {1000 * r['itl_p50']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
