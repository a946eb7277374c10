"""The worker: one thread owns the model and answers queued jobs in mixed-adapter batches.

Request handlers queue jobs; the worker routes them with one encoder pass per group and generates,
and between batches (or steps) reloads the store when `switchcit learn` or `forget` changed its
manifest. `StaticEngine` gathers concurrent jobs into one batch (bounded size and wait) and generates
it to its end; the continuous engine (continuous.py) lets jobs join and leave at every token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from dataclasses import replace as with_fields

from ..continual import BASE, ContinualModel
from ..generation import Generation, Route
from .config import AUTO, POLL_SECONDS, ServeConfig
from .errors import ApiError, model_not_found

log = logging.getLogger("switchcit.serve")


@dataclass
class Job:
    prompt: str
    task: str | None  # a forced task or 'base'; None lets the switch decide
    max_tokens: int
    stop: tuple[str, ...] = ()  # the continuous engine stops there; the static one is cut afterwards
    listen: Callable[[str, object], None] | None = None  # streams: ('route', Route), then ('text', str) pieces
    cancelled: bool = False  # set by the request's handler when its client has gone
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


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
        self.waiting = Gauge("switchcit_waiting_sequences", "Sequences waiting to join the batch",
                             registry=self.registry)
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
        self._next_poll = time.monotonic() + POLL_SECONDS
        self._warm()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="switchcit-worker", daemon=True)

    @property
    def models(self) -> list[str]:
        return [AUTO, BASE, *self.cm.task_names]

    def _encode(self, job: Job) -> list[int] | None:
        """The prompt's token ids if within --max-prompt-tokens as the model sees it; if not, its job fails alone.
        Counted in the worker, the one thread that uses the tokenizer, before the job joins the batch."""
        from ..data import encode_prompt

        ids = encode_prompt(self.cm.tokenizer, job.prompt)
        if len(ids) <= self.config.max_prompt_tokens:
            return ids
        job.future.set_exception(ApiError(400, f"a prompt is {len(ids)} tokens long, more than this server's limit "
                                               f"of {self.config.max_prompt_tokens}", param="prompt",
                                          code="context_length_exceeded"))
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join()

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._queue.put(job)

    async def answer(self, prompts: list[str], task: str | None, max_tokens: int,
                     stop: tuple[str, ...] = ()) -> list[Generation]:
        """Queue one job per prompt and wait; a cancelled request drops its jobs that have not finished."""
        jobs = [Job(p, task, max_tokens, stop) for p in prompts]
        self.submit(jobs)
        return list(await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))

    def _run(self) -> None:
        raise NotImplementedError

    def _fail(self, jobs: list[Job], exc: Exception, stage: str) -> None:
        log.error("%s failed for a batch of %d", stage, len(jobs), exc_info=exc)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(server_error(exc, stage))

    def _warm(self) -> None:
        """Load now what requests will need, not on the first one: the LLM and every adapter (unless
        router-only, which never loads the LLM), and the encoder and switch once a task exists."""
        if self.generates:
            self.cm.model  # noqa: B018
            self.cm.load_adapters()
        if self.cm.switch is not None:
            self.cm.encoder  # noqa: B018

    def _poll_store(self) -> bool:
        """Between batches, follow the store if `learn` or `forget` changed it (True if it did); on failure keep
        serving and retry."""
        if time.monotonic() < self._next_poll or self._refresh_deferred():
            return False
        self._next_poll = time.monotonic() + POLL_SECONDS
        try:
            if not self.cm.refresh():
                return False
            self._warm()
        except Exception:
            log.exception("reloading store %s failed; serving the tasks loaded before and retrying", self.cm.store.root)
            return False
        log.info("store %s reloaded: tasks %s", self.cm.store.root, self.cm.task_names)
        return True

    def _refresh_deferred(self) -> bool:
        return False

    def _route_of(self, job: Job, routes: dict[int, Route]) -> Route | None:
        """The job's route (the switch's, or the task it forced), counted; None, the job failing with a 404, if
        that task was forgotten while the job waited."""
        route = routes.get(id(job)) or Route(job.task, None)
        if route.task not in self.models:
            job.future.set_exception(model_not_found(route.task, self.models))
            return None
        self.metrics.prompts.labels(route.task, "switch" if job.task is None else "forced").inc()
        return route


def server_error(exc: Exception, stage: str) -> ApiError:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return ApiError(500, f"{stage} failed: {type(exc).__name__}: {first_line}", "server_error")


class StaticEngine(Engine):
    """Static batches: concurrent jobs share a batch, generated to its longest answer before the next."""

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
        """Route and answer a batch. Should the batch fail, each job is tried alone: one bad row fails only itself."""
        jobs = [j for j in jobs if not self.generates or self._encode(j) is not None]
        if not jobs:
            return
        try:
            auto = [j for j in jobs if j.task is None]
            routes = dict(zip(map(id, auto), self.cm.route([j.prompt for j in auto])))
        except Exception as exc:
            if len(jobs) == 1:
                self._fail(jobs, exc, "routing")
            else:
                for job in jobs:
                    self._process([job])
            return
        by_length: dict[int, list[tuple[Job, Route]]] = {}
        for job in jobs:
            route = self._route_of(job, routes)
            if route is None:
                continue
            if self.generates:
                by_length.setdefault(job.max_tokens, []).append((job, route))
            else:
                job.future.set_result(Generation(job.prompt, route.task, route.confidence, ""))  # upstream answers
        # One generate call per max_tokens value keeps every answer equal to the same request run alone.
        for max_tokens, group in by_length.items():
            try:
                done = self.cm.generate([j.prompt for j, _ in group], [r.task for _, r in group], max_tokens,
                                        batch_size=len(group))
                answers = [with_fields(d, confidence=r.confidence) for (_, r), d in zip(group, done)]
            except Exception as exc:
                if len(group) == 1:
                    self._fail([j for j, _ in group], exc, "generation")
                else:
                    for job, _ in group:
                        self._process([job])
                continue
            for (job, _), answer in zip(group, answers):
                job.future.set_result(answer)
