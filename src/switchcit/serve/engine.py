"""The worker: one thread owns the model and answers queued jobs in mixed-adapter batches.

Request handlers queue jobs; the worker routes them with one encoder pass per group and generates,
and between batches (or steps) reloads the store when `switchcit learn` or `forget` changed its
manifest. `StaticEngine` gathers concurrent jobs into one batch (bounded size and wait) and generates
it to its end; the continuous engine (continuous.py) lets jobs join and leave at every token.

Every job is answered: the queue is bounded (--max-queue, then 429), every iteration of the worker is
guarded (a failure answers the jobs it touched with a 500 and the loop goes on), and should the worker
thread ever end, every open job gets a 503, `/health` says so, and new jobs are refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from dataclasses import replace as with_fields

from ..adapters import AdapterMissing
from ..continual import BASE, ContinualModel
from ..generation import Generation, Route
from ..store import Manifest
from .config import AUTO, POLL_SECONDS, RETRY_AFTER_S, ServeConfig
from .errors import ApiError, model_not_found

log = logging.getLogger("switchcit.serve")


@dataclass(eq=False)
class Job:
    prompt: str
    task: str | None  # a forced task or 'base'; None lets the switch decide
    max_tokens: int
    stop: tuple[str, ...] = ()  # the continuous engine stops there; the static one is cut afterwards
    listen: Callable[[str, object], None] | None = None  # streams: ('route', Route), then ('text', str) pieces
    cancelled: bool = False  # set by the request's handler when its client has gone
    ids: list[int] | None = None  # the prompt's token ids, once the worker counted them (continuous engine)
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)

    def settle(self, outcome: Generation | Exception) -> None:
        """Answer the job, once: a later answer (a guard's, or the worker's last) is ignored."""
        with contextlib.suppress(InvalidStateError):
            if isinstance(outcome, Exception):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)


class Metrics:
    """Prometheus metrics in a registry of their own, so several servers can live in one process."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.batch_size = Histogram("switchcit_batch_size", "Jobs per worker batch (continuous engine: rows per "
                                    "decoding step)", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        token_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("switchcit_time_to_first_token_seconds", "From a request's arrival to its first "
                              "generated token", registry=self.registry, buckets=token_buckets)
        self.tpot = Histogram("switchcit_time_per_output_token_seconds", "Mean time between a sequence's tokens "
                              "after the first", registry=self.registry, buckets=token_buckets)
        self.running = Gauge("switchcit_running_sequences", "Sequences in the running batch", registry=self.registry)
        self.waiting = Gauge("switchcit_waiting_sequences", "Prompts accepted and not yet being generated (the "
                             "queue that --max-queue bounds)", registry=self.registry)
        self.kv_tokens = Gauge("switchcit_kv_cache_tokens", "KV-cache cells in use (rows x columns, padding "
                               "included)", registry=self.registry)
        self.kv_usage = Gauge("switchcit_kv_cache_usage_ratio", "KV-cache cells in use over --max-kv-tokens",
                              registry=self.registry)

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

    streams = False  # whether answers stream token by token as they are made

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.generates = config.upstream is None
        self.cm = ContinualModel(config.store, base_model=config.model, device=config.device, dtype=config.dtype,
                                 progress=False, fallback=config.fallback)
        self.cm.store.read()  # a clear error now if the store is missing or corrupt
        self.dead: str | None = None  # why the worker stopped, once it has
        self.reload_error: str | None = None  # why the last store reload failed, while it keeps failing
        self._next_poll = time.monotonic() + POLL_SECONDS
        self._unapplied: Manifest | None = None  # the manifest last read, until it is followed
        self._warm()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._open: set[Job] = set()  # accepted and not yet answered
        self._decoding = 0  # of those, the ones being generated (set by the worker)
        self._lock = threading.Lock()
        metrics.waiting.set_function(lambda: len(self._open) - self._decoding)  # live, even while a step runs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="switchcit-worker", daemon=True)

    @property
    def models(self) -> list[str]:
        return [AUTO, BASE, *self.cm.task_names]

    def _encode(self, job: Job) -> list[int] | None:
        """The prompt's token ids if within --max-prompt-tokens as the model sees it; if not (or if the tokenizer
        fails on it), its job fails alone. Counted in the worker, the one thread that uses the tokenizer."""
        from ..data import encode_prompt

        try:
            ids = encode_prompt(self.cm.tokenizer, job.prompt)
        except Exception as exc:
            self._fail([job], exc, "tokenization")
            return None
        if len(ids) <= self.config.max_prompt_tokens:
            return ids
        job.settle(ApiError(400, f"a prompt is {len(ids)} tokens long, more than this server's limit of "
                                 f"{self.config.max_prompt_tokens}", param="prompt", code="context_length_exceeded"))
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs for the worker, or refuse them all: 503 if the worker has stopped, 400 if they could never
        fit, 429 (with Retry-After) if they would take the prompts waiting for a place in the batch past --max-queue."""
        limit = self.config.max_batch_size + self.config.max_queue
        with self._lock:
            if self.dead is not None:
                raise ApiError(503, f"this server cannot answer: its worker stopped ({self.dead}); restart it",
                               "server_error", code="worker_stopped")
            if len(jobs) > limit:  # no retry could ever fit it: the client must split it
                raise ApiError(400, f"this request has {len(jobs)} prompts and this server holds at most {limit} "
                                    "at once (--max-batch-size + --max-queue): send them in smaller requests",
                               param="prompt", code="too_many_prompts")
            if len(self._open) + len(jobs) > limit:
                raise ApiError(429, f"this server is busy: {len(self._open)} prompts are in flight, at most "
                                    f"{limit} may be (--max-batch-size + --max-queue); retry in {RETRY_AFTER_S} s",
                               "rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._open.update(jobs)
        for job in jobs:
            job.future.add_done_callback(lambda _, job=job: self._close(job))
            self._queue.put(job)

    def _close(self, job: Job) -> None:
        with self._lock:
            self._open.discard(job)

    async def answer(self, prompts: list[str], task: str | None, max_tokens: int,
                     stop: tuple[str, ...] = ()) -> list[Generation]:
        """Queue one job per prompt and wait. Should the caller give up (its client left) or one prompt fail, the
        request's other jobs are dropped at the next step."""
        jobs = [Job(p, task, max_tokens, stop) for p in prompts]
        self.submit(jobs)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))
        except BaseException:
            for job in jobs:
                job.cancelled = True
            raise

    def _serve(self) -> None:
        """The worker thread. Its loop guards every iteration; should the thread end all the same, nothing waits
        for it: open jobs get a 503 and new ones are refused (see `submit`)."""
        try:
            self._run()
        except BaseException as exc:
            log.critical("the worker stopped; every request now gets a 503", exc_info=exc)
            self.dead = f"{type(exc).__name__}: {_first_line(exc)}"
        finally:
            with self._lock:
                if self.dead is None and not self._stop.is_set():
                    self.dead = "its loop ended"
                failed, self._open = list(self._open), set()
            for job in failed:
                job.settle(ApiError(503, "this server stopped before answering: "
                                         f"{self.dead or 'it is shutting down'}", "server_error",
                                    code="worker_stopped"))

    def _run(self) -> None:
        raise NotImplementedError

    def _fail(self, jobs: list[Job], exc: Exception, stage: str) -> None:
        log.error("%s failed for %d job(s)", stage, len(jobs), exc_info=exc)
        for job in jobs:
            job.settle(server_error(exc, stage))

    def _warm(self) -> None:
        """Load now what requests will need, not on the first one: the LLM and every adapter (unless
        router-only, which never loads the LLM), and the encoder and switch once a task exists."""
        if self.generates:
            self.cm.model  # noqa: B018
            self.cm.load_adapters()
        if self.cm.switch is not None:
            self.cm.encoder  # noqa: B018

    def _poll_store(self) -> bool:
        """Between batches, follow the store if `learn` or `forget` changed it (True if it did). The manifest is
        read once a second and followed as read: what `_refresh_deferred` checked is what is applied. On
        failure, keep serving what is loaded and retry at the next read."""
        if time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + POLL_SECONDS
            try:
                self._unapplied = self.cm.store.read() if self.cm.store.exists() else None
            except Exception as exc:
                self._reload_failed(exc)
        if self._unapplied is None or self._refresh_deferred(self._unapplied):
            return False
        manifest, self._unapplied = self._unapplied, None
        try:
            changed = self.cm.refresh(manifest, load_missing=self.generates)
            if changed:
                self._warm()
        except Exception as exc:
            self._reload_failed(exc)
            return False
        self.reload_error = None
        if changed:
            log.info("store %s reloaded: tasks %s", self.cm.store.root, self.cm.task_names)
        return changed

    def _reload_failed(self, exc: Exception) -> None:
        log.error("reloading store %s failed; serving the tasks loaded before and retrying", self.cm.store.root,
                  exc_info=exc)
        self.reload_error = f"{type(exc).__name__}: {_first_line(exc)}"

    def _refresh_deferred(self, manifest: Manifest) -> bool:
        return False

    def _routes(self, jobs: list[Job]) -> dict[int, Route]:
        """The switch's route of each job that lets it decide, in one encoder pass. Should the pass fail, each
        job is routed alone, so that one bad prompt fails only itself (with a 500, left out of the result)."""
        auto = [job for job in jobs if job.task is None]
        if not auto:
            return {}
        try:
            return dict(zip(map(id, auto), self.cm.route([job.prompt for job in auto])))
        except Exception as exc:
            if len(auto) == 1:
                self._fail(auto, exc, "routing")
                return {}
        return {key: route for job in auto for key, route in self._routes([job]).items()}

    def _route_of(self, job: Job, routes: dict[int, Route]) -> Route | None:
        """The job's route (the switch's, or the task it forced), counted; None if the job failed: its routing
        did, or the task it forced was forgotten while it waited (a 404)."""
        if job.task is None and id(job) not in routes:
            return None
        route = routes.get(id(job)) or Route(job.task, None)
        if route.task not in self.models:
            job.settle(model_not_found(route.task, self.models))
            return None
        self.metrics.prompts.labels(route.task, "switch" if job.task is None else "forced").inc()
        return route


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def server_error(exc: Exception, stage: str) -> ApiError:
    """A 500 naming the failure; a 503 when a task's adapter is not loaded (the store is being reloaded)."""
    if isinstance(exc, AdapterMissing):
        return ApiError(503, f"{stage} failed: {_first_line(exc)}; retry shortly", "server_error",
                        code="adapter_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    return ApiError(500, f"{stage} failed: {type(exc).__name__}: {_first_line(exc)}", "server_error")


class StaticEngine(Engine):
    """Static batches: concurrent jobs share a batch, generated to its longest answer before the next."""

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs: list[Job] = []
            try:
                self._poll_store()
                jobs = self._gather()
                self._decoding = len(jobs)
                if jobs:
                    self.metrics.batch_size.observe(len(jobs))
                    self._process(jobs)
            except Exception as exc:  # whatever failed, the batch's jobs are answered and the loop goes on
                self._fail(jobs, exc, "serving")
            self._decoding = 0

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
        """Route and answer a batch. Should the batch fail, each job is tried alone: one bad row fails only itself."""
        for job in [j for j in jobs if j.cancelled]:
            job.settle(client_gone())
        jobs = [j for j in jobs if not j.cancelled and (not self.generates or self._encode(j) is not None)]
        routes = self._routes(jobs)
        by_length: dict[int, list[tuple[Job, Route]]] = {}
        for job in jobs:
            route = self._route_of(job, routes)
            if route is None:
                continue
            if self.generates:
                by_length.setdefault(job.max_tokens, []).append((job, route))
            else:
                job.settle(Generation(job.prompt, route.task, route.confidence, "", nearest=route.nearest,
                                      reason=route.reason))  # the upstream answers
        # One generate call per max_tokens value keeps every answer equal to the same request run alone.
        for max_tokens, group in by_length.items():
            try:
                done = self.cm.generate([j.prompt for j, _ in group], [r.task for _, r in group], max_tokens,
                                        batch_size=len(group))
                answers = [with_fields(d, confidence=r.confidence, nearest=r.nearest, reason=r.reason)
                           for (_, r), d in zip(group, done)]
            except Exception as exc:
                if len(group) == 1:
                    self._fail([j for j, _ in group], exc, "generation")
                else:
                    for job, _ in group:
                        self._process([job])
                continue
            for (job, _), answer in zip(group, answers):
                job.settle(answer)


def client_gone() -> ApiError:
    """The answer of a job whose client left (nobody reads it; it closes the job)."""
    return ApiError(400, "the client closed the connection before its answer was ready", code="client_disconnected")
