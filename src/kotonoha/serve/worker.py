"""One model being served: its engine, stepped by one background thread.

`Engine.step()` admits waiting requests into free KV-cache rows and runs one batched decode
step for every active row, so driving it in a loop *is* continuous batching: requests join
and leave the batch between steps. The engine is not thread-safe, so only the worker thread
touches it; the asyncio side sends commands (submit, abort, run-a-function) through a queue and
receives `TokenEvent`s on a per-request `asyncio.Queue`, handed over with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kotonoha.engine import Engine, TokenEvent
from kotonoha.sampling import SamplingParams

log = logging.getLogger("kotonoha.serve")


class EngineFailure(RuntimeError):
    """The engine raised while stepping; every request in flight gets this error."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | BaseException | None]


@dataclass
class WorkerStats:
    submitted: int = 0
    completed: int = 0
    aborted: int = 0
    peak_running: int = 0  # most requests in flight at once (evidence that batching happens)
    steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.time)


class Group:
    """Requests submitted together; their events arrive on one queue, tagged by index."""

    def __init__(self, worker: ModelWorker, ids: list[int], sink: _Sink) -> None:
        self.worker, self.ids, self._sink = worker, ids, sink
        self._index = {rid: i for i, rid in enumerate(ids)}
        self._open = set(ids)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(index, event) until every request of the group has finished."""
        while self._open:
            item = await self._sink.queue.get()
            if item is None:  # woken up by abort()
                continue
            if isinstance(item, BaseException):
                self._open.clear()
                raise item
            if item.finished:
                self._open.discard(item.request_id)
            yield self._index[item.request_id], item

    def abort(self) -> None:
        """Drop whatever has not finished (the client went away); frees the cache rows
        before the engine's next step. Safe to call more than once."""
        if self._open:
            self.worker._commands.put(("abort", list(self._open)))
            self._open.clear()
            self._sink.queue.put_nowait(None)  # ends an `events()` loop that is waiting


class ModelWorker:
    """A named model + tokenizer + engine, with the thread that steps the engine."""

    def __init__(self, name: str, model: Any, tokenizer: Any, *, max_batch_size: int = 16,
                 max_seq_len: int | None = None) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size,
                             max_seq_len=max_seq_len)
        self.max_seq_len: int = self.engine.max_seq_len
        self.vocab_size: int = self.engine.vocab_size
        self.stats = WorkerStats()
        self.busy = False  # the engine had work after its last step (read from other threads)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._sinks: dict[int, _Sink] = {}
        self._token_strs: dict[int, str] = {}
        self._byte_decoder = _byte_decoder(tokenizer)
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ---- the asyncio side ----------------------------------------------------------------

    async def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> Group:
        """Queue requests that belong together (the `n` choices of one API call); all are
        accepted or none is (a `UserError` for the first bad one)."""
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, asyncio.Queue())
        accepted: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        self._commands.put(("submit", requests, sink, accepted))
        ids = await asyncio.wrap_future(accepted)
        return Group(self, ids, sink)

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run `fn(engine)` on the worker thread, between two steps (e.g. scoring)."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.put(("call", fn, done))
        return await asyncio.wrap_future(done)

    @property
    def running(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._sinks)

    def close(self) -> None:
        self._commands.put(("stop",))
        self._thread.join(timeout=10)

    # ---- the worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            # Block while idle; while generating, take whatever arrived since the last step.
            try:
                cmd = self._commands.get(block=not self.engine.has_work())
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    self._fail_all(EngineFailure("The server is shutting down."))
                    return
                self._handle(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.has_work():
                self._step()

    def _handle(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "submit":
            _, requests, sink, fut = cmd
            ids: list[int] = []
            try:
                for prompt_ids, params in requests:
                    ids.append(self.engine.submit(prompt_ids, params))
            except Exception as e:  # UserError goes back to the request that caused it
                for rid in ids:
                    self.engine.abort(rid)
                fut.set_exception(e)
                return
            for rid in ids:
                self._sinks[rid] = sink
            self.stats.submitted += len(ids)
            self.stats.peak_running = max(self.stats.peak_running, len(self._sinks))
            fut.set_result(ids)
        elif kind == "abort":
            for rid in cmd[1]:
                if self._sinks.pop(rid, None) is not None:
                    self.engine.abort(rid)
                    self.stats.aborted += 1
        elif kind == "call":
            _, fn, fut = cmd
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:
                fut.set_exception(e)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # a bug or out-of-memory: fail the requests, keep serving
            log.exception("engine step failed for model %s", self.name)
            self._fail_all(EngineFailure(f"The model failed while generating: {e}"))
            return
        self.stats.steps += 1
        # One wake-up per event loop per step (not per event): with 16 rows that is 16x fewer
        # cross-thread calls, and the loop hands every row its token in one go.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, TokenEvent]]] = {}
        for ev in events:
            if ev.token_id >= 0:
                self.stats.tokens += 1
            sink = self._sinks.get(ev.request_id)
            if sink is None:  # aborted: nobody is listening any more
                continue
            if ev.finished:
                del self._sinks[ev.request_id]
                self.stats.completed += 1
            batches.setdefault(sink.loop, []).append((sink, ev))
        for loop, items in batches.items():
            self._post(loop, _deliver, items)
        self.busy = self.engine.has_work()

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: that event loop is closed (shutdown), so there is nobody to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _fail_all(self, error: BaseException) -> None:
        for rid, sink in list(self._sinks.items()):
            self.engine.abort(rid)
            self._post(sink.loop, sink.queue.put_nowait, error)
        self._sinks.clear()
        # Drain the engine's abort events so it is idle again.
        while self.engine.has_work():
            try:
                self.engine.step()
            except Exception:
                break
        self.busy = False

    # ---- token strings -------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a byte-level BPE token may be half of a
        UTF-8 character, which `decode` would show as U+FFFD)."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_decoder is not None and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        if m := _BYTE_FALLBACK.fullmatch(piece):  # SentencePiece byte fallback: <0xE3>
            return bytes([int(m.group(1), 16)])
        if self._byte_decoder is None:
            return piece.replace("\u2581", " ").encode()
        return piece.encode()  # an added token such as <|im_end|>

    def token_str(self, token_id: int) -> str:
        """A token as OpenAI shows it: its text, or `bytes:\\xe3\\x81` for part of a character."""
        s = self._token_strs.get(token_id)
        if s is None:
            data = self.token_bytes(token_id)
            try:
                s = data.decode("utf-8")
            except UnicodeDecodeError:
                s = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            self._token_strs[token_id] = s
        return s


def _deliver(items: list[tuple[_Sink, TokenEvent]]) -> None:
    for sink, ev in items:
        sink.queue.put_nowait(ev)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    """GPT-2's printable-character -> byte table, when the tokenizer is byte-level."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend", None)
    if not isinstance(getattr(backend, "decoder", None), decoders.ByteLevel):
        return None
    # GPT-2 maps the 256 bytes to printable characters: printable Latin-1 bytes map to
    # themselves, the rest to 256, 257, ... in order.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table
