"""The server under faults and bursts: faults injected once into the real engine (a method or a torch call that
raises on one call), replacement adapters that cannot be read, a forget at the worst moment, clients that
leave, and a burst of 1,000 requests. Every request is answered or refused, never left hanging."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from test_serve import _metric, _running, app

from switchcit import batching
from switchcit.batching import Batcher
from switchcit.continual import ContinualModel
from switchcit.detokenize import IncrementalText
from switchcit.kvcache import AppendingLayer
from switchcit.serve import serve_in_thread
from switchcit.serve.continuous import ContinuousEngine


class Fault(RuntimeError):
    """The injected failure."""


def fail_once(monkeypatch, owner: object, name: str, when: Callable[..., bool] = lambda *a: True,
              error: BaseException | None = None) -> list[bool]:
    """Fault injection: `owner.name` raises on its first call for which `when(*args)` holds, and works as before on
    every other call. Returns a list that holds True once the fault fired."""
    real, fired = getattr(owner, name), []

    def once(*args, **kwargs):
        if not fired and when(*args):
            fired.append(True)
            raise error or Fault(f"injected fault in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, once)
    return fired


@pytest.fixture(scope="module")
def served(trained_store):
    """One continuous-engine server for the fault cases (each case restores what it patched)."""
    server = app(trained_store, api_key=None, max_tokens=400)
    with serve_in_thread(server) as url:
        yield url, server.state.engine


def long_stream(url: str, max_tokens: int = 200) -> list[str]:
    """A streamed answer of the base model (the tiny random one does not end early); its SSE data lines."""
    body = {"model": "base", "prompt": "hello", "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def ended_well(lines: list[str]) -> bool:
    return lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)


def await_running(url: str) -> None:
    deadline = time.monotonic() + 30
    while _running(url) < 1:
        assert time.monotonic() < deadline, "the long answer never started"
        time.sleep(0.01)


def shorts(url: str, prompts: list[str]) -> list[httpx.Response]:
    """Short requests that join the running batch: routed, forced to a task, and of the base model."""
    bodies = [{"model": model, "prompt": p, "max_tokens": 4} for model, p in zip(["switchcit", "initials", "base"],
                                                                                  prompts)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=60), bodies))


def running(engine: ContinuousEngine, rows: int) -> Callable[..., bool]:
    return lambda *args: len(engine.batcher.running) >= rows


def _fallback_cat(monkeypatch, engine: ContinuousEngine) -> list[bool]:
    """A forward of 2+ rows fails once, and then `torch.cat`, putting together the rows retried alone, fails."""
    failed = fail_once(monkeypatch, Batcher, "_call", when=lambda self, seqs, *a: len(seqs) > 1)
    return fail_once(monkeypatch, torch, "cat",
                     when=lambda *a: bool(failed) and sys._getframe(2).f_code.co_filename == batching.__file__)


# Each point of the worker that once let an exception end it, or that a fault could reach: how to inject the fault
# there, and whether the long answer running beside it must survive it (None: it depends on the moment).
POINTS = {
    "rows leaving (_Rows.select)": (lambda mp, e: fail_once(mp, batching._Rows, "select", running(e, 2)), None),
    "rows joining (_joined)": (lambda mp, e: fail_once(mp, batching, "_joined", running(e, 1)), False),
    "the forward's fallback (torch.cat)": (_fallback_cat, None),
    "reading prompts (_read_prompts)": (lambda mp, e: fail_once(mp, Batcher, "_read_prompts", running(e, 1)), True),
    "admitting (_start_prefill)": (lambda mp, e: fail_once(mp, Batcher, "_start_prefill", running(e, 1)), True),
    "decoding (_decode)": (lambda mp, e: fail_once(mp, Batcher, "_decode", running(e, 2)), False),
    "dropping cancelled rows": (lambda mp, e: fail_once(mp, Batcher, "_drop_cancelled", running(e, 1)), False),
    "the KV cache (AppendingLayer.update)": (lambda mp, e: fail_once(mp, AppendingLayer, "update", running(e, 2)),
                                             None),
    "detokenizing (IncrementalText.add)": (lambda mp, e: fail_once(mp, IncrementalText, "add", running(e, 2)), None),
    "tokenizing a prompt": (lambda mp, e: fail_once(mp, sys.modules["switchcit.data"], "encode_prompt",
                                                    running(e, 1)), True),
    "routing (the encoder pass)": (lambda mp, e: fail_once(mp, e.cm, "route", running(e, 1)), True),
    "metrics of a finished row": (lambda mp, e: fail_once(mp, e.metrics.ttft, "observe", running(e, 1)), True),
    "reloading the store": (lambda mp, e: fail_once(mp, e.cm, "refresh"), True),
    "the batch's gauges (_gauge)": (lambda mp, e: fail_once(mp, e, "_gauge", running(e, 2)), True),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_fault_at_any_step_phase_answers_every_request_and_the_server_serves_on(served, stream, monkeypatch,
                                                                                   point):
    url, engine = served
    inject, long_survives = POINTS[point]
    prompts = [stream[0][1].prompts[2], stream[1][1].prompts[2], stream[2][1].prompts[2]]
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(long_stream, url)
        await_running(url)
        fired = inject(monkeypatch, engine)
        answers = shorts(url, prompts)
        lines = long.result(timeout=120)  # no hang: the long answer ends, with its text or an error event
    deadline = time.monotonic() + 10
    while not fired:  # the store reload runs once a second; every other point fires during the requests
        assert time.monotonic() < deadline, f"the fault at {point} never fired"
        time.sleep(0.05)
    for response in answers:
        assert response.status_code in (200, 500), response.text
        if response.status_code != 200:
            assert response.json()["error"]["type"] == "server_error" and "Fault" in response.text
    if long_survives is not None:
        assert ended_well(lines) is long_survives, lines[-2:]
    if not ended_well(lines):
        assert "Fault" in lines[-1] and '"server_error"' in lines[-1]  # the stream ends with an error event
    monkeypatch.undo()
    again = shorts(url, prompts)
    assert [r.status_code for r in again] == [200, 200, 200]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    deadline = time.monotonic() + 10
    while _running(url) > 0:  # no row outlives its request
        assert time.monotonic() < deadline, "a row stayed in the batch"
        time.sleep(0.05)


@pytest.mark.parametrize("point", ["tokenizing a prompt", "routing", "the batch's metrics", "generating"])
def test_the_static_engine_answers_every_request_under_a_fault(trained_store, stream, monkeypatch, point):
    server = app(trained_store, api_key=None, engine="static")
    engine = server.state.engine
    inject = {"tokenizing a prompt": lambda: fail_once(monkeypatch, sys.modules["switchcit.data"], "encode_prompt"),
              "routing": lambda: fail_once(monkeypatch, engine.cm, "route"),
              "the batch's metrics": lambda: fail_once(monkeypatch, engine.metrics.batch_size, "observe"),
              "generating": lambda: fail_once(monkeypatch, engine.cm, "generate")}[point]
    prompts = [stream[0][1].prompts[2], stream[1][1].prompts[2], stream[2][1].prompts[2]]
    with serve_in_thread(server) as url:
        fired = inject()
        answers = shorts(url, prompts)
        assert fired
        assert all(r.status_code in (200, 500) for r in answers)
        monkeypatch.undo()
        assert [r.status_code for r in shorts(url, prompts)] == [200, 200, 200]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


class WorkerKilled(BaseException):
    """A fault that no `except Exception` catches: it ends the worker thread."""


def test_a_stopped_worker_shows_in_health_and_every_request_gets_a_503(trained_store, monkeypatch):
    server = app(trained_store, api_key=None, max_tokens=400)
    with serve_in_thread(server) as url, ThreadPoolExecutor(1) as pool:
        long = pool.submit(long_stream, url)
        await_running(url)
        fail_once(monkeypatch, Batcher, "step", error=WorkerKilled("injected"))
        lines = long.result(timeout=60)  # the running request is answered, not left hanging
        assert "worker_stopped" in lines[-1]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "WorkerKilled" in health.json()["error"]
        for body in ({"model": "base", "prompt": "hi", "max_tokens": 2},
                     {"model": "base", "prompt": "hi", "max_tokens": 2, "stream": True}):
            refused = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_stopped"


def _write_manifest(store: Path, manifest: dict) -> None:
    tmp = store / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, store / "manifest.json")


def _await_health(url: str, failing: bool) -> None:
    deadline = time.monotonic() + 30
    while ("store" in httpx.get(f"{url}/health").json()) is not failing:
        assert time.monotonic() < deadline, f"the store reload never {'failed' if failing else 'recovered'}"
        time.sleep(0.1)


def test_an_unreadable_replacement_keeps_the_old_adapter_never_the_base_model(store_copy, stream):
    """A committed replacement of 'reverse' whose weights cannot be read: 'reverse' keeps answering with its
    old adapter (never the base model under its name); once the file is whole, the replacement answers."""
    library = ContinualModel(store_copy, progress=False)
    candidates = ["hello", "zebra zebra zebra", *[p for _, test in stream for p in test.prompts[:10]]]
    answers = {task: [(a.output, a.tokens) for a in library.generate(candidates, [task] * len(candidates), 6)]
               for task in ("reverse", "initials", "base")}  # the tiny experts differ in text or length
    index = next(i for i in range(len(candidates)) if len({answers[t][i] for t in answers}) == 3)
    prompt = candidates[index]
    manifest = json.loads((store_copy / "manifest.json").read_text())
    reverse = next(t for t in manifest["tasks"] if t["name"] == "reverse")
    initials = next(t for t in manifest["tasks"] if t["name"] == "initials")
    replacement = store_copy / "adapters" / "reverse" / "0123456789ab"
    shutil.copytree(store_copy / initials["adapter"], replacement)  # new weights: initials' answers
    weights = replacement / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x00" * 64)

    def ask(model: str) -> tuple[str, int]:
        response = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6},
                              timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["switchcit"]["task"] == model
        return body["choices"][0]["text"], body["usage"]["completion_tokens"]

    with serve_in_thread(app(store_copy, api_key=None)) as url:
        assert ask("reverse") == answers["reverse"][index]
        _write_manifest(store_copy, {**manifest, "tasks": [dict(t, adapter="adapters/reverse/0123456789ab")
                                                           if t is reverse else t for t in manifest["tasks"]]})
        _await_health(url, failing=True)
        assert ask("reverse") == answers["reverse"][index]  # the old adapter, still, never the base model
        weights.write_bytes(good)
        _await_health(url, failing=False)
        assert ask("reverse") == answers["initials"][index]  # now the replacement's weights answer


def test_a_forget_right_after_the_manifest_was_read_never_changes_a_running_rows_adapter(store_copy, stream):
    """`forget` commits just after the worker read the manifest (the read is wrapped to do it): a row being
    generated on that task keeps its adapter to the end, and requests for the task get a 404 afterwards."""
    library = ContinualModel(store_copy, progress=False)
    candidates = ["zebra zebra zebra", "hello", *[p for _, test in stream for p in test.prompts[:3]]]
    long = next(((task, p) for task in ("capitalize", "initials", "reverse") for p in candidates
                 if library.generate([p], [task], 120)[0].tokens == 120), None)
    assert long, "no task answers any candidate prompt at length"
    task, prompt = long
    expected = library.generate([prompt], [task], 120)[0]
    assert expected.output != library.generate([prompt], ["base"], 120)[0].output  # so the test can fail
    server = app(store_copy, api_key=None, max_tokens=400)
    engine = server.state.engine
    armed, done, during = threading.Event(), threading.Event(), []
    real_read = engine.cm.store.read

    def read_then_forget():
        manifest = real_read()
        if armed.is_set() and not done.is_set():
            done.set()
            during.append(len(engine.batcher.running))
            ContinualModel(store_copy, progress=False).forget(task)
        return manifest

    engine.cm.store.read = read_then_forget
    with serve_in_thread(server) as url, ThreadPoolExecutor(1) as pool:
        row = pool.submit(httpx.post, f"{url}/v1/completions", timeout=120,
                          json={"model": task, "prompt": prompt, "max_tokens": 120})
        await_running(url)
        armed.set()
        engine._next_poll = 0.0  # read the manifest at the next step, while the row runs
        body = row.result().json()
        assert during == [1]  # the forget was committed while the row was being generated
        assert body["choices"][0]["text"] == expected.output and body["usage"]["completion_tokens"] == 120
        deadline = time.monotonic() + 30
        while task in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "the forget never went live"
            time.sleep(0.1)
        gone = httpx.post(f"{url}/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": 2})
        assert gone.status_code == 404


def test_non_streaming_clients_that_leave_free_their_rows_and_their_places_in_the_queue(trained_store):
    """A request whose 2 prompts fill the batch and one queued behind it: both clients give up (a read timeout
    closes the connection), and the rows and the queue are empty again long before 20,000 tokens."""
    with serve_in_thread(app(trained_store, api_key=None, max_tokens=20000, max_batch_size=2)) as url:
        def give_up(prompts: list[str]) -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": prompts, "max_tokens": 20000},
                           timeout=httpx.Timeout(60, read=3))

        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(give_up, ["hello", "hello there"])
            await_running(url)
            queued = pool.submit(give_up, ["hello again"])
            running.result()
            queued.result()
        deadline = time.monotonic() + 30
        while _running(url) > 0 or _waiting(url) > 0:  # gone within a step of the hang-ups
            assert time.monotonic() < deadline, "the rows or places of the clients that left were kept"
            time.sleep(0.05)
        metrics = httpx.get(f"{url}/metrics").text
        assert _metric(metrics, "switchcit_errors_total", endpoint="/v1/completions", status="400") == 2
        assert httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2},
                          timeout=60).status_code == 200


def test_a_burst_of_1000_is_bounded_by_the_queue_and_loses_no_accepted_request(trained_store, stream):
    """4 long streams fill the batch while 1,000 requests arrive: 40 (--max-queue) are accepted, the other 960 get
    a 429 with Retry-After at once, and /metrics shows the queue. Once the streams hang up, every accepted
    request is answered as the library answers it alone, routed at most a batch's worth per encoder pass."""
    server = app(trained_store, api_key=None, max_batch_size=4, max_queue=40, max_tokens=100000,
                 max_kv_tokens=10**6)
    engine = server.state.engine
    routed: list[int] = []
    real_route = engine.cm.route

    def counted(prompts: list[str]):
        routed.append(len(prompts))
        return real_route(prompts)

    engine.cm.route = counted
    prompts = [p for _, test in stream for p in test.prompts]
    asks = [{"model": "switchcit", "prompt": prompts[i % len(prompts)], "max_tokens": 2} for i in range(1000)]

    async def burst(url: str) -> tuple[list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        gate = asyncio.Semaphore(100)  # 100 connections at once (httpx's own queue of waiting requests is slow)

        async def post(ask: dict) -> httpx.Response:
            async with gate:
                return await client.post("/v1/completions", json=ask)

        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            async with contextlib.AsyncExitStack() as streams:
                body = {"model": "base", "prompt": "hello", "max_tokens": 100000, "stream": True}
                for _ in range(4):
                    await streams.enter_async_context(client.stream("POST", "/v1/completions", json=body))
                while _running(url) < 4:
                    await asyncio.sleep(0.02)
                tasks = [asyncio.create_task(post(ask)) for ask in asks]
                deadline = time.monotonic() + 120
                while sum(t.done() for t in tasks) < 960:
                    assert time.monotonic() < deadline, "the burst was not refused"
                    await asyncio.sleep(0.05)
                assert all(t.result().status_code == 429 for t in tasks if t.done())
                queued = _waiting(url)
            return list(await asyncio.gather(*tasks)), queued  # the streams hung up: the queue drains

    with serve_in_thread(server) as url:
        responses, queued = asyncio.run(burst(url))
        too_many = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": ["hi"] * 45, "max_tokens": 1},
                              timeout=60)  # more than 4 + 40 could ever hold: no retry would help
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_prompts"
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 40 and statuses.count(429) == 960, set(statuses)
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"
    assert queued == 40  # the queue's length, in /metrics
    assert max(routed) <= 4 and sum(routed) == 40  # a batch's worth of routing per step, each prompt once
    library = ContinualModel(trained_store, progress=False, fallback=False)
    accepted = [(ask["prompt"], r.json()) for ask, r in zip(asks, responses) if r.status_code == 200]
    for prompt, body in accepted:
        alone = library.generate([prompt], max_new_tokens=2, batch_size=1)[0]
        assert (body["switchcit"]["task"], body["choices"][0]["text"]) == (alone.task, alone.output)


def _waiting(url: str) -> float:
    return _metric(httpx.get(f"{url}/metrics").text, "switchcit_waiting_sequences")
