"""OpenAI-compatible HTTP server over a store: each request is answered with its task's adapter.

One worker thread owns the model. Request handlers queue jobs; the worker gathers concurrent jobs
into one mixed-adapter batch (bounded size and wait), routes them with one encoder pass, generates,
and between batches reloads the store when `switchcit learn` or `forget` changed its manifest.
In router-only mode (`--upstream`) the worker only routes, and each request is forwarded to an
OpenAI-compatible multi-LoRA server (vLLM, LoRAX, another switchcit) under its adapter's name.
Web libraries are imported inside functions so that `switchcit --help` stays fast (hence no
`from __future__ import annotations`: FastAPI must see the handlers' real `Request` annotations).
"""

import argparse
import asyncio
import json
import logging
import os
import queue
import re
import secrets
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .continual import BASE, ContinualModel, Route
from .data import encode_prompt
from .errors import SwitchcitError
from .store import Store

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI

AUTO = "switchcit"  # the model name that lets the switch pick the task
MAX_PROMPTS = 128  # prompts in one /v1/completions request
POLL_SECONDS = 1.0  # how often the worker looks for a changed manifest
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
log = logging.getLogger("switchcit.serve")


@dataclass
class ServeConfig:
    store: str
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    fallback: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    max_tokens: int = 512
    max_prompt_chars: int = 16000
    upstream: str | None = None
    upstream_base_model: str | None = None
    upstream_api_key: str | None = None
    upstream_timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise SwitchcitError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0:
            raise SwitchcitError("--max-wait-ms must not be negative")


