"""The web UI's "Inside" tab: the logit lens, attention maps and embedding neighbours.

    POST /v1/inside/lens        {"model"?, "prompt", "answer"?, "k"?}
    POST /v1/inside/attention   {"model"?, "text", "layer"?}
    POST /v1/inside/neighbours  {"model"?, "word", "k"?}

Both run the `explain` tools (the same code as `kotonoha explain lens|attention`) on the
worker thread between two engine steps, so they never race a generation. Attention returns
one layer at a time (every head): all layers of a 30-layer model would be megabytes of JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, Request
from pydantic import Field

from kotonoha.errors import UserError
from kotonoha.serve.api import get_worker
from kotonoha.serve.openai import APIError, _Request

router = APIRouter()

# Attention maps grow with tokens squared; the tab is for looking at a sentence or two.
MAX_ATTENTION_TOKENS = 128


class LensRequest(_Request):
    model: str | None = None
    prompt: str
    answer: str | None = None
    k: int = Field(5, ge=1, le=20)


class AttentionRequest(_Request):
    model: str | None = None
    text: str
    layer: int | None = None  # None = the last layer


class NeighboursRequest(_Request):
    model: str | None = None
    word: str
    k: int = Field(10, ge=1, le=50)


@router.post("/v1/inside/lens")
async def lens(request: Request, body: LensRequest) -> dict[str, Any]:
    from kotonoha.explain.lens import logit_lens

    return await _run_tool(request, body.model, body.prompt, "prompt",
                           lambda model, tok: logit_lens(model, tok, body.prompt,
                                                         body.answer or None, k=body.k))


@router.post("/v1/inside/attention")
async def attention(request: Request, body: AttentionRequest) -> dict[str, Any]:
    from kotonoha.explain.attention import attention_maps
    from kotonoha.explain.common import encode

    worker = get_worker(request, body.model)
    _require_text(body.text, "text")
    n_layer = worker.engine.model.cfg.n_layer
    layer = n_layer - 1 if body.layer is None else body.layer
    if not 0 <= layer < n_layer:
        raise APIError(400, f"'layer' must be between 0 and {n_layer - 1} for this model, got "
                            f"{layer}.", param="layer")
    try:
        n_tokens = len(encode(worker.tokenizer, body.text))
    except UserError as e:
        raise APIError(400, str(e), param="text") from None
    if n_tokens > MAX_ATTENTION_TOKENS:
        raise APIError(400, f"The text is {n_tokens} tokens; the attention view takes at most "
                            f"{MAX_ATTENTION_TOKENS}.", param="text")

    def run(engine: Any) -> dict[str, Any]:
        with torch.inference_mode():
            maps = attention_maps(engine.model, worker.tokenizer, body.text)
        weights = torch.round(maps.weights[layer], decimals=4)
        return {"tokens": maps.tokens, "ids": maps.ids, "n_layer": n_layer,
                "n_head": weights.shape[0], "layer": layer, "attention": weights.tolist()}

    result = await _call(worker, run, "text")
    return {"model": worker.name, "text": body.text, **result}


@router.post("/v1/inside/neighbours")
async def neighbours(request: Request, body: NeighboursRequest) -> dict[str, Any]:
    from kotonoha.explain.embeddings import nearest_neighbours

    return await _run_tool(request, body.model, body.word, "word",
                           lambda model, tok: nearest_neighbours(model, tok, body.word, body.k))


async def _run_tool(request: Request, model_name: str | None, text: str, param: str,
                    tool: Callable[[Any, Any], dict[str, Any]]) -> dict[str, Any]:
    """`tool(model, tokenizer)` on the worker thread, for a non-empty `text`."""
    worker = get_worker(request, model_name)
    _require_text(text, param)

    def run(engine: Any) -> dict[str, Any]:
        with torch.inference_mode():
            return tool(engine.model, worker.tokenizer)

    result = await _call(worker, run, param)
    return {"model": worker.name, **result}


async def _call(worker: Any, fn: Any, param: str) -> dict[str, Any]:
    try:
        return await worker.call(fn)
    except UserError as e:  # an empty or too long text: the client's mistake
        raise APIError(400, str(e), param=param) from None


def _require_text(text: str, param: str) -> None:
    if not text.strip():
        raise APIError(400, f"'{param}' is empty; give the text to look inside.", param=param)
