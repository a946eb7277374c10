"""The continuous-batching engine: requests join the running batch at the next decoding step and leave it
the moment they are done, each with its own adapter, max_tokens and stop strings (batching.py).

Each loop of the worker takes the jobs that arrived and routes, in one encoder pass, as many as the batch
will admit at this step (its free places and prefill budget: a burst costs a step one group's routing,
not the whole burst's), hands them to the batch as sequences, and runs one step. Streams get their
tokens as they are decoded. Live store updates apply between steps; one that would change the adapter
of a row being generated waits, admitting no new rows, until those rows are done, so a request in
flight keeps its adapter.
"""

from __future__ import annotations

import logging
import queue
from collections import deque

from ..batching import Batcher, Sequence
from ..continual import BASE
from ..detokenize import IncrementalText
from ..generation import Generation, Route
from ..store import Manifest
from .config import POLL_SECONDS, ServeConfig
from .engine import Engine, Job, Metrics, client_gone, server_error
from .errors import ApiError, model_not_found

log = logging.getLogger("switchcit.serve")


class ContinuousEngine(Engine):
    streams = True

    def __init__(self, config: ServeConfig, metrics: Metrics):
        super().__init__(config, metrics)
        self.batcher = self._new_batcher()
        self._jobs: dict[Sequence, tuple[Job, Route]] = {}  # the batcher's sequences and their jobs
        self._arrived: deque[Job] = deque()  # taken off the queue, not yet routed

    def _new_batcher(self) -> Batcher:
        return Batcher(self.cm.adapters, self.config.max_batch_size, self.config.max_kv_tokens,
                       self.config.prefill_tokens)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._poll_store():
                    self._drop_forgotten()
                self._admit(self._take())
                if self.batcher.busy:
                    self.batcher.step()
                    if self.batcher.running:
                        self.metrics.batch_size.observe(len(self.batcher.running))
            except Exception as exc:
                self._recover(exc)
            try:  # the gauges only read the batch: their failure leaves every row sound, so it fails none
                self._gauge()
            except Exception:
                log.exception("updating the batch's gauges failed; the rows go on")

    def _recover(self, exc: Exception) -> None:
        """A failure that no guard of the batch absorbed: the batch's state is unknown, so its rows fail (500)
        and a fresh batch goes on with the jobs still waiting."""
        log.error("a worker step failed; the %d running and waiting sequence(s) fail", len(self._jobs), exc_info=exc)
        for job, _ in self._jobs.values():
            job.settle(server_error(exc, "generation"))
        self._jobs = {}
        self.batcher = self._new_batcher()

    def _take(self) -> list[tuple[Job, list[int]]]:
        """The jobs to admit this step, with their prompts' token ids. Every arrival leaves the queue (a job whose
        client left is answered and dropped), but from the head of the line only as many are taken as the batch
        has places for and one step's --prefill-tokens reads (the batch's own rule), so that a burst costs a
        step one group's routing and reading, not the whole burst's. An idle batch waits for the first arrival
        (up to the store poll)."""
        arrived: list[Job | None] = []
        try:
            if not self.batcher.busy and not self._arrived:
                arrived.append(self._queue.get(timeout=POLL_SECONDS))
            while True:
                arrived.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        self._arrived.extend(j for j in arrived if j is not None and j.future.set_running_or_notify_cancel())
        if any(job.cancelled for job in self._arrived):
            for job in [j for j in self._arrived if j.cancelled]:
                job.settle(client_gone())
            self._arrived = deque(j for j in self._arrived if not j.cancelled)
        b, taken = self.batcher, []
        room = self.config.max_batch_size - len(b.running) - len(b.prefilling) - len(b.waiting)
        while self._arrived and len(taken) < room:
            job = self._arrived[0]
            if job.ids is None:
                job.ids = self._encode(job)
                if job.ids is None or not self._fits_cache(job, job.ids):  # answered with its error
                    self._arrived.popleft()
                    continue
            widest = max(len(ids) for ids in [job.ids, *(ids for _, ids in taken)])
            if taken and (len(taken) + 1) * widest > self.config.prefill_tokens:
                break
            taken.append((self._arrived.popleft(), job.ids))
        return taken

    def _admit(self, jobs: list[tuple[Job, list[int]]]) -> None:
        """Route the jobs (one encoder pass for all) and queue them in the batch; a job that fails any of it fails
        alone."""
        routes = self._routes([job for job, _ in jobs])
        for job, ids in jobs:
            route = self._route_of(job, routes)
            if route is None:
                continue
            try:
                if job.listen:
                    job.listen("route", route)
                seq = Sequence(ids, route.task, job.max_tokens, IncrementalText(self.cm.tokenizer, job.stop),
                               self.cm.tokenizer.eos_token_id, on_text=self._text, on_done=self._done,
                               is_cancelled=lambda job=job: job.cancelled, arrived=job.arrived)
            except Exception as exc:
                self._fail([job], exc, "admission")
                continue
            self._jobs[seq] = job, route
            self.batcher.submit(seq)

    def _fits_cache(self, job: Job, ids: list[int]) -> bool:
        if len(ids) + job.max_tokens <= self.config.max_kv_tokens:
            return True
        job.settle(ApiError(400, f"a prompt of {len(ids)} tokens and max_tokens {job.max_tokens} need more than "
                                 f"this server's --max-kv-tokens {self.config.max_kv_tokens}", param="max_tokens",
                            code="context_length_exceeded"))
        return False

    def _text(self, seq: Sequence, text: str) -> None:
        job, _ = self._jobs[seq]
        if job.listen:
            job.listen("text", text)

    def _done(self, seq: Sequence) -> None:
        """Answer the sequence's job first (so that nothing after can leave it waiting), then count it."""
        job, route = self._jobs.pop(seq)
        if job.cancelled:
            job.settle(client_gone())
        elif seq.error is not None:
            job.settle(seq.error if isinstance(seq.error, ApiError) else server_error(seq.error, "generation"))
        else:
            job.settle(Generation(job.prompt, route.task, route.confidence, seq.output, len(seq.generated),
                                  seq.stopped, len(seq.prompt_ids), route.nearest, route.reason))
            self.metrics.ttft.observe(seq.first_token_at - seq.arrived)
            if len(seq.generated) > 1:
                self.metrics.tpot.observe((seq.finished_at - seq.first_token_at) / (len(seq.generated) - 1))

    def _refresh_deferred(self, manifest: Manifest) -> bool:
        """Whether following `manifest` now would change the adapter of a row being generated; if so, no new rows
        join until those are done."""
        before = {t.name: t.adapter for t in self.cm.tasks}
        after = {t.name: t.adapter for t in manifest.tasks}
        busy = {s.task for s in self.batcher.running + self.batcher.prefilling} - {BASE}
        self.batcher.admitting = all(before.get(t) == after.get(t) for t in busy)
        return not self.batcher.admitting

    def _drop_forgotten(self) -> None:
        """Waiting sequences whose task the store no longer has fail with model_not_found."""
        known = set(self.models)
        for seq in [s for s in self.batcher.waiting if s.task not in known]:
            self.batcher.waiting.remove(seq)
            seq.error = model_not_found(seq.task, self.models)
            self._done(seq)

    def _gauge(self) -> None:
        b, m = self.batcher, self.metrics
        m.running.set(len(b.running))
        self._decoding = len(b.running)
        m.kv_tokens.set(b.kv_tokens)
        m.kv_usage.set(b.kv_tokens / self.config.max_kv_tokens)