class ApiError(Exception):
    """An error answered as an OpenAI error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- the worker ----------------------------------------------------------------------------------


@dataclass
class Job:
    prompt: str
    task: str | None  # a forced task or 'base'; None lets the switch decide
    max_tokens: int
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Answer:
    route: Route
    text: str = ""  # empty in router-only mode, where the upstream generates
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Metrics:
    """Prometheus metrics in a registry of their own, so several servers can live in one process."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("switchcit_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("switchcit_errors", "HTTP requests answered with a 4xx or 5xx error",
                              ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("switchcit_request_latency_seconds", "Time to answer a request (streams: "
                                 "to the first byte)", ["endpoint"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.prompts = Counter("switchcit_routed_prompts", "Prompts by the task that answered them and how it "
                               "was chosen (switch, or forced by the request's model)", ["task", "source"],
                               registry=self.registry)
        self.batch_size = Histogram("switchcit_batch_size", "Jobs per worker batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Engine:
    """Owns the ContinualModel. Only its worker thread touches the model, so batches never interleave."""

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.generates = config.upstream is None
        self.cm = ContinualModel(config.store, base_model=config.model, device=config.device, dtype=config.dtype,
                                 progress=False, fallback=config.fallback)
        self.cm.store.read()  # a clear error now if the store is missing or corrupt
        self._stamp = self._manifest_stamp()
        self._next_poll = time.monotonic() + POLL_SECONDS
        if self.generates:
            self.cm.model  # noqa: B018 - load the base model now, not on the first request
            self.cm.load_adapters()
        if self.cm.switch is not None:
            self.cm.encoder  # noqa: B018 - router-only mode loads the encoder and switch, never the LLM
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="switchcit-worker", daemon=True)

    @property
    def models(self) -> list[str]:
        return [AUTO, BASE, *self.cm.task_names]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join()

    async def answer(self, prompts: list[str], task: str | None, max_tokens: int) -> list[Answer]:
        """Queue one job per prompt and wait; a cancelled request drops its jobs that have not started."""
        jobs = [Job(p, task, max_tokens) for p in prompts]
        for job in jobs:
            self._queue.put(job)
        return list(await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll_store()
            jobs = self._gather()
            if jobs:
                self.metrics.batch_size.observe(len(jobs))
                self._process(jobs)

    def _gather(self) -> list[Job]:
        """Block for one job, then take more until the batch is full or the wait is over."""
        try:
            first = self._queue.get(timeout=POLL_SECONDS)
        except queue.Empty:
            return []
        jobs = [first]
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while jobs[-1] is not None and len(jobs) < self.config.max_batch_size:
            try:
                jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return [j for j in jobs if j is not None and j.future.set_running_or_notify_cancel()]

    def _process(self, jobs: list[Job]) -> None:
        try:
            auto = [j for j in jobs if j.task is None]
            routes = dict(zip(map(id, auto), self.cm.route([j.prompt for j in auto])))
        except Exception as exc:
            self._fail(jobs, exc, "routing")
            return
        known = set(self.models)
        by_length: dict[int, list[tuple[Job, Route]]] = {}
        for job in jobs:
            route = routes.get(id(job)) or Route(job.task, None)
            if route.task not in known:  # forgotten while the request waited
                job.future.set_exception(_model_not_found(route.task, self.models))
                continue
            self.metrics.prompts.labels(route.task, "switch" if job.task is None else "forced").inc()
            if self.generates:
                by_length.setdefault(job.max_tokens, []).append((job, route))
            else:
                job.future.set_result(Answer(route))
        # One generate call per max_tokens value keeps every answer equal to the same request run alone.
        for max_tokens, group in by_length.items():
            try:
                texts = self.cm.generate_with([j.prompt for j, _ in group], [r.task for _, r in group], max_tokens,
                                              batch_size=len(group))
                tokenizer = self.cm.tokenizer
                answers = [Answer(r, t, len(encode_prompt(tokenizer, j.prompt)),
                                  len(tokenizer(t, add_special_tokens=False)["input_ids"]))
                           for (j, r), t in zip(group, texts)]
            except Exception as exc:
                self._fail([j for j, _ in group], exc, "generation")
                continue
            for (job, _), answer in zip(group, answers):
                job.future.set_result(answer)

    def _fail(self, jobs: list[Job], exc: Exception, stage: str) -> None:
        log.error("%s failed for a batch of %d", stage, len(jobs), exc_info=exc)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        error = ApiError(500, f"{stage} failed: {type(exc).__name__}: {first_line}", "server_error")
        for job in jobs:
            job.future.set_exception(error)

    def _manifest_stamp(self) -> tuple | None:
        try:
            stat = os.stat(self.cm.store.manifest_path)
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _poll_store(self) -> None:
        """Between batches, reload the store if its manifest was replaced; on failure keep serving and retry."""
        if time.monotonic() < self._next_poll:
            return
        self._next_poll = time.monotonic() + POLL_SECONDS
        stamp = self._manifest_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            self.cm.refresh()
            if self.generates:
                self.cm.load_adapters()
            if self.cm.switch is not None:
                self.cm.encoder  # noqa: B018 - the first task of a store brings the encoder
        except Exception:
            log.exception("reloading store %s failed; serving the tasks loaded before and retrying", self.cm.store.root)
            return
        self._stamp = stamp
        log.info("store %s reloaded: tasks %s", self.cm.store.root, self.cm.task_names)


def _model_not_found(model: str, models: list[str]) -> ApiError:
    return ApiError(404, f"model '{model}' does not exist: use '{AUTO}' (routed by the switch), '{BASE}' or a task "
                    f"name ({', '.join(models[2:]) or 'none learned yet'})", param="model", code="model_not_found")


# -- requests ------------------------------------------------------------------------------------


@dataclass
class Ask:
    """A validated chat or completion request."""

    chat: bool
    model: str
    prompts: list[str]
    single: bool  # one prompt given as a string: the "switchcit" field is an object, not a list
    max_tokens: int
    stream: bool
    include_usage: bool
    stop: list[str]
    body: dict  # as received, forwarded in router-only mode

    @property
    def task(self) -> str | None:
        return None if self.model == AUTO else self.model


def _text(content: object, param: str) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise _invalid("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported", param)
        return "".join(p["text"] for p in content)
    raise _invalid("message content must be a string or a list of text parts", param)


def _chat_prompt(body: dict, max_chars: int) -> str:
    """The last user message: what the switch reads and the expert answers, as in training."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    texts, prompt = [], None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        texts.append(_text(message.get("content"), f"messages[{i}].content"))
        if message["role"] == "user":
            prompt = texts[-1]
    if prompt is None:
        raise _invalid("'messages' has no user message", "messages")
    if sum(map(len, texts)) > max_chars:
        raise _invalid(f"the messages are longer than this server's limit of {max_chars} characters", "messages",
                       "context_length_exceeded")
    return prompt


def _completion_prompts(body: dict, max_chars: int) -> tuple[list[str], bool]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _invalid("'prompt' must be a string or a non-empty list of strings (token arrays are not "
                       "supported)", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise _invalid(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    if any(len(p) > max_chars for p in prompts):
        raise _invalid(f"a prompt is longer than this server's limit of {max_chars} characters", "prompt",
                       "context_length_exceeded")
    return prompts, isinstance(prompt, str)


def _max_tokens(body: dict, limit: int) -> int:
    name = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    if name is None:
        return limit
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise _invalid(f"'{name}' must be an integer from 1 to {limit}", name)
    return value


def parse_ask(body: object, chat: bool, config: ServeConfig, models: list[str]) -> Ask:
    """Validate a request body; raises ApiError (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid(f"'model' is required: '{AUTO}' routes each request, '{BASE}' or a task name forces it",
                       "model")
    if chat:
        prompts, single = [_chat_prompt(body, config.max_prompt_chars)], True
    else:
        prompts, single = _completion_prompts(body, config.max_prompt_chars)
    max_tokens = _max_tokens(body, config.max_tokens)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _invalid("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    if body.get("n") not in (None, 1):
        raise _invalid("only n=1 is supported: answers are greedy, so more would be copies", "n")
    if model not in models:
        raise _model_not_found(model, models)
    return Ask(chat, model, prompts, single, max_tokens, stream, bool(options.get("include_usage")), stop, body)


# -- responses -----------------------------------------------------------------------------------


def _routing(ask: Ask, routes: list[Route]) -> dict | list[dict]:
    fields = [{"task": r.task, "confidence": None if r.confidence is None else round(r.confidence, 4)}
              for r in routes]
    return fields[0] if ask.single else fields


def _finish(ask: Ask, answer: Answer) -> tuple[str, str]:
    """The answer cut at the first stop string, and OpenAI's finish_reason."""
    cuts = [answer.text.find(s) for s in ask.stop if s in answer.text]
    if cuts:
        return answer.text[:min(cuts)], "stop"
    return answer.text, "length" if answer.completion_tokens >= ask.max_tokens else "stop"


def _usage(answers: list[Answer]) -> dict:
    prompt, completion = sum(a.prompt_tokens for a in answers), sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(ask: Ask, streaming: bool) -> dict:
    kind = ("chat.completion.chunk" if streaming else "chat.completion") if ask.chat else "text_completion"
    prefix = "chatcmpl" if ask.chat else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
            "model": ask.model}


def response_body(ask: Ask, answers: list[Answer]) -> dict:
    choices = []
    for index, answer in enumerate(answers):
        text, reason = _finish(ask, answer)
        content = {"message": {"role": "assistant", "content": text}} if ask.chat else {"text": text}
        choices.append({"index": index, **content, "logprobs": None, "finish_reason": reason})
    return {**_head(ask, False), "choices": choices, "usage": _usage(answers),
            "switchcit": _routing(ask, [a.route for a in answers])}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def stream_events(ask: Ask, answers: list[Answer]) -> Iterator[str]:
    """The finished answers as SSE chunks of about a word each; the first chunk carries the routing."""
    head = _head(ask, True)
    extra = {"switchcit": _routing(ask, [a.route for a in answers])}

    def chunk(index: int, text: str | None, reason: str | None = None, role: bool = False) -> str:
        nonlocal extra
        if ask.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        event, extra = _sse({**head, "choices": [choice], **extra}), {}
        return event

    for index, answer in enumerate(answers):
        text, reason = _finish(ask, answer)
        if ask.chat:
            yield chunk(index, None, role=True)
        for piece in re.findall(r"\s*\S+", text):
            yield chunk(index, piece)
        yield chunk(index, None, reason)
    if ask.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(answers)})
    yield _sse("[DONE]")


# -- router-only mode ----------------------------------------------------------------------------


class Upstream:
    """Forwards routed requests to an OpenAI-compatible multi-LoRA server, the task's adapter as `model`."""

    def __init__(self, config: ServeConfig, base_model: str):
        import httpx

        url = config.upstream.rstrip("/")
        self.url = url if url.endswith("/v1") else f"{url}/v1"
        self.base_model = config.upstream_base_model or base_model
        headers = {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=config.upstream_timeout)

    def _bodies(self, ask: Ask, routes: list[Route]) -> list[dict]:
        """One upstream request per prompt, since each prompt may need another adapter."""
        bodies = []
        for prompt, route in zip(ask.prompts, routes):
            body = dict(ask.body, model=self.base_model if route.task == BASE else route.task)
            if not ask.chat:
                body["prompt"] = prompt
            bodies.append(body)
        return bodies

    def _path(self, ask: Ask) -> str:
        return f"{self.url}/chat/completions" if ask.chat else f"{self.url}/completions"

    async def _send(self, ask: Ask, body: dict) -> "httpx.Response":
        import httpx

        try:
            response = await self.client.send(self.client.build_request("POST", self._path(ask), json=body),
                                              stream=True)
        except httpx.HTTPError as exc:
            raise ApiError(502, f"upstream {self.url} failed: {type(exc).__name__}: {exc}", "upstream_error") from None
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            raise _upstream_error(response)
        return response

    async def complete(self, ask: Ask, routes: list[Route]) -> dict:
        async def one(body: dict) -> dict:
            response = await self._send(ask, body)
            await response.aread()
            try:
                return response.json()
            except ValueError:
                raise ApiError(502, f"upstream answered invalid JSON: {response.text[:200]}",
                               "upstream_error") from None

        results = await asyncio.gather(*(one(b) for b in self._bodies(ask, routes)))
        choices = [dict(c, index=i) for i, r in enumerate(results) for c in r.get("choices", [])[:1]]
        usage = {k: sum((r.get("usage") or {}).get(k, 0) for r in results)
                 for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {**results[0], "model": ask.model, "choices": choices, "usage": usage,
                "switchcit": _routing(ask, routes)}

    async def open_stream(self, ask: Ask, routes: list[Route]) -> AsyncIterator[str]:
        """Relay the upstream streams one prompt after another; opening the first one raises its error."""
        bodies = self._bodies(ask, routes)
        first = await self._send(ask, bodies[0])

        async def events() -> AsyncIterator[str]:
            extra = {"switchcit": _routing(ask, routes)}
            response = first
            try:
                for index, body in enumerate(bodies):
                    if response is None:
                        try:
                            response = await self._send(ask, body)
                        except ApiError as exc:
                            yield _sse(exc.body())
                            return
                    async for line in response.aiter_lines():
                        data = line[5:].strip() if line.startswith("data:") else ""
                        if not data or data == "[DONE]":
                            continue
                        chunk = json.loads(data)
                        if "error" in chunk:
                            yield _sse(chunk)
                            return
                        chunk["model"] = ask.model
                        for choice in chunk.get("choices") or []:
                            choice["index"] = index
                        yield _sse({**chunk, **extra})
                        extra = {}
                    await response.aclose()
                    response = None
                yield _sse("[DONE]")
            finally:
                if response is not None:
                    await response.aclose()

        return events()


def _upstream_error(response: "httpx.Response") -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, f"upstream: {error['message']}", error.get("type", "upstream_error"),
                        error.get("param"), error.get("code"))
    except (ValueError, KeyError, TypeError):
        return ApiError(502, f"upstream answered HTTP {response.status_code}: {response.text[:200]}",
                        "upstream_error")


def vllm_command(store: str | Path) -> str:
    """A `vllm serve` command that serves the store's base model with every task's adapter under its name."""
    from .models import model_location

    store = Store(store)
    manifest = store.read()
    reference = manifest["base_model"]["reference"]
    with redirect_stdout(sys.stderr):  # converting the embedded model prints a note; stdout is the command
        location = model_location(reference)
    rank = max([t.get("lora", {}).get("r", 8) for t in manifest["tasks"]], default=8)
    rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    command = ["vllm", "serve", location]
    if location != reference:  # router-only mode names the base model by the store's reference
        command += ["--served-model-name", reference]
    command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max(1, len(manifest["tasks"])))]
    if manifest["tasks"]:
        command += ["--lora-modules", *[f"{t['name']}={store.path(t['adapter']).resolve()}"
                                        for t in manifest["tasks"]]]
    return shlex.join(command)


# -- the app -------------------------------------------------------------------------------------


def create_app(config: ServeConfig) -> "FastAPI":
    """Load the store (the LLM too unless router-only) and build the app; the worker runs while it is served."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    engine = Engine(config, metrics)
    upstream = Upstream(config, engine.cm.manifest["base_model"]["reference"]) if config.upstream else None
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

    app = FastAPI(title="switchcit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

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

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "mode": "generate" if engine.generates else "router",
                "tasks": len(engine.cm.task_names)}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": started, "owned_by": "switchcit"}
                                           for m in engine.models]}

    async def complete(request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise _invalid("the request body is not valid JSON") from None
        ask = parse_ask(body, chat, config, engine.models)
        if upstream is None:
            answers = await engine.answer(ask.prompts, ask.task, ask.max_tokens)
            if ask.stream:
                return StreamingResponse(stream_events(ask, answers), media_type="text/event-stream")
            return JSONResponse(response_body(ask, answers))
        routes = [a.route for a in await engine.answer(ask.prompts, ask.task, ask.max_tokens)]
        if ask.stream:
            return StreamingResponse(await upstream.open_stream(ask, routes), media_type="text/event-stream")
        return JSONResponse(await upstream.complete(ask, routes))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app


@contextmanager
def serve_in_thread(app: "FastAPI", host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve an app on a background thread (tests, benchmarks, notebooks); yields its base URL.

    Port 0 picks a free port.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
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


# -- command line --------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `switchcit serve` and its options."""
    p = subparsers.add_parser("serve", help="serve a store over an OpenAI-compatible HTTP API")
    p.add_argument("--store", required=True, help="store folder (tasks learned while serving are picked up live)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SWITCHCIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SWITCHCIT_API_KEY; /health stays open)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most requests in one batch (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill up")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask (the default)")
    p.add_argument("--max-prompt-chars", type=int, default=16000, help="longest prompt accepted, in characters")
    p.add_argument("--upstream", default=None, metavar="URL", help="router-only mode: route, then forward to this "
                   "OpenAI-compatible multi-LoRA server (e.g. vLLM) with the task's adapter as model")
    p.add_argument("--upstream-base-model", default=None, help="the upstream's name for the base model "
                   "(default: the store's base model reference)")
    p.add_argument("--upstream-api-key", default=os.environ.get("SWITCHCIT_UPSTREAM_API_KEY"),
                   help="API key for the upstream (default: $SWITCHCIT_UPSTREAM_API_KEY)")
    p.add_argument("--print-vllm-command", action="store_true",
                   help="print the `vllm serve` command that serves this store's adapters, then exit")
    p.add_argument("--no-fallback", action="store_true",
                   help="always use the nearest task's adapter, even for prompts unlike every learned task")
    p.add_argument("--model", default=None, help="base model (default: the store's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> None:
    if args.print_vllm_command:
        print(vllm_command(args.store))
        return
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="switchcit: %(message)s")
    config = ServeConfig(store=args.store, model=args.model, device=args.device, dtype=args.dtype,
                         fallback=not args.no_fallback, host=args.host, port=args.port, api_key=args.api_key,
                         max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_tokens=args.max_tokens,
                         max_prompt_chars=args.max_prompt_chars, upstream=args.upstream,
                         upstream_base_model=args.upstream_base_model, upstream_api_key=args.upstream_api_key)
    if not config.api_key and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", config.host)
    app = create_app(config)
    mode = f"routing to {config.upstream}" if config.upstream else "generating"
    log.info("serving store %s (%d tasks, %s) on http://%s:%d/v1", config.store, len(app.state.engine.cm.task_names),
             mode, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
