"""The HTTP face: OpenAI's endpoints, `/health`, and the one error barrier that answers every
failure in OpenAI's error shape.

Each request is checked (`protocol`), its model name resolved, and queued on the worker; the
answer is the job's events, whole or as server-sent events. A client that goes away cancels its
job, which stops at the next token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import LocalmixError, ModelNotFoundError
from ..events import Summary, TokenEvent
from ..store import BUILTIN, entry, list_models, resolve
from . import protocol
from .protocol import APIError, ChatBody, CompletionBody
from .worker import END, Job, Residency, Worker


class Models:
    """The gate for model names: the built-in ones, the store's, and the model the server was
    started with (which may be a directory). Other paths are refused: a client names models,
    not files on the server's disk."""

    def __init__(self, residency: Residency, default: str | None) -> None:
        self.residency, self.default = residency, default

    def resolve(self, name: str | None) -> tuple[str, Path]:
        engine = self.residency.engine
        if not name:
            if engine is not None and self.residency.path is not None:
                return engine.name, self.residency.path
            if self.default is None:
                raise protocol.bad_request("model is required: no model is loaded", "model")
            name = self.default
        if name in BUILTIN or name == self.default:
            try:
                return resolve(name)
            except LocalmixError as e:
                raise protocol.internal_error(str(e)) from None
        try:
            path = entry(name)
        except ModelNotFoundError:
            raise protocol.model_not_found(name) from None
        if not path.is_dir():
            raise protocol.model_not_found(name)
        return name, path

    def listing(self) -> list[dict[str, Any]]:
        """Every model a request may name, with whether it is loaded and talks in turns."""
        names = ["demo"] + [str(m["name"]) for m in list_models()]
        if self.default is not None and self.default not in names:
            names.append(self.default)
        return [self.describe(name) for name in names]

    def describe(self, name: str) -> dict[str, Any]:
        _, path = self.resolve(name)
        engine = self.residency.engine
        if engine is not None and self.residency.path != path:
            engine = None  # another model is loaded
        loaded = engine is not None
        chat = engine.template.chat_format if engine is not None else chat_template(path)
        info: dict[str, Any] = {"loaded": loaded, "chat_template": chat}
        if chat is False:
            info["note"] = (
                "a base model: the chat endpoint continues the conversation as one text, as "
                "`localmix chat` does"
            )
        if engine is not None:
            info["context_length"] = engine.context
        return {
            "id": name,
            "object": "model",
            "created": int(path.stat().st_mtime),
            "owned_by": "localmix",
            "localmix": info,
        }


def chat_template(path: Path) -> bool | None:
    """Whether the model in `path` has a chat template (None: its files cannot say)."""
    from ..tokenizer import Tokenizer, conversation_format

    try:
        return conversation_format(path, Tokenizer(path / "tokenizer.model")).chat_format
    except LocalmixError:
        return None


def create_app(
    residency: Residency,
    *,
    max_queue: int,
    default_model: str | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """The server's application around `residency` (the one resident engine); its worker
    thread runs while the application does."""
    worker = Worker(residency, max_queue)
    models = Models(residency, default_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="localmix", lifespan=lifespan)
    _error_barrier(app)
    keyed = [Depends(_key_check(api_key))] if api_key else []

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """What is loaded, its placement plan, cache statistics and the queue."""
        return {
            "status": "ok",
            "server": "localmix",
            "model": _model_status(residency),
            "keep_alive_s": residency.keep_alive,
            "queue": worker.status(),
        }

    @app.get("/v1/models", dependencies=keyed)
    async def list_all() -> dict[str, Any]:
        return {"object": "list", "data": await asyncio.to_thread(models.listing)}

    @app.get("/v1/models/{name:path}", dependencies=keyed)
    async def retrieve(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(models.describe, name)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatBody, http: Request) -> Any:
        return await _answer(protocol.chat_request(body), http, models, worker)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionBody, http: Request) -> Any:
        return await _answer(protocol.completion_request(body), http, models, worker)

    return app


async def _answer(request: protocol.Request, http: Request, models: Models, worker: Worker) -> Any:
    """Queue the request and answer with its events: whole, or streamed. The first event is
    awaited before answering, so an error before any text (a prompt too long for the window, a
    model that cannot load) has its own status code."""
    name, path = models.resolve(request.model)
    job = Job(request, name, path, asyncio.get_running_loop())
    worker.submit(job)
    watcher = asyncio.create_task(_cancel_on_disconnect(http, job))
    try:
        first = await job.stream.get()
        if isinstance(first, APIError):
            raise first
    except BaseException:
        _finish(job, watcher)
        raise
    rid = protocol.new_id(request.kind)
    if request.stream:
        stream = _sse(request, rid, job, first, watcher)
        return StreamingResponse(stream, media_type="text/event-stream")
    try:
        summary = await _summary(job, first)
    finally:
        _finish(job, watcher)
    return protocol.answer(request, rid, name, summary)


async def _summary(job: Job, item: object) -> Summary:
    while item is not END:
        if isinstance(item, APIError):
            raise item
        if isinstance(item, Summary):
            return item
        item = await job.stream.get()
    raise protocol.internal_error("the request was cancelled")


async def _sse(
    request: protocol.Request, rid: str, job: Job, item: object, watcher: asyncio.Task
) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunks, then `data: [DONE]`. An error after the first
    token can only be a last event holding the error object."""
    model = job.model
    try:
        if request.kind == "chat":
            yield _data(protocol.chunk(request, rid, model, None))
        while item is not END:
            if isinstance(item, APIError):
                yield _data(item.body())
                break
            if isinstance(item, TokenEvent):
                ids = [item.token_id]
                yield _data(protocol.chunk(request, rid, model, item.text, token_ids=ids))
            elif isinstance(item, Summary):
                ids = item.token_ids
                yield _data(protocol.chunk(request, rid, model, None, summary=item, token_ids=ids))
                if request.include_usage:
                    yield _data(protocol.usage_chunk(request, rid, model, item))
            item = await job.stream.get()
        yield "data: [DONE]\n\n"
    finally:
        _finish(job, watcher)


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(http: Request, job: Job) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _finish(job: Job, watcher: asyncio.Task) -> None:
    job.cancel()  # a no-op once the job is done; otherwise it stops at the next token
    watcher.cancel()


def _model_status(residency: Residency) -> dict[str, Any] | None:
    engine = residency.engine
    if engine is None:
        return None
    stats = engine.stats()
    return {
        "name": engine.name,
        "path": str(residency.path),
        "chat_template": engine.template.chat_format,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "context": engine.context,
        "context_used": engine.cache.used,
        "plan": str(engine.plan) if engine.plan is not None else None,
        "kernels": engine.kernels(),
        "memory": engine.memory(),
        "cache": stats.to_dict() if stats is not None else {},
        "expires_in_s": residency.idle_left(),
    }


def _key_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    async def check(http: Request) -> None:
        if http.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(
                401,
                "Incorrect API key provided: send the server's --api-key as a bearer token "
                "(`localmix run` and `chat` send $LOCALMIX_API_KEY)",
                code="invalid_api_key",
            )

    return check


def _error_barrier(app: FastAPI) -> None:
    """Every failure answers in OpenAI's error shape with its status code."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return await api_error(_, protocol.bad_request("the body is not valid JSON"))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return await api_error(_, protocol.bad_request(message, where or None))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return await api_error(_, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def bug(_: Request, e: Exception) -> JSONResponse:
        return await api_error(_, protocol.internal_error(f"{type(e).__name__}: {e}"))
