"""`kotonoha serve`: the FastAPI application and how it is started.

One process serves one or more models. Each model has a `ModelWorker` (its engine, stepped
by one thread: continuous batching); the OpenAI-compatible API (`api.py`) and the web UI
(`ui.py`, static files in `static/`) both generate through them. The UI's conversations,
feedback and arena votes live in a SQLite file (`store.py`).

Every error leaves as an OpenAI-shaped JSON object with a 4xx status (5xx only for a bug),
and no input can bring the server down.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kotonoha.errors import UserError
from kotonoha.serve import api, inside, ui
from kotonoha.serve.cli import DEFAULT_DB
from kotonoha.serve.openai import APIError, error_body
from kotonoha.serve.store import Conflict, NotFound, Store
from kotonoha.serve.worker import EngineFailure, ModelWorker

log = logging.getLogger("kotonoha.serve")

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 8 * 1024 * 1024  # lm-eval sends batches of token-id prompts; 8 MiB is plenty
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/ui/api/")  # what --api-key guards


def create_app(workers: list[ModelWorker], store: Store, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The application for already-loaded models. The workers and the store are closed when
    the application shuts down."""
    if not workers:
        raise UserError("Give at least one model to serve.")
    names = [w.name for w in workers]
    if len(set(names)) != len(names):
        raise UserError(f"Two served models have the same name ({names}); name them with "
                        "--model NAME=PATH.")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for w in workers:
            w.close()
        store.close()

    # No /docs page: FastAPI's loads Swagger UI from a CDN, and this server works offline.
    app = FastAPI(title="kotonoha", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.workers = {w.name: w for w in workers}
    app.state.store = store
    app.state.api_key = api_key
    app.include_router(api.router)
    app.include_router(inside.router)
    app.include_router(ui.router)
    _install_error_handlers(app)
    # Outermost last: the size limit applies before anything reads the body.
    app.add_middleware(AuthMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "auth": api_key is not None, "models": {
            w.name: {"running": w.running, "busy": w.busy, "submitted": w.stats.submitted,
                     "completed": w.stats.completed, "aborted": w.stats.aborted,
                     "peak_running": w.stats.peak_running, "tokens": w.stats.tokens,
                     "max_batch_size": w.engine.max_batch_size, "max_seq_len": w.max_seq_len}
            for w in workers}}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---- errors ---------------------------------------------------------------------------------


def _json_error(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(e.errors())
        return _json_error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 404 and message == "Not Found":
            message = f"There is no endpoint {request.url.path}; see docs/API.md."
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return _json_error(e.status_code, message, code=code.get(e.status_code))

    @app.exception_handler(UserError)
    async def user_error(_: Request, e: UserError) -> JSONResponse:
        return _json_error(400, str(e))

    @app.exception_handler(NotFound)
    async def not_found(_: Request, e: NotFound) -> JSONResponse:
        return _json_error(404, str(e), code="not_found")

    @app.exception_handler(Conflict)
    async def conflict(_: Request, e: Conflict) -> JSONResponse:
        return _json_error(409, str(e), code="conflict")

    @app.exception_handler(EngineFailure)
    async def engine_failure(_: Request, e: EngineFailure) -> JSONResponse:
        return _json_error(500, str(e), type="server_error")

    @app.exception_handler(Exception)
    async def bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _json_error(500, f"The server failed to handle this request ({type(e).__name__}"
                                "); this is a bug in kotonoha.", type="server_error")


def _describe_validation(errors: Any) -> tuple[str, str | None]:
    """One sentence and the offending parameter, from pydantic's list of errors."""
    if not errors:
        return "The request body is invalid.", None
    err = errors[0]
    if err.get("type") == "json_invalid":
        return ("The request body is not valid JSON "
                f"({err.get('ctx', {}).get('error', 'parse error')}); send a JSON object."), None
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # pydantic reports every member of a union; the field path before the type name is enough.
    while len(loc) > 1 and not loc[-1].isdigit() and ("[" in loc[-1] or loc[-1] in (
            "str", "int", "float", "list", "bool", "dict")):
        loc.pop()
    param = ".".join(loc) or None
    msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ").rstrip(".")
    if err.get("type") == "missing":
        return f"'{param}' is required.", param
    if param is None:
        return f"The request body is invalid: {msg}.", None
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"Invalid '{param}': {msg}{shown}.", param


# ---- middleware -----------------------------------------------------------------------------


class AuthMiddleware:
    """With an API key, API calls need `Authorization: Bearer KEY`; the page, its static files
    and /health stay open (the page asks for the key and sends it)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.api_key is None or scope["type"] != "http"
                or not scope["path"].startswith(PROTECTED)):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        # Compared as bytes: a key with non-ASCII characters arrives as its UTF-8 bytes.
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(),
                                                                  self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if auth else
                   "This server needs an API key: send the header 'Authorization: Bearer KEY'.")
        response = _json_error(401, message, code="invalid_api_key")
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once when Content-Length says so, else as soon as
    the streamed body passes the limit (so a huge upload is never held in memory)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = (f"The request body is larger than this server's limit of {self.max_bytes} "
                   "bytes; send fewer or shorter prompts per request.")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _json_error(413, too_big, code="request_too_large")(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, too_big)
            return message

        await self.app(scope, limited, send)


# ---- starting the server --------------------------------------------------------------------


def load_served_model(spec: str, *, tokenizer: str | None = None, device: str | None = None,
                      dtype: str | None = None,
                      quantize: str | None = None) -> tuple[str, Any, Any]:
    """(name, model, tokenizer) for `--model [NAME=]PATH`: PATH is anything
    `checkpoint.load_for_inference` opens (a model or HF directory, a .gguf file, a packaged
    name, or a preset with `tokenizer`); NAME defaults to the directory or file name."""
    from kotonoha.checkpoint import load_for_inference

    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists():
        name, path = "", spec
    model, tok = load_for_inference(path, tokenizer=tokenizer, device=device, dtype=dtype,
                                    quantize=quantize)
    if not name:
        p = Path(path)
        name = (p.parent.name if p.name == "model" else p.stem if p.is_file() else p.name) or path
    return name, model, tok


def serve_main(models: list[str], host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, db: str | Path | None = None, *,
               tokenizer: str | None = None, device: str | None = None, dtype: str | None = None,
               quantize: str | None = None, max_batch_size: int = 16, max_seq_len: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, threads: int | None = None,
               log_level: str = "info") -> None:
    """Load the models and serve them until interrupted (`kotonoha serve`).

    `models`: `[NAME=]PATH` or preset names (random weights, need `tokenizer`); `db`: the
    SQLite file of the web UI (default runs/kotonoha.db); `max_seq_len`: the context window
    served (default: the model's, at most 4096, which bounds the KV cache); `threads`: torch's
    CPU threads (on a small CPU, fewer than the cores leaves room for the HTTP side).
    """
    import torch
    import uvicorn

    from kotonoha.engine import DEFAULT_MAX_SEQ_LEN

    if not models:
        raise UserError("Give at least one --model to serve.")
    if max_batch_size < 1:
        raise UserError(f"--max-batch-size must be at least 1, got {max_batch_size}.")
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}.")
        torch.set_num_threads(threads)
    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", host)
    loaded = [load_served_model(spec, tokenizer=tokenizer, device=device, dtype=dtype,
                                quantize=quantize) for spec in models]
    store = Store(db or DEFAULT_DB)
    workers = []
    for name, model, tok in loaded:
        seq = max_seq_len or min(model.cfg.context_length, DEFAULT_MAX_SEQ_LEN)
        workers.append(ModelWorker(name, model, tok, max_batch_size=max_batch_size,
                                   max_seq_len=min(seq, model.cfg.context_length)))
    app = create_app(workers, store, api_key=api_key, max_body_bytes=max_body_bytes)
    shown = f"[{host}]" if ":" in host else host
    print(f"kotonoha: serving {', '.join(w.name for w in workers)} on http://{shown}:{port} "
          f"(web UI at /, OpenAI API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
