"""Server-sent events that stop generating the moment the client goes away.

Starlette's `StreamingResponse` notices a disconnect only when a write fails (ASGI 2.4) or
cancels the stream without telling the generator's owner; a request waiting in the engine's
queue would then keep its place. `EventStream` listens for `http.disconnect` while it streams
and, whichever way the stream ends, closes the generator and calls `on_close`, which aborts
the engine requests and so frees their KV-cache rows before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from kotonoha.serve.openai import APIError, error_body

log = logging.getLogger("kotonoha.serve")

DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], *, on_close: Callable[[], None] | None = None,
                 done: bool = True) -> None:
        self.events, self.on_close, self.done = events, on_close, done
        self.status_code = 200
        self.background = None
        # no-cache: proxies must not buffer; X-Accel-Buffering: nginx must not either.
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        pump = asyncio.create_task(self._pump(send))
        listen = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, listen}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, listen):
                task.cancel()
            for task in (pump, listen):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                self.on_close()

    async def _pump(self, send: Send) -> None:
        async def write(text: str, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": more})

        try:
            async for chunk in self.events:
                await write(chunk)
        except APIError as e:
            await write(sse(e.body()))
        except OSError:  # the client is gone
            return
        except Exception as e:  # headers are sent: the error has to travel as an event
            log.exception("stream failed")
            await write(sse(error_body(f"The server failed while streaming: {e}",
                                       type="server_error")))
        await write(DONE if self.done else "", more=False)


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
