"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions, and
vLLM's /tokenize and /detokenize.

Every generation goes through a `ModelWorker` (one engine per model, continuously batched).
Responses follow OpenAI's documented shapes, including usage counts, finish reasons, both
log-probability formats (chat's `content` list and the legacy completions arrays) and
SSE streams that end in `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import codecs
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kotonoha.engine import Engine, TokenEvent
from kotonoha.errors import UserError
from kotonoha.sampling import SamplingParams
from kotonoha.serve.openai import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from kotonoha.serve.stream import EventStream, sse
from kotonoha.serve.worker import Group, ModelWorker

router = APIRouter()


# ---- shared helpers (the web UI uses them too) ----------------------------------------------


def workers(request: Request) -> dict[str, ModelWorker]:
    return request.app.state.workers


def get_worker(request: Request, name: str | None) -> ModelWorker:
    """The worker serving `name` (the first model when None); 404 for an unknown name."""
    ws = workers(request)
    if name is None:
        return next(iter(ws.values()))
    if name not in ws:
        raise APIError(404, f"The model '{name}' does not exist; GET /v1/models lists the "
                            f"{len(ws)} model(s) this server has: {', '.join(ws)}.",
                       param="model", code="model_not_found")
    return ws[name]


def sampling_params(body: SamplingFields, *, max_tokens: int | None, logprobs: int,
                    index: int = 0, chat: bool = False) -> SamplingParams:
    """Engine settings for choice `index` of a request (choice i is seeded with seed + i,
    so `n` choices differ but the whole request is reproducible); `chat`: a reply to a
    conversation, which drops the whitespace it opens with."""
    seed = None if body.seed is None else (body.seed + index) % 2**63
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
        seed=seed, max_tokens=max_tokens, stop=body.stops(), ignore_eos=body.ignore_eos,
        logprobs=logprobs, lstrip=chat,
    )
    return params


def check_params(worker: ModelWorker, params: SamplingParams) -> None:
    try:
        params.validate(worker.vocab_size)
    except UserError as e:
        raise APIError(400, str(e)) from None


def resolve_max_tokens(worker: ModelWorker, n_prompt: int, max_tokens: int | None) -> int:
    """`max_tokens`, or all the room left in the context when None; 400 when the prompt and
    the answer do not fit in the context window together."""
    limit = worker.max_seq_len
    if n_prompt == 0:
        raise APIError(400, "The prompt is empty; give at least one token.", param="prompt")
    if n_prompt >= limit:
        raise APIError(400, f"This model's context window is {limit} tokens and the prompt "
                            f"alone has {n_prompt}; shorten the prompt.",
                       param="messages", code="context_length_exceeded")
    if max_tokens is None:
        return limit - n_prompt
    if n_prompt + max_tokens > limit:
        raise APIError(400, f"This model's context window is {limit} tokens, but the prompt "
                            f"({n_prompt}) plus max_tokens ({max_tokens}) needs "
                            f"{n_prompt + max_tokens}; lower max_tokens to at most "
                            f"{limit - n_prompt} or shorten the prompt.",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def chat_prompt(worker: ModelWorker, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template."""
    if getattr(worker.tokenizer, "chat_template", None) is None:
        raise APIError(400, f"The model '{worker.name}' has no chat template (it is a base "
                            "model); use /v1/completions for plain text completion.",
                       param="model", code="no_chat_template")
    try:
        ids, _ = worker.tokenizer.encode_chat(messages, add_generation_prompt=True)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    return ids


def message_dicts(body_messages: list[Any]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body_messages):
        try:
            text = m.text()
        except ValueError as e:
            raise APIError(400, str(e), param=f"messages[{i}].content") from None
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for system
        out.append({"role": role, "content": text})
    return out


def is_stop_token(worker: ModelWorker, params: SamplingParams, ev: TokenEvent) -> bool:
    """Whether the event's token is the end-of-turn token that ended the request (it carries no
    text, so it is left out of log-probabilities as OpenAI does)."""
    return ev.finished and ev.finish_reason == "stop" and (
        ev.token_id in params.stop_token_ids
        or (not params.ignore_eos and ev.token_id in worker.tokenizer.stop_ids))


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ChoiceState:
    """What has been generated for one choice so far."""

    index: int
    params: SamplingParams
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprob_items: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)

    def add(self, worker: ModelWorker, ev: TokenEvent) -> list[tuple[int, float, Any]]:
        """Record an event; returns the log-probability items it adds."""
        self.text += ev.text
        new: list[tuple[int, float, Any]] = []
        if ev.token_id >= 0:
            self.tokens += 1
            if not is_stop_token(worker, self.params, ev):
                new = [(ev.token_id, ev.logprob, ev.top_logprobs)]
                self.logprob_items += new
        if ev.finished:
            self.finish_reason = "length" if ev.finish_reason == "abort" else ev.finish_reason
        return new


def chat_logprobs(worker: ModelWorker, items: list[tuple[int, float, Any]]) -> dict[str, Any]:
    def entry(token: int, lp: float) -> dict[str, Any]:
        return {"token": worker.token_str(token), "logprob": lp,
                "bytes": list(worker.token_bytes(token))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                        for t, lp, top in items]}


class TextOffsets:
    """Where each token of a choice starts in its text, in characters (the legacy
    `text_offset`). The tokens' bytes are decoded as a stream: one that ends inside a UTF-8
    character adds nothing until the token that completes it."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker, self.offset = worker, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, token: int) -> int:
        start = self.offset
        self.offset += len(self.decoder.decode(self.worker.token_bytes(token)))
        return start


def completion_logprobs(worker: ModelWorker, items: list[tuple[int, float | None, Any]],
                        offsets: TextOffsets) -> dict[str, Any]:
    """The legacy completions format: parallel arrays, top alternatives as {token: logprob}."""
    tokens, token_logprobs, tops, starts = [], [], [], []
    for token, lp, top in items:
        tokens.append(worker.token_str(token))
        token_logprobs.append(lp)
        tops.append(None if top is None else {worker.token_str(a): alp for a, alp in top})
        starts.append(offsets.take(token))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": starts}


# ---- /v1/models -----------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(w) for w in workers(request).values()]}


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str) -> dict[str, Any]:
    return model_card(get_worker(request, name))


def model_card(w: ModelWorker) -> dict[str, Any]:
    return {"id": w.name, "object": "model", "created": int(w.stats.started),
            "owned_by": "kotonoha", "max_model_len": w.max_seq_len,
            "chat": getattr(w.tokenizer, "chat_template", None) is not None}


# ---- /v1/chat/completions -------------------------------------------------------------------


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request,
                           body: ChatCompletionRequest) -> JSONResponse | EventStream:
    worker = get_worker(request, body.model)
    messages = message_dicts(body.messages)
    prompt = chat_prompt(worker, messages)
    wanted = body.max_completion_tokens or body.max_tokens
    max_tokens = resolve_max_tokens(worker, len(prompt), wanted)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
    k = (body.top_logprobs or 0) if body.logprobs else 0
    params = [sampling_params(body, max_tokens=max_tokens, logprobs=k, index=i, chat=True)
              for i in range(body.n)]
    for p in params:
        check_params(worker, p)
    group = await submit(worker, [(prompt, p) for p in params])
    rid, created = new_id("chatcmpl"), int(time.time())
    choices = [ChoiceState(i, p) for i, p in enumerate(params)]
    head = {"id": rid, "created": created, "model": worker.name}

    if not body.stream:
        await collect(request, group, choices, worker)
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": c.index,
                         "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(worker, c.logprob_items) if body.logprobs
                         else None,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": usage(len(prompt), sum(c.tokens for c in choices)),
        })

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[str]:
        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None,
                  finish: str | None = None) -> str:
            obj: dict[str, Any] = {
                **head, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return sse(obj)

        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for i, ev in group.events():
            c = choices[i]
            new = c.add(worker, ev)
            lp = chat_logprobs(worker, new) if body.logprobs and new else None
            if ev.text or lp:
                yield chunk(i, {"content": ev.text}, lp)
            if ev.finished:
                yield chunk(i, {}, finish=c.finish_reason)
        if include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                       "usage": usage(len(prompt), sum(c.tokens for c in choices))})

    return EventStream(chunks(), on_close=group.abort)


async def collect(request: Request, group: Group, choices: list[ChoiceState],
                  worker: ModelWorker) -> None:
    """Gather a non-streamed answer; a client that hangs up meanwhile aborts it (its rows are
    freed instead of generating for nobody)."""

    async def hang_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        group.abort()

    watcher = asyncio.create_task(hang_up())
    try:
        async for i, ev in group.events():
            choices[i].add(worker, ev)
    finally:
        watcher.cancel()
        group.abort()


async def submit(worker: ModelWorker, requests: list[tuple[list[int], SamplingParams]]) -> Any:
    try:
        return await worker.submit(requests)
    except UserError as e:  # what the engine itself rejects (e.g. a token id out of range)
        raise APIError(400, str(e)) from None


# ---- /v1/completions ------------------------------------------------------------------------


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest) -> JSONResponse | EventStream:
    worker = get_worker(request, body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by this server.",
                       param="suffix")
    prompts = [worker.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p)
               for p in body.prompts()]
    for ids in prompts:
        bad = [t for t in ids if not 0 <= t < worker.vocab_size]
        if bad:
            raise APIError(400, f"Prompt token id {bad[0]} is outside the vocabulary of "
                                f"{worker.vocab_size}.", param="prompt")
    k = body.logprobs or 0
    want_logprobs = body.logprobs is not None
    scoring = body.max_tokens == 0  # nothing to generate: the prompt just has to fit the model
    context = worker.engine.model.cfg.context_length
    jobs = []
    for ids in prompts:
        if scoring:
            if not ids:
                raise APIError(400, "The prompt is empty; give at least one token.",
                               param="prompt")
            if len(ids) > context:
                raise APIError(400, f"The prompt has {len(ids)} tokens but this model's "
                                    f"context window is {context}; shorten it.",
                               param="prompt", code="context_length_exceeded")
            max_tokens = 0
        else:
            max_tokens = resolve_max_tokens(worker, len(ids), body.max_tokens)
        for j in range(body.n):
            params = sampling_params(body, max_tokens=max_tokens, logprobs=k, index=j)
            check_params(worker, params)
            jobs.append((ids, params))

    # Echoed prompts with log-probabilities (what lm-evaluation-harness scores with).
    echo_items: list[list[tuple[int, float | None, Any]]] = []
    if body.echo and want_logprobs:
        scores = await worker.call(lambda eng: [score_prompt(eng, ids, k) for ids in prompts])
        echo_items = [list(zip(ids, lps, tops)) for ids, (lps, tops) in zip(prompts, scores)]

    rid, created = new_id("cmpl"), int(time.time())
    head = {"id": rid, "created": created, "model": worker.name}
    n_prompt_tokens = sum(len(ids) for ids in prompts)
    choices = [ChoiceState(i, p) for i, (_, p) in enumerate(jobs)]
    prompt_texts = [worker.tokenizer.decode(ids) for ids in prompts] if body.echo else []
    group = None if scoring else await submit(worker, jobs)

    def echo_part(i: int) -> tuple[str, list[tuple[int, float | None, Any]]]:
        """Text and log-probability items echoed in front of choice i."""
        if not body.echo:
            return "", []
        p = i // body.n
        return prompt_texts[p], (echo_items[p] if echo_items else [])

    if not body.stream:
        if group is not None:
            await collect(request, group, choices, worker)
        out = []
        for c in choices:
            prefix, items = echo_part(c.index)
            lp = None
            if want_logprobs:
                lp = completion_logprobs(worker, [*items, *c.logprob_items], TextOffsets(worker))
            out.append({"index": c.index, "text": prefix + c.text, "logprobs": lp,
                        "finish_reason": c.finish_reason or "length"})
        return JSONResponse({**head, "object": "text_completion", "choices": out,
                             "usage": usage(n_prompt_tokens, sum(c.tokens for c in choices))})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[str]:
        offsets = [TextOffsets(worker) for _ in choices]

        def chunk(index: int, text: str, items: list[Any], finish: str | None = None) -> str:
            lp = completion_logprobs(worker, items, offsets[index]) if want_logprobs else None
            obj: dict[str, Any] = {**head, "object": "text_completion",
                                   "choices": [{"index": index, "text": text, "logprobs": lp,
                                                "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return sse(obj)

        for c in choices:
            prefix, items = echo_part(c.index)
            if prefix:
                yield chunk(c.index, prefix, items)
        if group is None:
            for c in choices:
                yield chunk(c.index, "", [], finish="length")
        else:
            async for i, ev in group.events():
                new = choices[i].add(worker, ev)
                if ev.text or (want_logprobs and new):
                    yield chunk(i, ev.text, new)
                if ev.finished:
                    yield chunk(i, "", [], finish=choices[i].finish_reason)
        if include_usage:
            yield sse({**head, "object": "text_completion", "choices": [],
                       "usage": usage(n_prompt_tokens, sum(c.tokens for c in choices))})

    return EventStream(chunks(), on_close=group.abort if group else None)


@torch.inference_mode()
def score_prompt(engine: Engine, ids: list[int], k: int
                 ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """log p(ids[i] | ids[:i]) and the k most likely alternatives at every position; None
    for the first token, which has no context (OpenAI's echo). Runs on the worker thread.

    `Engine.score` gives the first list; the alternatives need the whole distribution, so
    this runs the same no-cache forward pass itself.
    """
    x = torch.tensor([ids], device=engine.device)
    logprobs = torch.log_softmax(engine.model(x)[0, :-1].float(), dim=-1)
    chosen = logprobs.gather(1, x[0, 1:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]] | None] = [None]
    if k:
        v, i = logprobs.topk(k, dim=-1)
        tops += [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
    else:
        tops += [[] for _ in chosen]
    return [None, *chosen], tops


# ---- /tokenize, /detokenize -----------------------------------------------------------------


@router.post("/tokenize")
async def tokenize(request: Request, body: TokenizeRequest) -> dict[str, Any]:
    worker = get_worker(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Give exactly one of 'prompt' (text) or 'messages' (a chat).",
                       param="prompt")
    if body.messages is not None:
        msgs = message_dicts(body.messages)
        if getattr(worker.tokenizer, "chat_template", None) is None:
            chat_prompt(worker, msgs)  # raises the no-chat-template error
        try:
            ids, _ = worker.tokenizer.encode_chat(
                msgs, add_generation_prompt=body.add_generation_prompt)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
    else:
        ids = worker.tokenizer.encode_prompt(body.prompt or "")
    return {"tokens": ids, "count": len(ids), "max_model_len": worker.max_seq_len,
            "token_strs": [worker.token_str(t) for t in ids]}


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeRequest) -> dict[str, Any]:
    worker = get_worker(request, body.model)
    bad = [t for t in body.tokens if not 0 <= t < worker.vocab_size]
    if bad:
        raise APIError(400, f"Token id {bad[0]} is outside the vocabulary of "
                            f"{worker.vocab_size}.", param="tokens")
    return {"prompt": worker.tokenizer.decode(body.tokens)}
