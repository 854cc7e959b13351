"""The web UI's own endpoints (under /ui/api): conversations kept in the store, chat turns that
are saved as they are generated, feedback, and the arena.

Generation goes through the same workers as the OpenAI API. A chat turn is one SSE stream:
the saved user message, the answer's text as it is generated, then the saved answer. Saving
happens on the server, so an answer is stored even if the browser closes as it finishes,
and a stopped answer is kept with what it had (finish_reason "abort").
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from kotonoha.serve.api import (
    chat_prompt,
    check_params,
    get_worker,
    resolve_max_tokens,
    sampling_params,
    submit,
    workers,
)
from kotonoha.serve.arena import leaderboard
from kotonoha.serve.openai import APIError, SamplingFields, _Request
from kotonoha.serve.store import Store
from kotonoha.serve.stream import EventStream, sse
from kotonoha.serve.worker import Group, ModelWorker

router = APIRouter(prefix="/ui/api")

DEFAULT_MAX_TOKENS = 256


class _Body(_Request):
    """The UI's request bodies, checked as the API's are (unknown fields are ignored, text
    must be valid Unicode)."""


class ChatParams(SamplingFields):
    max_tokens: int | None = Field(None, ge=1)


class ChatTurn(_Body):
    conversation_id: str | None = None  # None: start a new conversation
    parent_id: str | None = None  # the message to answer under (None: the first message)
    content: str | None = None  # None: regenerate the answer to `parent_id` (a user message)
    model: str | None = None
    system: str | None = None
    params: ChatParams = Field(default_factory=ChatParams)


class ConversationPatch(_Body):
    title: str | None = Field(None, max_length=200)
    system_prompt: str | None = None
    current_leaf: str | None = None
    model: str | None = None


class FeedbackBody(_Body):
    rating: Literal[-1, 0, 1]
    comment: str = Field("", max_length=4000)


class BattleBody(_Body):
    prompt: str = Field(min_length=1)
    system: str | None = None
    params: ChatParams = Field(default_factory=ChatParams)


class VoteBody(_Body):
    winner: Literal["a", "b", "tie", "both_bad"]


def store(request: Request) -> Store:
    return request.app.state.store


async def in_thread(fn: Any, *args: Any, **kw: Any) -> Any:
    """Store calls wait for an fsync; keep them off the event loop."""
    return await asyncio.to_thread(fn, *args, **kw)


# ---- conversations --------------------------------------------------------------------------


@router.get("/conversations")
async def list_conversations(request: Request) -> list[dict[str, Any]]:
    return await in_thread(store(request).conversations)


@router.get("/conversations/{cid}")
async def get_conversation(request: Request, cid: str) -> dict[str, Any]:
    st = store(request)
    conv = await in_thread(st.conversation, cid)
    return {"conversation": conv, "messages": await in_thread(st.messages, cid)}


@router.patch("/conversations/{cid}")
async def patch_conversation(request: Request, cid: str,
                             body: ConversationPatch) -> dict[str, Any]:
    fields = body.model_dump(exclude_unset=True)
    if not fields:
        return await in_thread(store(request).conversation, cid)
    return await in_thread(store(request).update_conversation, cid, **fields)


@router.delete("/conversations/{cid}")
async def delete_conversation(request: Request, cid: str) -> dict[str, Any]:
    await in_thread(store(request).delete_conversation, cid)
    return {"deleted": cid}


@router.post("/messages/{mid}/feedback")
async def feedback(request: Request, mid: str, body: FeedbackBody) -> dict[str, Any]:
    return await in_thread(store(request).set_feedback, mid, body.rating, body.comment)


# ---- a chat turn ----------------------------------------------------------------------------


def fit_conversation(worker: ModelWorker, messages: list[dict[str, str]],
                     max_tokens: int | None) -> tuple[list[int], int]:
    """Prompt ids and max_tokens for a conversation. The oldest turns are dropped until the
    answer fits (like a chat product with a long history); if even the newest question leaves
    less room than asked for, the answer gets the room there is."""
    wanted = max_tokens or DEFAULT_MAX_TOKENS
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = chat_prompt(worker, system + turns)
        room = worker.max_seq_len - len(ids)
        if room >= wanted or len(turns) <= 1:
            break
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    return ids, resolve_max_tokens(worker, len(ids), min(wanted, max(room, 1)))


@router.post("/chat", response_model=None)
async def chat_turn(request: Request, body: ChatTurn) -> EventStream:
    st = store(request)
    worker = get_worker(request, body.model)
    new_conversation = body.conversation_id is None
    if body.content is None and (new_conversation or body.parent_id is None):
        raise APIError(400, "Give the message 'content', or the 'parent_id' of the question "
                            "whose answer to regenerate.", param="content")
    if body.content is not None and not body.content.strip():
        raise APIError(400, "The message is empty.", param="content")

    # Everything is checked before anything is written: a turn answered with a 400 (too
    # long, a bad setting) leaves no conversation or message behind.
    conv = None if new_conversation else await in_thread(st.conversation, body.conversation_id)
    system = (body.system or "") if conv is None else (
        conv["system_prompt"] if body.system is None else body.system)
    # The question: a new (or edited) user message, or the existing one being re-answered.
    user = None
    if body.content is not None:
        path = [] if body.parent_id is None else await in_thread(st.path_to, body.parent_id)
        if path and (conv is None or path[-1]["conversation_id"] != conv["id"]):
            raise APIError(404, f"There is no message {body.parent_id} in this conversation.",
                           param="parent_id", code="not_found")
        path = [*path, {"role": "user", "content": body.content}]
    else:
        user = await in_thread(st.message, body.parent_id)
        if user["conversation_id"] != conv["id"] or user["role"] != "user":
            raise APIError(400, "Only an answer to a question can be regenerated; parent_id "
                                "must be a user message of this conversation.",
                           param="parent_id")
        path = await in_thread(st.path_to, user["id"])
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m["role"], "content": m["content"]} for m in path]
    prompt, max_tokens = fit_conversation(worker, messages, body.params.max_tokens)
    params = sampling_params(body.params, max_tokens=max_tokens, logprobs=0, chat=True)
    check_params(worker, params)
    settings = {"system": system, **body.params.model_dump(exclude_none=True,
                                                           exclude={"stream", "n"}),
                "max_tokens": max_tokens}

    if conv is None:
        title = (body.content or "").strip().splitlines()[0][:60]
        conv = await in_thread(st.create_conversation, title, model=worker.name,
                               system_prompt=system)
    elif system != conv["system_prompt"]:
        conv = await in_thread(st.update_conversation, conv["id"], system_prompt=system)
    cid = conv["id"]
    user_new = user is None
    if user is None:
        user = await in_thread(st.add_message, cid, body.parent_id, "user", body.content)
    await in_thread(st.update_conversation, cid, model=worker.name, params=settings)
    group = await submit(worker, [(prompt, params)])

    async def events() -> AsyncIterator[str]:
        if new_conversation:
            yield sse({"type": "conversation", "conversation": conv})
        if user_new:
            yield sse({"type": "user", "message": user})
        text, tokens, finish = "", 0, None
        try:
            async for _, ev in group.events():
                text += ev.text
                tokens += int(ev.token_id >= 0)
                if ev.text:
                    yield sse({"type": "delta", "text": ev.text})
                if ev.finished:
                    finish = ev.finish_reason
        finally:
            if finish is None:  # stopped by the user or the connection: keep what there is
                group.abort()
                if text:
                    st.add_message(cid, user["id"], "assistant", text, model=worker.name,
                                   params=settings, finish_reason="abort",
                                   prompt_tokens=len(prompt), completion_tokens=tokens)
        answer = await in_thread(st.add_message, cid, user["id"], "assistant", text,
                                 model=worker.name, params=settings, finish_reason=finish,
                                 prompt_tokens=len(prompt), completion_tokens=tokens)
        yield sse({"type": "done", "message": answer})

    return EventStream(events(), on_close=group.abort)


# ---- arena ----------------------------------------------------------------------------------


@router.post("/arena/battles", response_model=None)
async def new_battle(request: Request, body: BattleBody) -> EventStream:
    """Two models drawn at random answer the same prompt, streamed side by side as A and B;
    their names are revealed only by the vote."""
    ws = workers(request)
    if not body.prompt.strip():
        raise APIError(400, "The prompt is empty.", param="prompt")
    if len(ws) < 2:
        raise APIError(400, "The arena needs at least two models; start the server with "
                            "--model twice.", code="arena_needs_two_models")
    name_a, name_b = random.sample(list(ws), 2)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
        {"role": "user", "content": body.prompt}]
    groups: list[Group] = []
    try:
        for name in (name_a, name_b):
            w = ws[name]
            chat = getattr(w.tokenizer, "chat_template", None) is not None
            if chat:
                prompt, max_tokens = fit_conversation(w, messages, body.params.max_tokens)
            else:  # a base model just continues the text
                prompt = w.tokenizer.encode_prompt(body.prompt)
                max_tokens = resolve_max_tokens(
                    w, len(prompt), min(body.params.max_tokens or DEFAULT_MAX_TOKENS,
                                        max(w.max_seq_len - len(prompt), 1)))
            params = sampling_params(body.params, max_tokens=max_tokens, logprobs=0, chat=chat)
            check_params(w, params)
            groups.append(await submit(w, [(prompt, params)]))
    except BaseException:
        for g in groups:
            g.abort()
        raise
    settings = body.params.model_dump(exclude_none=True, exclude={"stream", "n"})
    st = store(request)

    async def events() -> AsyncIterator[str]:
        merged: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def pump(side: str, group: Group) -> None:
            try:
                async for _, ev in group.events():
                    await merged.put((side, ev))
            except Exception as e:
                await merged.put((side, e))

        tasks = [asyncio.create_task(pump(s, g)) for s, g in zip("ab", groups)]
        texts = {"a": "", "b": ""}
        try:
            pending = 2
            while pending:
                side, ev = await merged.get()
                if isinstance(ev, Exception):
                    raise ev
                texts[side] += ev.text
                if ev.text:
                    yield sse({"type": "delta", "side": side, "text": ev.text})
                if ev.finished:
                    pending -= 1
                    yield sse({"type": "finished", "side": side})
        finally:
            for t in tasks:
                t.cancel()
            for g in groups:
                g.abort()
        battle = await in_thread(st.add_battle, messages, name_a, name_b, texts["a"],
                                 texts["b"], settings)
        yield sse({"type": "battle", "id": battle["id"]})

    def close() -> None:
        for g in groups:
            g.abort()

    return EventStream(events(), on_close=close)


@router.post("/arena/battles/{bid}/vote")
async def vote(request: Request, bid: str, body: VoteBody) -> dict[str, Any]:
    battle = await in_thread(store(request).vote, bid, body.winner)
    return {"id": bid, "winner": battle["winner"], "model_a": battle["model_a"],
            "model_b": battle["model_b"]}


@router.get("/arena/leaderboard")
async def get_leaderboard(request: Request) -> dict[str, Any]:
    votes = await in_thread(store(request).votes)
    board = await in_thread(leaderboard, votes, list(workers(request)))
    return {"votes": len(votes), "models": [r.as_dict() for r in board]}
