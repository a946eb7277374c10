"""The OpenAI-compatible server, started for real on a loopback port and spoken to over HTTP."""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import run_cli, task_rows, write_jsonl
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from switchcit.continual import ContinualModel
from switchcit.demo import demo_stream
from switchcit.generation import NEARER_EVERYDAY, OUTSIDE_REGIONS
from switchcit.serve import ServeConfig, add_parser, create_app, serve_in_thread

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def app(store, **overrides):
    """A server on `store`; the pure switch decides (no fallback to base) unless a test asks for it."""
    values = dict(api_key=KEY, fallback=False, max_batch_size=16, max_wait_ms=5, max_tokens=32, max_prompt_chars=2000)
    return create_app(ServeConfig(str(store), **{**values, **overrides}))


@pytest.fixture(scope="module")
def server(trained_store):
    with serve_in_thread(app(trained_store)) as url:
        yield url


@pytest.fixture(scope="module")
def library(trained_store) -> ContinualModel:
    return ContinualModel(trained_store, progress=False)


@pytest.fixture(scope="module")
def clear(library, stream) -> dict[str, list[str]]:
    """Test prompts per task that the switch routes to their task (a tiny switch misses about 1 in 30)."""
    return {test.name: [p for p, r in zip(test.prompts, library.route(test.prompts)) if r.task == test.name]
            for _, test in stream}


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=120) as client:
        yield client


def chat(prompt: str, model: str = "switchcit", max_tokens: int = 4) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}


def test_routes_each_prompt_to_its_task_and_answers_as_the_library_does(http, stream, library):
    prompts = [e.prompt for _, test in stream for e in test.examples]
    expected = [test.name for _, test in stream for _ in test.examples]
    response = http.post("/v1/completions", json={"model": "switchcit", "prompt": prompts, "max_tokens": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    routed = [r["task"] for r in body["switchcit"]]
    assert len(routed) == len(body["choices"]) == len(prompts)
    assert sum(r == e for r, e in zip(routed, expected)) / len(prompts) > 0.95
    assert all(0 < r["confidence"] <= 1 for r in body["switchcit"])
    assert [c["index"] for c in body["choices"]] == list(range(len(prompts)))
    solo = library.generate(prompts[::10], routed[::10], 6, batch_size=1)
    assert [c["text"] for c in body["choices"][::10]] == [a.output for a in solo]
    counted = library.generate(prompts, routed, 6)  # usage is the exact count of generated tokens
    assert body["usage"]["completion_tokens"] == sum(c.tokens for c in counted)
    assert [c["finish_reason"] for c in body["choices"]] == ["stop" if c.stopped else "length" for c in counted]
    assert all(0 < c.tokens <= 6 and (c.stopped or c.tokens == 6) for c in counted)

    one = http.post("/v1/chat/completions", json=chat(prompts[0])).json()
    assert one["object"] == "chat.completion" and one["model"] == "switchcit"
    assert one["switchcit"]["task"] == expected[0]
    assert one["choices"][0]["message"]["role"] == "assistant"
    assert one["usage"]["prompt_tokens"] > 0


def test_routes_the_last_user_message_of_a_chat(http, clear):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": clear["reverse"][0]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": clear["initials"][0]}]}]
    body = http.post("/v1/chat/completions", json={"model": "switchcit", "messages": messages, "max_tokens": 2}).json()
    assert body["switchcit"]["task"] == "initials"


def test_a_task_or_base_can_be_forced_by_model(server, stream):
    client = OpenAI(base_url=f"{server}/v1", api_key=KEY)
    prompt = stream[0][1].prompts[0]  # a 'reverse' prompt
    for model in ("initials", "base"):
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=3)
        assert response.model == model
        assert response.model_extra["switchcit"] == {"task": model, "confidence": None, "nearest": None, "reason": None}
    listed = [m.id for m in client.models.list()]
    assert listed == ["switchcit", "base", "reverse", "initials", "capitalize"]


