"""Shared by the serving tests: a tiny random model with a tokenizer trained in-process, and
live servers on 127.0.0.1 (in a thread, or in a subprocess that can be killed)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from kotonoha.checkpoint import save_model
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import Tokenizer, sample_text_paths, train_bpe_from_files

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def tokenizer() -> Tokenizer:
    return train_bpe_from_files(sample_text_paths(), 600)


def tiny_model(seed: int = 0, context: int = 256) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=tokenizer().vocab_size,
                               context_length=context))
    # Random init is nearly uniform over the vocabulary; sharper distributions make greedy
    # decoding free of near-ties and make top alternatives visibly different.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return model.eval()


def save_tiny(directory: Path, seed: int = 0, context: int = 256) -> Path:
    return save_model(directory, tiny_model(seed, context), tokenizer())


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with contextlib.closing(free_socket()) as s:
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving `app` from a background thread of the test process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


@contextlib.contextmanager
def subprocess_server(models: list[str], db: Path, *extra: str,
                      timeout: float = 90) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m kotonoha.serve` on a free port; yields (process, base url)."""
    port = free_port()
    args = [sys.executable, "-m", "kotonoha.serve", "--host", "127.0.0.1", "--port", str(port),
            "--db", str(db), "--log-level", "warning", *extra]
    for m in models:
        args += ["--model", m]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = db.with_suffix(".log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("server exited: " + db.with_suffix(".log").read_text())
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start: " + db.with_suffix(".log").read_text())
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    """JSON payloads of an SSE stream, up to `data: [DONE]`."""
    import json

    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)
