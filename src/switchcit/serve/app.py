"""The FastAPI app: endpoints, API key, metrics; and serving it on a background thread.

No `from __future__ import annotations` here: FastAPI must see the handlers' real `Request` annotations.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, TypeVar

from ..errors import SwitchcitError
from .config import ENDPOINTS, ServeConfig
from .connections import uvicorn_config
from .continuous import ContinuousEngine
from .engine import Engine, Job, Metrics, StaticEngine, client_gone
from .errors import ApiError, invalid
from .openai_api import Ask, openapi_body, parse_ask, response_body, stream_events, token_events
from .upstream import Upstream

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("switchcit.serve")
T = TypeVar("T")
HEARTBEAT_S = 0.5  # a quiet stream sends an SSE comment this often, so that a hung-up client is noticed


def create_app(config: ServeConfig) -> "FastAPI":
    """Load the store (the LLM too unless router-only) and build the app; the worker runs while it is served."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    continuous = config.engine == "continuous" and not config.upstream  # router-only: routing, never generation
    engine: Engine = (ContinuousEngine if continuous else StaticEngine)(config, metrics)
    upstream = Upstream(config, engine.cm.manifest.base_model) if config.upstream else None
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            if upstream:
                await upstream.client.aclose()

    app = FastAPI(title="switchcit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.engine, app.state.config = engine, config

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", param=None,
                              code=code))

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        """API key check, metrics, and a 500 error object (never a stack trace) for anything unexpected."""
        begin = time.perf_counter()
        path = request.url.path
        if config.api_key and path != "/health" and not secrets.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {config.api_key}".encode()):
            response = error(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                      code="invalid_api_key"))
        else:
            try:
                response = await call_next(request)
            except Exception:
                log.exception("unexpected error on %s", path)
                response = error(ApiError(500, "internal server error", "server_error"))
        metrics.observe(path if path in ENDPOINTS else "other", response.status_code, time.perf_counter() - begin)
        return response

    @app.get("/health", responses={503: {"description": "the worker has stopped: the server answers nothing"}})
    async def health() -> JSONResponse:
        body = {"status": "ok", "mode": "generate" if engine.generates else "router",
                "tasks": len(engine.cm.task_names)}
        if engine.reload_error:
            body["store"] = f"reloading the store fails, the tasks loaded before are served: {engine.reload_error}"
        if engine.dead:
            return JSONResponse({**body, "status": "error", "error": f"the worker stopped: {engine.dead}"}, 503)
        return JSONResponse(body)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": started, "owned_by": "switchcit"}
                                           for m in engine.models]}

    async def read_body(request: Request) -> bytes:
        """The body, refused past --max-body-bytes while it streams in; a client that hangs up is no server error."""
        from starlette.requests import ClientDisconnect

        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.max_body_bytes:
                    raise ApiError(413, f"the request body is larger than this server's limit of "
                                        f"{config.max_body_bytes} bytes", code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before the body arrived",
                           code="client_disconnected") from None
        return b"".join(chunks)

    async def complete(request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await asyncio.wait_for(read_body(request), config.body_timeout_s))
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {config.body_timeout_s:g} s",
                           code="request_timeout") from None
        except (ValueError, UnicodeDecodeError):
            raise invalid("the request body is not valid JSON") from None
        except RecursionError:
            raise invalid("the request body is nested too deeply") from None
        ask = parse_ask(body, chat, config, engine.models)
        if ask.stream and engine.streams:
            return await stream_tokens(ask)
        answers = await unless_client_leaves(request, engine.answer(ask.prompts, ask.task, ask.max_tokens,
                                                                    tuple(ask.stop)))
        if upstream is None:
            if ask.stream:
                return StreamingResponse(stream_events(ask, answers), media_type="text/event-stream")
            return JSONResponse(response_body(ask, answers))
        routes = [a.route for a in answers]
        if ask.stream:
            return StreamingResponse(await upstream.open_stream(ask, routes), media_type="text/event-stream")
        return JSONResponse(await upstream.complete(ask, routes))

    async def unless_client_leaves(request: Request, answer: Awaitable[T]) -> T:
        """`answer`, cancelled should the client hang up first: uvicorn never cancels a handler whose client left,
        and the cancelled request's rows leave the batch at the next step instead of generating for nobody."""
        work, left = asyncio.ensure_future(answer), asyncio.ensure_future(client_left(request))
        try:
            done, _ = await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done and left.exception() is None:
                raise client_gone()
            return await work  # (a connection that cannot be watched just waits for its answer)
        finally:
            left.cancel()
            work.cancel()

    async def stream_tokens(ask: Ask) -> Response:
        """Stream each prompt's tokens as they are decoded. Errors before the first token (a forgotten task, a
        prompt too long) are HTTP errors; a client that goes away cancels its jobs, freeing their rows."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(index: int, kind: str, value: object) -> None:  # called on the worker thread
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
                loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))

        def finished(index: int, future) -> None:
            if not future.cancelled():
                post(index, "done", future.exception() or future.result())

        jobs = [Job(p, ask.task, ask.max_tokens, tuple(ask.stop), lambda kind, value, i=i: post(i, kind, value))
                for i, p in enumerate(ask.prompts)]
        for index, job in enumerate(jobs):
            job.future.add_done_callback(lambda f, i=index: finished(i, f))
        engine.submit(jobs)
        routes, early, ended = {}, [], set()
        try:
            while len(routes) + len(ended) < len(jobs):  # every prompt routed, or ended before its first token
                index, kind, value = await events.get()
                if kind == "route":
                    routes[index] = value
                elif kind == "done":
                    ended.add(index)
                    if isinstance(value, Exception):
                        raise value
                early.append((index, kind, value))
        except BaseException:
            for job in jobs:
                job.cancelled = True
            raise

        async def rest() -> AsyncIterator[tuple[int, str, object]]:
            done = 0
            for item in early:
                if item[1] != "route":
                    done += item[1] == "done"
                    yield item
            while done < len(jobs):
                try:
                    item = await asyncio.wait_for(events.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:  # nothing to send for a while: a heartbeat, whose failed send tells
                    item = (0, "idle", None)  # of a client that hung up
                done += item[1] == "done"
                yield item

        async def body() -> AsyncIterator[str]:
            try:
                async for line in token_events(ask, [routes[i] for i in range(len(jobs))], rest()):
                    yield line
            finally:  # finished, failed, or the client went away: rows still generating leave at the next step
                for job in jobs:
                    job.cancelled = True

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", openapi_extra=openapi_body("chat"))
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions", openapi_extra=openapi_body("completion"))
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app


async def client_left(request) -> None:
    """Return once the client has hung up (the server's disconnect message, after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@contextmanager
def serve_in_thread(app: "FastAPI", host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve an app on a background thread (tests, benchmarks, notebooks); yields its base URL.

    Port 0 picks a free port.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="switchcit-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SwitchcitError("the server failed to start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
