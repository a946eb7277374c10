"""The continuous-batching engine: requests join the running batch at the next decoding step and leave it
the moment they are done, each with its own adapter, max_tokens and stop strings (batching.py).

Each loop of the worker takes the jobs that arrived, routes them in one encoder pass, hands them to the
batch as sequences, and runs one step. Streams get their tokens as they are decoded. Live store updates
apply between steps; one that would change the adapter of a row being generated waits, admitting no
new rows, until those rows are done, so a request in flight keeps its adapter.
"""

from __future__ import annotations

import logging
import queue

from ..batching import Batcher, Sequence
from ..continual import BASE
from ..detokenize import IncrementalText
from ..generation import Generation, Route
from .config import POLL_SECONDS, ServeConfig
from .engine import Engine, Job, Metrics, server_error
from .errors import ApiError, model_not_found

log = logging.getLogger("switchcit.serve")


class ContinuousEngine(Engine):
    streams = True

    def __init__(self, config: ServeConfig, metrics: Metrics):
        super().__init__(config, metrics)
        self.batcher = Batcher(self.cm.adapters, config.max_batch_size, config.max_kv_tokens, config.prefill_tokens)
        self._jobs: dict[Sequence, tuple[Job, Route]] = {}

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._poll_store():
                self._drop_forgotten()
            self._admit(self._take())
            if self.batcher.busy:
                self.batcher.step()
                if self.batcher.running:
                    self.metrics.batch_size.observe(len(self.batcher.running))
            self._gauge()

    def _take(self) -> list[Job]:
        """The jobs that arrived; when the batch is idle, wait for the first one (up to the store poll)."""
        jobs: list[Job | None] = []
        try:
            if not self.batcher.busy:
                jobs.append(self._queue.get(timeout=POLL_SECONDS))
            while True:
                jobs.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return [j for j in jobs if j is not None and not self._gone(j)]

    def _admit(self, jobs: list[Job]) -> None:
        """Check, route (one encoder pass for all) and queue the jobs in the batch; one bad job fails alone."""
        encoded = [(job, ids) for job in jobs if (ids := self._encode(job)) is not None and self._fits_cache(job, ids)]
        try:
            auto = [job for job, _ in encoded if job.task is None]
            routes = dict(zip(map(id, auto), self.cm.route([job.prompt for job in auto])))
        except Exception as exc:
            if len(encoded) < 2:
                self._fail([job for job, _ in encoded], exc, "routing")
            else:
                for job, _ in encoded:
                    self._admit([job])
            return
        for job, ids in encoded:
            route = self._route_of(job, routes)
            if route is None:
                continue
            if job.listen:
                job.listen("route", route)
            seq = Sequence(ids, route.task, job.max_tokens, IncrementalText(self.cm.tokenizer, job.stop),
                           self.cm.tokenizer.eos_token_id, on_text=self._text, on_done=self._done,
                           is_cancelled=lambda job=job: self._gone(job), arrived=job.arrived)
            self._jobs[seq] = job, route
            self.batcher.submit(seq)

    def _fits_cache(self, job: Job, ids: list[int]) -> bool:
        if len(ids) + job.max_tokens <= self.config.max_kv_tokens:
            return True
        job.future.set_exception(ApiError(400, f"a prompt of {len(ids)} tokens and max_tokens {job.max_tokens} need "
                                               f"more than this server's --max-kv-tokens {self.config.max_kv_tokens}",
                                          param="max_tokens", code="context_length_exceeded"))
        return False

    @staticmethod
    def _gone(job: Job) -> bool:
        return job.cancelled or job.future.cancelled()

    def _text(self, seq: Sequence, text: str) -> None:
        job, _ = self._jobs[seq]
        if job.listen:
            job.listen("text", text)

    def _done(self, seq: Sequence) -> None:
        job, route = self._jobs.pop(seq)
        if job.future.done():
            return
        if self._gone(job):
            job.future.cancel()
        elif seq.error is not None:
            job.future.set_exception(seq.error if isinstance(seq.error, ApiError)
                                     else server_error(seq.error, "generation"))
        else:
            self.metrics.ttft.observe(seq.first_token_at - seq.arrived)
            if len(seq.generated) > 1:
                self.metrics.tpot.observe((seq.finished_at - seq.first_token_at) / (len(seq.generated) - 1))
            job.future.set_result(Generation(job.prompt, route.task, route.confidence, seq.output,
                                             len(seq.generated), seq.stopped, len(seq.prompt_ids)))

    def _refresh_deferred(self) -> bool:
        """Whether following the store now would change the adapter of a row being generated; if so, no new rows
        join until those are done."""
        try:
            manifest = self.cm.store.read() if self.cm.store.exists() else None
        except Exception:
            return False  # refresh() reports it
        before = {t.name: t.adapter for t in self.cm.tasks}
        after = {t.name: t.adapter for t in manifest.tasks} if manifest else {}
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
        m.waiting.set(len(b.waiting) + len(b.prefilling) + self._queue.qsize())
        m.kv_tokens.set(b.kv_tokens)
        m.kv_usage.set(b.kv_tokens / self.config.max_kv_tokens)
