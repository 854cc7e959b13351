"""The `serve` verb's arguments, shared by `kotonoha serve` and `python -m kotonoha.serve`.

Importing this module does not import FastAPI; `run_serve` does, when it starts the server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_DB = str(Path("runs") / "kotonoha.db")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="model directory, Hugging Face directory, .gguf file, or a preset name "
                        "with --tokenizer (repeat to serve several)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (for presets)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every API call")
    p.add_argument("--db", default=DEFAULT_DB,
                   help="SQLite file for conversations, feedback and arena votes")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization for CPU decoding (int4: groups of 32, as Q4_1)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="KV-cache rows: requests generated together")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context served (default: the model's, at most 4096)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def run_serve(args: argparse.Namespace) -> None:
    from kotonoha.serve.app import serve_main

    serve_main(args.model, args.host, args.port, args.api_key, args.db,
               tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
               quantize=args.quantize, max_batch_size=args.max_batch_size,
               max_seq_len=args.max_seq_len,
               threads=args.threads, log_level=args.log_level)