def test_streaming_carries_the_route_in_the_first_chunk(server, http, clear):
    client = OpenAI(base_url=f"{server}/v1", api_key=KEY)
    prompt = clear["capitalize"][0]
    chunks = list(client.chat.completions.create(model="switchcit", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].model_extra["switchcit"]["task"] == "capitalize"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all("switchcit" not in (c.model_extra or {}) for c in chunks[1:])
    assert chunks[-1].usage is not None and chunks[-2].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = http.post("/v1/chat/completions", json=chat(prompt, max_tokens=8)).json()
    assert streamed == whole["choices"][0]["message"]["content"]

    prompts = [clear["reverse"][1], clear["initials"][1]]
    texts = client.completions.create(model="switchcit", prompt=prompts, max_tokens=5, stream=True)
    chunks = list(texts)
    assert [r["task"] for r in chunks[0].model_extra["switchcit"]] == ["reverse", "initials"]
    assert {c.choices[0].index for c in chunks} == {0, 1}


def test_concurrent_clients_are_batched_without_errors(server, http, stream):
    prompts = [e.prompt for _, test in stream for e in test.examples]
    client = httpx.Client(base_url=server, headers=AUTH, timeout=120,
                          limits=httpx.Limits(max_connections=16))

    def ask(i: int) -> int:
        return client.post("/v1/chat/completions", json=chat(prompts[i % len(prompts)], max_tokens=4)).status_code

    with client, ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(ask, range(200)))
    assert statuses == [200] * 200
    metrics = http.get("/metrics").text
    count = _metric(metrics, "switchcit_batch_size_count")
    assert _metric(metrics, "switchcit_batch_size_sum") / count > 1.5  # requests really shared batches
    assert _metric(metrics, "switchcit_routed_prompts_total", task="reverse", source="switch") > 0


def _metric(text: str, name: str, **labels: str) -> float:
    """A sample's value in Prometheus text; 0 when the series does not exist yet."""
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return next((s.value for s in samples if s.name == name and s.labels == labels), 0.0)


