"""The HTTP side of `vidqa serve` (FastAPI on uvicorn, the `serve` extra).

Routes: POST /v1/chat/completions (OpenAI chat format, streaming or not), GET /v1/models,
GET /health. Every error is OpenAI's error object with one line in `message`: 4xx for the
caller's mistakes (the CLI's own line where there is one), 5xx for failures, never a traceback
(the server's log gets it). A client that disconnects, while queued or generating, cancels its
request (vidqa/serve/worker.py). docs/serve.md describes the API.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vidqa import api
from vidqa.errors import BadInput, VidqaError
from vidqa.serve import media, protocol
from vidqa.serve.config import API_KEY_ENV, MIB, ServeConfig
from vidqa.serve.protocol import HTTPProblem
from vidqa.serve.worker import Job, Worker

log = logging.getLogger("vidqa.serve")
SHUTTING_DOWN = "the request was cancelled: the server is shutting down"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def status_of(error: BaseException) -> int:
    if isinstance(error, HTTPProblem):
        return error.status
    return 400 if isinstance(error, BadInput) else 500


def message_of(error: BaseException) -> str:
    """One line: a vidqa error's own, else the exception's type and text (the log has the rest)."""
    text = str(error) if isinstance(error, VidqaError) else f"internal error: {type(error).__name__}: {error}"
    return " ".join(text.split())


def error_response(error: BaseException) -> JSONResponse:
    status = status_of(error)
    headers = {"Retry-After": "1"} if status == 429 else {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(protocol.error_body(message_of(error), status), status_code=status, headers=headers)


class EventStream(StreamingResponse):
    """Server-sent events from an async iterator, watching for the client's disconnect the whole
    time (whatever the ASGI server's spec version): on disconnect `on_disconnect` runs and the
    iterator is closed, so its `finally` clauses run at once."""

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_disconnect = events, on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def listen() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.on_disconnect()
                group.cancel_scope.cancel()

            group.start_soon(listen)
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the connection broke while sending
                self.on_disconnect()
            finally:
                await self.events.aclose()
                group.cancel_scope.cancel()


async def until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def next_event(job: Job, receive) -> tuple[str, object]:
    """The job's next event; ClientGone (and the job cancelled) if the client leaves first."""
    getter = asyncio.ensure_future(job.events.get())
    listener = asyncio.ensure_future(until_disconnect(receive))
    done, _ = await asyncio.wait({getter, listener}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        listener.cancel()
        return getter.result()
    getter.cancel()
    job.cancel.set()
    raise ClientGone


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) beyond `limit` bytes: by its Content-Length, or as it arrives."""
    too_large = HTTPProblem(f"the request body is larger than {limit / MIB:g} MiB, this server's limit "
                            "(vidqa serve --max-body-mb)", 413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(model: api.Model, config: ServeConfig) -> FastAPI:
    """The server for a loaded model."""
    worker = Worker(model, config.cache_bytes, config.queue_limit)
    workdir = Path(tempfile.mkdtemp(prefix="vidqa-serve-"))  # uploads and fetches, for one request each
    started = int(time.time())
    name = config.model_name

    @asynccontextmanager
    async def lifespan(_app):
        workdir.mkdir(mode=0o700, exist_ok=True)  # again, if the app is started a second time
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    app = FastAPI(title="vidqa serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    checked: OrderedDict[api.Settings, None] = OrderedDict()  # settings that passed, LRU
    defaults = api.Settings()

    def check(settings: api.Settings) -> None:
        """api.check_settings, remembered for the last 1024 settings that passed, their free
        numbers (max tokens, temperature, seed) aside: it parses the preset's YAML, milliseconds
        a repeated request need not pay."""
        api.check_generation(settings.max_new_tokens, settings.temperature)
        key = settings.replace(max_new_tokens=defaults.max_new_tokens, temperature=defaults.temperature, seed=None)
        if key in checked:
            checked.move_to_end(key)
            return
        api.check_settings(key)
        checked[key] = None
        if len(checked) > 1024:
            checked.popitem(last=False)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPProblem("missing API key: send the header 'Authorization: Bearer KEY' "
                              f"(the server's --api-key or {API_KEY_ENV})", 401)
        if not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise HTTPProblem("wrong API key", 401)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):  # unknown route, wrong method
        return error_response(HTTPProblem(f"{error.detail}: see GET /v1/models, POST /v1/chat/completions, "
                                          "GET /health", error.status_code))

    @app.get("/health")
    async def health():
        """Liveness and load, for load balancers: no key needed."""
        return {"status": "ok", "model": name, "running": worker.running is not None, "waiting": worker.waiting,
                **worker.counts, "cache": worker.cache.summary()}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authorize(request)
        except HTTPProblem as error:
            return error_response(error)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "vidqa"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            authorize(request)
            body = await read_body(request, config.max_body_bytes)
            chat = protocol.parse_chat(body, model.settings, name, model.adapter.system_prompt)
            check(chat.settings)  # the preset, its budget, the frame options: before queueing
            if media.is_remote(chat.video):  # a download or a base64 decode: off the event loop
                video = await asyncio.to_thread(media.resolve, chat.video, config, workdir)
            else:  # a stat: a thread hop would cost more
                video = media.resolve(chat.video, config, workdir)
            job = Job(chat, video)
            worker.submit(job)
            first = await next_event(job, request.receive)
            if first[0] == "error":
                return error_response(first[1])
            if first[0] == "cancelled":
                return error_response(HTTPProblem(SHUTTING_DOWN, 503))
            if chat.stream:
                return EventStream(stream(job, first), job.cancel.set)
            return JSONResponse(protocol.completion(chat, name, first[1].record, first[1].cached_tokens))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nothing to log
        except Exception as error:
            if not isinstance(error, VidqaError):
                log.exception("request failed")
            return error_response(error)

    async def stream(job: Job, event) -> AsyncIterator[bytes]:
        """The SSE body: a role chunk, the answer's pieces, a last chunk with finish_reason and the
        `--json` record, the usage chunk when asked (stream_options.include_usage), [DONE]."""
        chat = job.request
        try:
            yield protocol.sse(protocol.chunk(chat, name, {"role": "assistant", "content": ""}))
            while True:
                kind, value = event
                if kind == "text":
                    yield protocol.sse(protocol.chunk(chat, name, {"content": value}))
                elif kind == "done":
                    record = value.record
                    yield protocol.sse(protocol.chunk(chat, name, {}, protocol.finish_reason(record), vidqa=record))
                    if chat.include_usage:
                        yield protocol.sse(protocol.chunk(chat, name, None,
                                                          usage=protocol.usage(record, value.cached_tokens)))
                    yield protocol.sse("[DONE]")
                    return
                elif kind == "error":  # after the 200: an error event, as vLLM sends
                    yield protocol.sse(protocol.error_body(message_of(value), status_of(value)))
                    return
                else:  # cancelled (server shutting down)
                    yield protocol.sse(protocol.error_body(SHUTTING_DOWN, 503))
                    return
                event = await job.events.get()
        finally:
            job.cancel.set()  # a no-op once done; stops the generation when the client has left

    return app


def serve_forever(app: FastAPI, sock, access_log: bool = False) -> None:
    """Run `app` on an already bound socket until Ctrl-C / SIGTERM (uvicorn's graceful shutdown:
    running requests are cancelled, at most 5 s)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            timeout_graceful_shutdown=5, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
