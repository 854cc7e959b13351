"""The generation engine: the CLI, the API server, the web UI, RL rollouts and evals all
generate through it.

A static KV cache of `max_batch_size` rows x `max_seq_len` positions is allocated once. A
request is admitted into a free row by prefilling all of its prompt but the last token (rows
admitted together are prefilled as one batch); from then on every `step()` runs ONE batched
forward pass that feeds each active row its latest token (the last prompt token on its first
step) at that row's own position, and samples one token per row with the row's own settings
and random generator. Rows join and leave between steps (continuous batching). A finished row
is not cleared: its next occupant overwrites positions 0.. as it goes, and the attention mask
never looks past a query's own position.

Text is released token by token but never half a character (byte-level BPE splits UTF-8) and
never anything that might still turn out to be the start of a stop string.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kotonoha.errors import UserError
from kotonoha.model import KVCache, Transformer
from kotonoha.sampling import SamplingParams, sample, token_counts

KV_BLOCK = 64  # eager decode attends over a multiple of this, to limit the shape variety
PREFILL_TOKENS = 1024  # tokens per prefill forward (all new rows together)


class TokenizerLike(Protocol):
    """What the engine needs from a tokenizer."""

    @property
    def stop_ids(self) -> list[int]:  # end-of-text / end-of-turn ids
        ...

    def decode(self, ids: list[int], skip_special: bool = False) -> str: ...


@dataclass
class TokenEvent:
    request_id: int
    token_id: int  # -1 when no token came with the event (max_tokens=0, abort)
    text: str  # newly released text; may be "" while a character or a stop string is pending
    logprob: float  # log p(token) under the model's raw distribution
    top_logprobs: list[tuple[int, float]]  # (token id, logprob), most likely first
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass
class Completion:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # every sampled token, a final stop token included
    text: str  # without the stop token or stop string
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class IncrementalDetokenizer:
    """Text of a growing token sequence, released in whole characters.

    Special tokens are left out (as in vLLM and llama.cpp's server): a reply that opens a new
    turn with `<|im_start|>` must not show the marker to the user or store it as text.
    A byte-level BPE token can end in the middle of a UTF-8 character, which decodes as
    U+FFFD; trailing U+FFFD is held back until a later token completes the character.
    Decoding a short window that starts a few tokens back (the prefix/read offsets of HF TGI
    and vLLM) keeps tokenizers that strip a leading space at the start of a decode
    (SentencePiece) from eating the spaces between tokens, and keeps each step O(1).
    """

    def __init__(self, tokenizer: TokenizerLike, context_ids: Sequence[int] = (),
                 lstrip: bool = False) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context_ids[-4:])  # a little prompt context for the first token
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.lstrip = lstrip  # drop leading whitespace until the first visible character

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Everything still held back (at the end of a generation)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special=True)

        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            text = full[len(prefix):]
            if self.lstrip:
                text = text.lstrip()
                self.lstrip = not text
            return text
        return ""


class StopStringMatcher:
    """Releases text except what could still be the start of a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.text = ""  # everything pushed, possibly past a stop string
        self.released = 0  # chars of `text` handed out; the final text is text[:released]

    def push(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """Add `delta`; return (text now safe to release, whether a stop string matched)."""
        self.text += delta
        # Held-back text is the only place a stop string can start (released text was
        # checked), so the search starts there.
        hits = [i for s in self.stop if (i := self.text.find(s, self.released)) >= 0]
        if hits:
            end, stopped = min(hits), True
        elif final:
            end, stopped = len(self.text), False
        else:
            end, stopped = len(self.text) - self._partial_match(), False
        out = self.text[self.released:end]
        self.released = end
        return out, stopped

    def _partial_match(self) -> int:
        """Length of the longest tail of the unreleased text that begins some stop string."""
        pending = len(self.text) - self.released
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, pending), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: set[int]
    generator: torch.Generator
    detok: IncrementalDetokenizer
    matcher: StopStringMatcher
    row: int = -1
    pos: int = 0  # position of `last`, the token the next decode step feeds
    last: int = 0
    token_ids: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # generated-token counts, only when penalties are on
    prompt_mask: torch.Tensor | None = None


# Positions a command-line chat or the server allocates unless told otherwise: Gemma 3's 32k
# context would otherwise mean a KV cache of gigabytes that a conversation never fills.
DEFAULT_MAX_SEQ_LEN = 4096


def cache_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """Keys and values stay fp32 on a CPU even under a bf16 model: torch's CPU attention is
    several times slower in bf16 for one-token queries, which is every decode step."""
    return torch.float32 if device.type == "cpu" else model_dtype


class Engine:
    """Batched generation over a static KV cache; see the module docstring."""

    def __init__(self, model: Transformer, tokenizer: TokenizerLike, *, max_batch_size: int = 8,
                 max_seq_len: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, compile: bool = False) -> None:
        cfg = model.cfg
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        # Moves the caller's model: an engine owns its model for as long as it generates.
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.vocab_size: int = cfg.vocab_size
        self.max_seq_len: int = max_seq_len or cfg.context_length
        if not 0 < self.max_seq_len <= cfg.context_length:
            raise UserError(f"max_seq_len must be in 1..{cfg.context_length} (the model's "
                            f"context), got {self.max_seq_len}.")
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.max_batch_size = max_batch_size
        self.cache = KVCache(cfg, max_batch_size, self.max_seq_len, self.device,
                             cache_dtype(self.device, self.dtype))
        self.compiled = compile
        # Compiled: every decode step has the same shapes (all rows, the whole cache), so it
        # compiles once; eager: attend only as far as the longest active row needs.
        self._decode_fn = (torch.compile(self._decode_forward, dynamic=False) if compile
                           else self._decode_forward)
        self._next_id = 0
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Request | None] = [None] * max_batch_size
        self._events: list[TokenEvent] = []  # finished without a decode step (abort, 0 tokens)

    # ---- requests -------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a request; returns its id. Raises `UserError` for a bad prompt or setting."""
        self._check(prompt_ids, params)
        rid, self._next_id = self._next_id, self._next_id + 1
        seed = params.seed
        if seed is None:  # from torch's RNG, so torch.manual_seed makes a whole run repeatable
            seed = int(torch.randint(0, 2**62, ()).item())
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.stop_ids)
        req = _Request(
            id=rid, prompt_ids=list(prompt_ids), params=params, stop_ids=stop_ids,
            generator=torch.Generator(device=self.device).manual_seed(seed),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.lstrip),
            matcher=StopStringMatcher(params.stop),
        )
        if params.max_tokens == 0:
            self._events.append(TokenEvent(rid, -1, "", 0.0, [], True, "length"))
        else:
            self._waiting.append(req)
        return rid

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate(self.vocab_size)
        if not prompt_ids:
            raise UserError("The prompt is empty; give at least one token.")
        if len(prompt_ids) >= self.max_seq_len:
            raise UserError(f"prompt of {len(prompt_ids)} tokens does not fit the context of "
                            f"{self.max_seq_len}.")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"Prompt token id {bad[0]} is outside the vocabulary of "
                            f"{self.vocab_size}.")

    def abort(self, request_id: int) -> None:
        """Drop a request (its client went away); the next `step()` reports it as "abort"."""
        if self._drop(request_id):
            self._events.append(TokenEvent(request_id, -1, "", 0.0, [], True, "abort"))

    def _drop(self, request_id: int) -> bool:
        for req in self._waiting:
            if req.id == request_id:
                self._waiting.remove(req)
                return True
        for row, req in enumerate(self._rows):
            if req is not None and req.id == request_id:
                self._rows[row] = None
                return True
        return False

    def has_work(self) -> bool:
        return bool(self._waiting or self._events
                    or any(r is not None for r in self._rows))

    # ---- the loop -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests into free rows, then one batched decode step."""
        events, self._events = self._events, []
        admitted = []
        for row in range(self.max_batch_size):
            if self._rows[row] is None and self._waiting:
                admitted.append(self._admit(self._waiting.popleft(), row))
        self._prefill(admitted)
        active = [(row, req) for row, req in enumerate(self._rows) if req is not None]
        if not active:
            return events

        # Rows 0..B-1 go in as one batch (rows=None, a slice of the cache rather than a
        # gather); a free row in between is fed a dummy token at position 0, which its next
        # occupant overwrites.
        B = self.max_batch_size if self.compiled else active[-1][0] + 1
        idx = [0] * B
        pos = [0] * B
        for row, req in active:
            idx[row], pos[row] = req.last, req.pos
        idx_t = torch.tensor(idx, device=self.device)[:, None]
        pos_t = torch.tensor(pos, device=self.device)[:, None]
        kv_len = self.max_seq_len if self.compiled else self._kv_len(max(pos) + 1)
        logits = self._decode_fn(idx_t, pos_t, kv_len)[[row for row, _ in active]]

        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = torch.stack([
            sample(logits[i], req.params, req.generator, counts=req.counts,
                   prompt_mask=req.prompt_mask)
            for i, (_, req) in enumerate(active)
        ])
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        k = max(req.params.logprobs for _, req in active)
        top_i: list[list[int]] = [[] for _ in active]
        top_v: list[list[float]] = [[] for _ in active]
        if k:  # one topk for the batch, cut to each row's own k below
            best = logprobs.topk(k, dim=-1)
            top_i, top_v = best.indices.tolist(), best.values.tolist()

        for i, (token, (row, req)) in enumerate(zip(tokens.tolist(), active)):
            top = list(zip(top_i[i], top_v[i]))[:req.params.logprobs]
            events.append(self._advance(req, token, chosen[i], top))
            if events[-1].finished:
                self._rows[row] = None
        return events

    def _kv_len(self, n: int) -> int:
        return min(self.max_seq_len, KV_BLOCK * math.ceil(n / KV_BLOCK))

    def _decode_forward(self, idx: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        logits = self.model(idx, positions=pos, cache=self.cache, kv_len=kv_len)
        return logits[:, -1].float()

    def _admit(self, req: _Request, row: int) -> _Request:
        """Give `req` cache row `row`. Its last prompt token is left for the next decode step
        to feed, so that every step yields exactly one token per row."""
        req.row, req.pos, req.last = row, len(req.prompt_ids) - 1, req.prompt_ids[-1]
        if req.params.uses_history:
            req.counts = torch.zeros(self.vocab_size, device=self.device)
            req.prompt_mask = token_counts(req.prompt_ids, self.vocab_size, self.device) > 0
        self._rows[row] = req
        return req

    def _prefill(self, reqs: list[_Request]) -> None:
        """Write the prompts (all but their last token) of newly admitted rows into the cache:
        one batched forward per chunk, all rows right-padded to the longest prompt.

        The pad tokens land at positions >= a row's last prompt position, which the decode
        steps overwrite before any query attends to them. No logits are needed, so the forward
        selects no position and skips the output head (a fifth of a small model's FLOPs).
        Chunks bound the memory of the activations.
        """
        reqs = [r for r in reqs if r.pos > 0]
        if not reqs:
            return
        T = max(r.pos for r in reqs)
        ids = torch.tensor([r.prompt_ids[:-1] + [0] * (T - r.pos) for r in reqs],
                           device=self.device)
        rows = torch.tensor([r.row for r in reqs], device=self.device)
        chunk = max(1, PREFILL_TOKENS // len(reqs))
        for start in range(0, T, chunk):
            end = min(T, start + chunk)
            pos = torch.arange(start, end, device=self.device).expand(len(reqs), -1)
            nothing = torch.zeros(pos.shape, dtype=torch.bool, device=self.device)
            self.model(ids[:, start:end], positions=pos, cache=self.cache, rows=rows,
                       kv_len=self._kv_len(end), select=nothing)

    def _advance(self, req: _Request, token: int, logprob: float,
                 top: list[tuple[int, float]]) -> TokenEvent:
        """Record a sampled token; release its text and decide whether the request ends."""
        params = req.params
        req.token_ids.append(token)
        if req.counts is not None:
            req.counts[token] += 1
        if token in req.stop_ids:  # the stop token is not text
            text, _ = req.matcher.push(req.detok.flush(), final=True)
            return TokenEvent(req.id, token, text, logprob, top, True, "stop")

        out_of_room = (len(req.token_ids) == params.max_tokens
                       or req.pos + 1 >= self.max_seq_len)  # no position left to feed it
        delta = req.detok.add(token)
        if out_of_room:
            delta += req.detok.flush()
        text, stopped = req.matcher.push(delta, final=out_of_room)
        if stopped or out_of_room:
            return TokenEvent(req.id, token, text, logprob, top, True,
                              "stop" if stopped else "length")
        req.last, req.pos = token, req.pos + 1
        return TokenEvent(req.id, token, text, logprob, top)

    # ---- conveniences ---------------------------------------------------------------------

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams],
                 on_finish: Callable[[], None] | None = None) -> list[Completion]:
        """Generate for every prompt (batched, continuously) and return them in order;
        `on_finish` is called as each one finishes (a progress bar)."""
        self._require_idle("generate")
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise UserError(f"Got {len(plist)} sampling settings for {len(prompts)} prompts.")
        for prompt, p in zip(prompts, plist):  # all checked before any is queued
            self._check(prompt, p)
        ids = [self.submit(prompt, p) for prompt, p in zip(prompts, plist)]
        done = {rid: Completion(rid, list(prompt), [], "", [], [], None, len(prompt), 0)
                for rid, prompt in zip(ids, prompts)}
        while self.has_work():
            for ev in self.step():
                _add_event(done[ev.request_id], ev)
                if ev.finished and on_finish is not None:
                    on_finish()
        return [done[rid] for rid in ids]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Generate for one prompt, yielding each event as it comes."""
        self._require_idle("stream")
        rid = self.submit(prompt_ids, params)
        finished = False
        try:
            while not finished:
                for ev in self.step():
                    finished = ev.finished
                    yield ev
        finally:
            if not finished:  # the consumer stopped early: free the row, report nothing
                self._drop(rid)
                self._events = [e for e in self._events if e.request_id != rid]

    def _require_idle(self, what: str) -> None:
        # Their own step loop would swallow the events of requests submitted elsewhere.
        if self.has_work():
            raise RuntimeError(f"Engine.{what}() needs an idle engine; another consumer is "
                               "stepping it (use submit()/step() there instead).")

    @torch.inference_mode()
    def score(self, ids: list[int]) -> list[float | None]:
        """log p(ids[i] | ids[:i]) for every token; None for the first, which has no context
        (OpenAI's echo + logprobs)."""
        if not ids:
            return []
        if len(ids) > self.model.cfg.context_length:
            raise UserError(f"Text of {len(ids)} tokens is longer than the model's context of "
                            f"{self.model.cfg.context_length}.")
        x = torch.tensor([ids], device=self.device)
        logprobs = torch.log_softmax(self.model(x)[0, :-1].float(), dim=-1)
        return [None, *logprobs.gather(1, x[0, 1:, None])[:, 0].tolist()]


def _add_event(c: Completion, ev: TokenEvent) -> None:
    if ev.token_id >= 0:
        c.token_ids.append(ev.token_id)
        c.logprobs.append(ev.logprob)
        c.top_logprobs.append(ev.top_logprobs)
        c.completion_tokens += 1
    c.text += ev.text
    if ev.finished:
        c.finish_reason = ev.finish_reason