def test_a_task_learned_while_serving_goes_live_without_failed_requests(store_copy, tmp_path, stream, tiny_model):
    _, new_test = demo_stream(n_train=80, n_test=30, seed=0)[3]  # 'last-word', unknown to the store
    new_train = demo_stream(n_train=80, n_test=30, seed=0)[3][0]
    data = write_jsonl(tmp_path / "new.jsonl", task_rows(new_train))
    load = [e.prompt for _, test in stream for e in test.examples]
    statuses: list[int] = []
    done = threading.Event()
    with serve_in_thread(app(store_copy)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:

        def hammer(offset: int) -> None:
            i = offset
            while not done.is_set():
                statuses.append(client.post("/v1/chat/completions",
                                            json=chat(load[i % len(load)], max_tokens=2)).status_code)
                i += 4

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            learned = run_cli("learn", "--store", store_copy, "--task", "newtask", "--data", data, "--model",
                              tiny_model, "--max-steps", "5", "-q")
            assert learned.returncode == 0, learned.stderr
            deadline = time.monotonic() + 30
            while "newtask" not in [m["id"] for m in client.get("/v1/models").json()["data"]]:
                assert time.monotonic() < deadline, "the server never picked up the new task"
                time.sleep(0.2)
            body = client.post("/v1/completions", json={"model": "switchcit", "prompt": new_test.prompts,
                                                         "max_tokens": 2}).json()
            forced = client.post("/v1/chat/completions", json=chat(load[0], model="newtask")).json()
        finally:
            done.set()
            for t in threads:
                t.join()
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests under load, statuses {set(statuses)}"
    routed = [r["task"] for r in body["switchcit"]]
    assert routed.count("newtask") / len(routed) > 0.9
    assert forced["switchcit"]["task"] == "newtask"


def test_sixteen_clients_lose_no_request_while_a_task_is_learned(store_copy, tmp_path, stream, tiny_model):
    """16 clients x 200 requests on the continuous engine while `learn` adds a task; a sample of the answers
    equals what the library gives the same prompt alone (batch_size=1) with the adapter the server chose."""
    new_train = demo_stream(n_train=80, n_test=30, seed=0)[3][0]
    data = write_jsonl(tmp_path / "new.jsonl", task_rows(new_train))
    load = [e.prompt for _, test in stream for e in test.examples] + new_train.prompts[:30]
    answers: list[tuple[int, str, dict]] = []
    with serve_in_thread(app(store_copy)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=300) as client:

        def client_run(offset: int) -> None:
            for i in range(200):
                prompt = load[(offset + 16 * i) % len(load)]
                reply = client.post("/v1/completions", json={"model": "switchcit", "prompt": prompt, "max_tokens": 2})
                answers.append((reply.status_code, prompt, reply.json()))

        with ThreadPoolExecutor(16) as pool:
            running = [pool.submit(client_run, k) for k in range(16)]
            learned = run_cli("learn", "--store", store_copy, "--task", "newtask", "--data", data, "--model",
                              tiny_model, "--max-steps", "5", "-q")
            for future in running:
                future.result()
        assert learned.returncode == 0, learned.stderr
        deadline = time.monotonic() + 30
        while "newtask" not in [m["id"] for m in client.get("/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "the server never picked up the new task"
            time.sleep(0.2)
    failed = [(status, body) for status, _, body in answers if status != 200]
    assert len(answers) == 16 * 200 and not failed, failed[:3]
    alone = ContinualModel(store_copy, progress=False)
    for _, prompt, body in answers[::160]:
        task = body["switchcit"]["task"]
        expected = alone.generate([prompt], [task], max_new_tokens=2, batch_size=1)[0]
        assert body["choices"][0]["text"] == expected.output, (prompt, task)
        assert body["usage"]["completion_tokens"] == expected.tokens


def test_router_only_mode_forwards_to_the_adapter_by_name(server, http, trained_store, clear):
    routing = app(trained_store, api_key=None, fallback=True, upstream=server, upstream_api_key=KEY,
                  upstream_base_model="base")
    assert not routing.state.engine.cm.adapters.loaded  # router-only: the encoder and switch, never the LLM
    prompt = clear["initials"][3]
    with serve_in_thread(routing) as url, httpx.Client(base_url=url, timeout=120) as router:
        assert router.get("/health").json()["mode"] == "router"
        def upstream_forced() -> float:
            return _metric(http.get("/metrics").text, "switchcit_routed_prompts_total", task="initials",
                           source="forced")

        before = upstream_forced()
        body = router.post("/v1/chat/completions", json=chat(prompt, max_tokens=6)).json()
        assert body["model"] == "switchcit"
        assert body["switchcit"]["task"] == "initials" and body["switchcit"]["confidence"] > 0.5
        assert upstream_forced() == before + 1  # the upstream was asked for model='initials'
        direct = http.post("/v1/chat/completions", json=chat(prompt, model="initials", max_tokens=6)).json()
        assert body["choices"][0]["message"] == direct["choices"][0]["message"]

        prompts = [clear["reverse"][0], clear["capitalize"][0]]
        listed = router.post("/v1/completions", json={"model": "switchcit", "prompt": prompts, "max_tokens": 3}).json()
        assert [r["task"] for r in listed["switchcit"]] == ["reverse", "capitalize"]
        assert [c["index"] for c in listed["choices"]] == [0, 1]

        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        unknown = [{"role": "user", "content": "Explain the theory of relativity in simple terms."}]
        chunks = list(client.chat.completions.create(model="switchcit", messages=unknown, max_tokens=4, stream=True))
        routed = chunks[0].model_extra["switchcit"]  # fallback: no task fits, and the answer says why
        assert routed["task"] == "base" and routed["confidence"] is None and routed["nearest"] in clear
        assert routed["reason"] in (OUTSIDE_REGIONS, NEARER_EVERYDAY)
        assert all(c.model == "switchcit" for c in chunks)
        direct = http.post("/v1/chat/completions", json=chat(unknown[0]["content"], model="base", max_tokens=4))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            direct.json()["choices"][0]["message"]["content"]
        assert router.post("/v1/chat/completions", json=chat(prompt, model="nope")).status_code == 404
    assert not routing.state.engine.cm.adapters.loaded


@pytest.mark.parametrize(("payload", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "switchcit"}, 400, "messages"),
    ({"model": "switchcit", "messages": [{"role": "system", "content": "hi"}]}, 400, "messages"),
    ({**chat("hi"), "max_tokens": 0}, 400, "max_tokens"),
    ({**chat("hi"), "max_tokens": 10**9}, 400, "max_tokens"),
    ({**chat("hi"), "max_tokens": "4"}, 400, "max_tokens"),
    ({**chat("hi"), "n": 2}, 400, "n"),
    ({**chat("hi"), "stream": "yes"}, 400, "stream"),
    (chat("x" * 2001), 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    (chat("hi", model="no-such-task"), 404, "model"),
])
def test_bad_chat_requests_get_openai_errors(http, payload, status, param):
    if isinstance(payload, bytes):
        response = http.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
    else:
        response = http.post("/v1/chat/completions", json=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "Traceback" not in response.text
    if status == 404:
        assert error["code"] == "model_not_found"
    assert http.post("/v1/chat/completions", json=chat("Reverse the order of these words.\n\na b")).status_code == 200


def test_bad_completion_requests_and_keys(server, http):
    for payload, param in [({"model": "switchcit", "prompt": [1, 2]}, "prompt"),
                           ({"model": "switchcit", "prompt": []}, "prompt"),
                           ({"model": "switchcit", "prompt": "y" * 2001}, "prompt"),
                           ({"model": "switchcit", "prompt": "hi", "stop": 5}, "stop")]:
        response = http.post("/v1/completions", json=payload)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert httpx.get(f"{server}/v1/models").status_code == 401
    wrong = httpx.post(f"{server}/v1/completions", json={"model": "switchcit", "prompt": "hi"},
                       headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # open without a key
    assert http.get("/no/such/path").json()["error"]["code"] == "not_found"
    metrics = http.get("/metrics").text
    assert _metric(metrics, "switchcit_errors_total", endpoint="/v1/completions", status="400") >= 4
    assert "switchcit_request_latency_seconds_bucket" in metrics


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_a_failing_row_answers_500_alone_and_the_server_lives_on(trained_store, engine):
    failing = app(trained_store, api_key=None, engine=engine)
    cm = failing.state.engine.cm
    poison = cm.tokenizer.encode("zebra", add_special_tokens=False)[0]

    def refuse(module, args, kwargs):  # fault injection: the model fails on any batch holding this token
        if (kwargs.get("input_ids", args[0] if args else None) == poison).any():
            raise RuntimeError("poisoned row")

    def ask(prompt: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 2},
                          timeout=60)

    with serve_in_thread(failing) as url:
        handle = cm.adapters.base.register_forward_pre_hook(refuse, with_kwargs=True)
        try:
            with ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(ask, ["a zebra", "a cat", "a dog", "a bird"]))
        finally:
            handle.remove()
        assert responses[0].status_code == 500
        assert responses[0].json()["error"]["type"] == "server_error" and "poisoned row" in responses[0].text
        assert [r.status_code for r in responses[1:]] == [200] * 3
        assert ask("a zebra").status_code == 200


def _running(url: str) -> float:
    return _metric(httpx.get(f"{url}/metrics").text, "switchcit_running_sequences")


def test_a_short_request_joins_and_leaves_while_a_long_one_runs(trained_store, stream):
    with serve_in_thread(app(trained_store, api_key=None, max_tokens=100000)) as url:
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, f"{url}/v1/completions", timeout=300,
                               json={"model": "base", "prompt": "hello", "max_tokens": 3000})
            while _running(url) < 1:
                time.sleep(0.01)
            short = httpx.post(f"{url}/v1/completions", json={"model": "initials", "prompt": stream[1][1].prompts[0],
                                                                "max_tokens": 4}, timeout=60)
            assert short.status_code == 200 and not long.done()  # joined the running batch, left before it ended
            assert long.result().json()["usage"]["completion_tokens"] == 3000
        metrics = httpx.get(f"{url}/metrics").text
        assert _metric(metrics, "switchcit_time_to_first_token_seconds_count") == 2
        assert _metric(metrics, "switchcit_time_per_output_token_seconds_count") == 2
        assert _metric(metrics, "switchcit_running_sequences") == _metric(metrics, "switchcit_kv_cache_tokens") == 0


def test_a_client_that_hangs_up_frees_its_slot(trained_store, stream):
    with serve_in_thread(app(trained_store, api_key=None, max_tokens=20000, max_batch_size=1)) as url:
        body = {"model": "base", "prompt": "hello", "max_tokens": 20000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()  # kept: a dropped line iterator closes the connection
            assert '"switchcit"' in next(lines)
            while _running(url) < 1:
                time.sleep(0.01)
        deadline = time.monotonic() + 30
        while _running(url) > 0:  # gone at the next step, long before 100000 tokens
            assert time.monotonic() < deadline, "the hung-up stream kept its slot"
            time.sleep(0.05)
        short = httpx.post(f"{url}/v1/completions", json={"model": "initials", "prompt": stream[1][1].prompts[0],
                                                            "max_tokens": 4}, timeout=60)
        assert short.status_code == 200


def test_streams_stop_at_the_stop_string_and_match_the_whole_answer(server, http, clear):
    client = OpenAI(base_url=f"{server}/v1", api_key=KEY)
    prompts = clear["initials"][:3]
    whole = http.post("/v1/completions", json={"model": "initials", "prompt": prompts, "max_tokens": 6}).json()
    texts = [c["text"] for c in whole["choices"]]
    assert all(texts), texts  # the tiny 'initials' expert answers at least a letter
    stop = texts[0][-1]
    chunks = list(client.completions.create(model="initials", prompt=prompts, max_tokens=6, stream=True, stop=stop))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == [t[:t.find(stop)] if stop in t else t for t in texts]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(reasons) == 3 and "stop" in reasons
    assert chunks[0].model_extra["switchcit"] == [{"task": "initials", "confidence": None, "nearest": None,
                                                   "reason": None}] * 3


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_overlapping_stop_strings_cut_where_the_first_of_them_starts_on_both_engines(trained_store, engine):
    """Of two stop strings, one that starts earlier but completes later cuts the answer (OpenAI's rule)."""
    library = ContinualModel(trained_store, progress=False)
    asks = [(task, prompt) for task in ("capitalize", "initials", "reverse")
            for prompt in ("zebra zebra zebra", "hello", "Write a long story about a river.")]
    text, task, prompt = max(((library.generate([p], [t], 40)[0].output, t, p) for t, p in asks),
                             key=lambda answer: len(answer[0]))
    cuts = [(i, j) for i in range(1, len(text) - 6) for j in range(i + 1, i + 4)
            if text.find(text[i:i + 6]) == i and text.find(text[j:j + 2]) == j]
    assert cuts, f"no overlapping stop strings in the tiny model's longest answer {text!r}"
    i, j = cuts[0]
    stop = [text[j:j + 2], text[i:i + 6]]  # the first completes first, the second starts first
    with serve_in_thread(app(trained_store, api_key=None, engine=engine, max_tokens=40)) as url:
        body = {"model": task, "prompt": prompt, "max_tokens": 40, "stop": stop}
        whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        streamed = [json.loads(line[6:]) for line in httpx.post(
            f"{url}/v1/completions", json={**body, "stream": True}, timeout=60).text.splitlines()
            if line.startswith("data: {")]
    assert (whole["text"], whole["finish_reason"]) == (text[:i], "stop")
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == text[:i]


def test_idle_and_slow_header_connections_are_closed(trained_store):
    """A connection that sends nothing, one that sends its headers a byte at a time, and an idle keep-alive one
    are closed by the server; a normal request still works."""
    import socket

    def closed_by_server(sock: socket.socket, trickle: bytes = b"") -> bool:
        sock.settimeout(0.3)
        deadline = time.monotonic() + 30
        for byte in [trickle[k:k + 1] for k in range(len(trickle))] + [b""] * 1000:
            assert time.monotonic() < deadline, "the server kept the connection open"
            try:
                if byte:
                    sock.sendall(byte)
                if sock.recv(4096) == b"":
                    return True
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True
        return False

    with serve_in_thread(app(trained_store, api_key=None, header_timeout_s=1.0, keep_alive_s=1.0)) as url:
        host, port = url.removeprefix("http://").split(":")
        idle, slow = (socket.create_connection((host, int(port))) for _ in range(2))
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" * 20
        with idle, slow:
            assert closed_by_server(idle)
            assert closed_by_server(slow, head)  # 1 byte every 0.3 s: never a whole head within the deadline
        with httpx.Client(base_url=url) as client:
            assert client.get("/health").status_code == 200
            time.sleep(3)  # idle past the keep-alive timeout: the client reconnects
            assert client.get("/health").status_code == 200


def test_the_openapi_schema_says_what_each_route_serves(http):
    schema = http.get("/openapi.json").json()
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert {"429", "503"} <= set(schema["paths"]["/v1/completions"]["post"]["responses"])
    assert "503" in schema["paths"]["/health"]["get"]["responses"]


def test_print_vllm_command(trained_store, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--store", str(trained_store), "--print-vllm-command"])
    args.func(args)
    command = capsys.readouterr().out.split()
    assert command[:3] == ["vllm", "serve", str(ContinualModel(trained_store).base_reference)]
    assert command[command.index("--max-lora-rank") + 1] == "8"
    modules = command[command.index("--lora-modules") + 1:]
    assert [m.split("=")[0] for m in modules] == ["reverse", "initials", "capitalize"]
    assert all((trained_store / "adapters").resolve() in Path(m.split("=")[1]).parents for m in modules)
