"""Requests per second of `switchcit serve` with batching vs. one request at a time, same load; then a
mixed workload on the continuous and the static engine, side by side.

With no --store it learns four demo tasks (2 steps each: only speed matters here) on the embedded
model into a temporary store first, so it runs with no arguments. All servers run in this process, one
after the other, each on a free loopback port.

1. Closed loop: the same prompts from the same number of concurrent clients, batched (continuous engine)
   and --max-batch-size 1: `batched_rps`, `sequential_rps`, `ratio`.
2. Mixed workload (fixed): 64 streamed requests, max_tokens 8 or 200 (half each, shuffled with seed 0),
   forced round-robin to 4 adapters (--adapters N: N; the demo store then has N tasks), Poisson arrivals
   at 2 requests/s (seed 0). For each engine:
   throughput, p50/p99 end-to-end latency and p50/p99 time to first token (first streamed chunk after
   the routing chunk, i.e. the first token: the continuous engine streams tokens as they are made, the
   static one only once its batch is done).
3. Short during long: an 8-token request alone, then sent 1 s after a 200-token answer was asked for;
   `short_ratio` is the second over the first (per engine, next to the mixed workload's keys).

Two more measurements run instead, on the continuous engine, when asked:

--burst N: a long streamed answer runs while N routed requests (16 tokens each) arrive at once from
   another process; the gaps between the server's decoding steps during the burst (`gap_ratio`: largest
   over median; target <= 5), and how the burst was answered (`accepted`, `refused` with 429, `failed`).
--long-prompt TOKENS: while a streamed answer runs, a prompt of TOKENS tokens is sent (the prompt and
   cache limits raised to fit), and an 8-token request every second until it is answered: the gaps
   between decoding steps while it is read (largest: about one --prefill-tokens chunk) and the 8-token
   requests' latency against alone.

    python benchmarks/serve_throughput.py [--json] [--store DIR] [--model M] [--requests N] [--concurrency C]
    python benchmarks/serve_throughput.py --burst 1000 [--json] [--store DIR]
    python benchmarks/serve_throughput.py --long-prompt 48000 [--json] [--store DIR] [--prefill-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import httpx

from switchcit import ContinualModel, ExpertConfig, Task
from switchcit.demo import demo_stream
from switchcit.serve import ServeConfig, create_app, serve_in_thread


def build_store(folder: Path, model: str | None, tasks: int = 4) -> None:
    """The demo tasks in turn, numbered from their second round on (speed does not depend on what they learned)."""
    cm = ContinualModel(folder, base_model=model, progress=False,
                        expert_config=ExpertConfig(max_steps=2, batch_size=4, epochs=100))
    stream = demo_stream(n_train=16, n_test=1, seed=0)
    for i, (train, _) in enumerate((stream * tasks)[:tasks]):
        cm.learn(train if i < len(stream) else Task(f"{train.name}-{i}", train.examples))


async def load(url: str, prompts: list[str], requests: int, concurrency: int, max_tokens: int) -> float:
    """Send `requests` chat requests from `concurrency` clients; requests per second."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        next_index = iter(range(requests))

        async def worker() -> None:
            for i in next_index:
                body = {"model": "switchcit", "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


async def mixed(url: str, tasks: list[str], prompts: list[str]) -> dict:
    """The fixed mixed workload (module docstring); latencies in seconds."""
    rng = random.Random(0)
    lengths = [8, 200] * 32
    rng.shuffle(lengths)
    gaps = [rng.expovariate(2.0) for _ in lengths]
    latency, ttft = [], []

    async def one(client: httpx.AsyncClient, i: int, delay: float) -> None:
        await asyncio.sleep(delay)
        body = {"model": tasks[i % len(tasks)], "max_tokens": lengths[i], "stream": True,
                "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
        begin, first = time.perf_counter(), None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if chunks == 2 and first is None:  # the first after the routing chunk
                        first = time.perf_counter() - begin
        latency.append(time.perf_counter() - begin)
        ttft.append(first if first is not None else latency[-1])

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=100)) as client:
        started = time.perf_counter()
        delays = [sum(gaps[:i + 1]) for i in range(len(gaps))]
        await asyncio.gather(*(one(client, i, d) for i, d in enumerate(delays)))
        elapsed = time.perf_counter() - started

    def pct(values: list[float], q: int) -> float:
        return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)

    return {"rps": round(len(lengths) / elapsed, 3), "p50_s": pct(latency, 50), "p99_s": pct(latency, 99),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}


async def short_during_long(url: str) -> dict:
    """An 8-token request alone, then the same sent 1 s after a 200-token answer was asked for (the base
    model writing a story, so that it runs to its limit); end-to-end seconds of the short one, their ratio,
    and the tokens the long answer really had."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def ask(prompt: str, max_tokens: int) -> tuple[float, int]:
            begin = time.perf_counter()
            body = {"model": "base", "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return time.perf_counter() - begin, response.json()["usage"]["completion_tokens"]

        short = "Say hello to the team."
        await ask(short, 8)  # warm-up
        alone = statistics.median([(await ask(short, 8))[0] for _ in range(3)])
        long = asyncio.create_task(ask("Write a long story about a river that learns to sing.", 200))
        await asyncio.sleep(1.0)
        during, _ = await ask(short, 8)
        _, long_tokens = await long
    return {"short_alone_s": round(alone, 3), "short_during_long_s": round(during, 3),
            "short_ratio": round(during / alone, 2), "long_tokens": long_tokens}


def prompts_of_demo() -> list[str]:
    return [e.prompt for _, test in demo_stream(n_train=1, n_test=50, seed=1) for e in test.examples]


def serve_config(store: Path, args: argparse.Namespace, **settings: object) -> ServeConfig:
    """The server's settings for one measurement: the command line's model and prefill budget, and `settings`."""
    return ServeConfig(str(store), model=args.model, prefill_tokens=args.prefill_tokens, **settings)


def measure_mixed(store: Path, args: argparse.Namespace, engine: str) -> dict:
    app = create_app(serve_config(store, args, engine=engine, max_tokens=200))
    tasks, prompts = app.state.engine.cm.task_names[:args.adapters], prompts_of_demo()
    if len(tasks) < args.adapters:
        raise SystemExit(f"the store has {len(tasks)} tasks, fewer than --adapters {args.adapters}: give a lower "
                         "--adapters")
    with serve_in_thread(app) as url:
        return {**asyncio.run(mixed(url, tasks, prompts)), **asyncio.run(short_during_long(url))}


def measure(store: Path, args: argparse.Namespace, max_batch_size: int) -> float:
    prompts = prompts_of_demo()
    config = serve_config(store, args, max_batch_size=max_batch_size, max_tokens=args.max_tokens)
    with serve_in_thread(create_app(config)) as url:
        asyncio.run(load(url, prompts, args.concurrency, args.concurrency, args.max_tokens))  # warm-up
        return asyncio.run(load(url, prompts, args.requests, args.concurrency, args.max_tokens))


class StepClock:
    """When each step of the server's running batch ended (server and benchmark share this process): the gaps
    between decoding steps, whatever the model writes."""

    def __init__(self, app):
        self.engine, self.ends = app.state.engine, []
        step = self.engine.batcher.step

        def timed() -> None:
            step()
            self.ends.append(time.monotonic())

        self.engine.batcher.step = timed

    def await_running(self) -> None:
        while not self.engine.batcher.running:
            time.sleep(0.01)

    def gaps(self, start: float, end: float) -> dict:
        """The gaps between the steps that ended within [start, end]."""
        inside = [t for t in self.ends if start <= t <= end]
        gaps = [b - a for a, b in zip(inside, inside[1:])]
        median = statistics.median(gaps)
        return {"gap_median_s": round(median, 4), "gap_max_s": round(max(gaps), 4),
                "gap_ratio": round(max(gaps) / median, 2), "steps": len(inside)}


class LongAnswer:
    """A streamed answer of the base model, read on a thread until it ends or `close` hangs up."""

    def __init__(self, url: str, max_tokens: int):
        body = {"model": "base", "max_tokens": max_tokens, "stream": True,
                "messages": [{"role": "user", "content": "Write a long story about a river that learns to sing."}]}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict) -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
            for _ in response.iter_lines():
                if self._closed.is_set():
                    return

    def close(self) -> None:
        self._closed.set()
        self._thread.join()


def send_burst(url: str, prompts: list[str], n: int) -> dict:
    """N routed requests at once (at most 100 connections open), from their own process; how they ended and
    when the burst began and ended (monotonic clock, shared by the machine's processes)."""
    async def run() -> list[str]:
        gate = asyncio.Semaphore(100)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            async def one(i: int) -> str:
                body = {"model": "switchcit", "max_tokens": 16,
                        "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
                async with gate:
                    try:
                        response = await client.post("/v1/chat/completions", json=body)
                    except httpx.HTTPError as exc:
                        return type(exc).__name__
                answered = response.status_code == 200 and response.json()["choices"][0]["message"]
                return str(response.status_code) if response.status_code != 200 or answered else "empty"

            return await asyncio.gather(*(one(i) for i in range(n)))

    start = time.monotonic()
    outcomes = Counter(asyncio.run(run()))
    return {"start": start, "end": time.monotonic(), "outcomes": dict(outcomes)}


def measure_burst(store: Path, args: argparse.Namespace, n: int) -> dict:
    config = serve_config(store, args, max_tokens=4000)
    app = create_app(config)
    clock = StepClock(app)
    with serve_in_thread(app) as url:
        long = LongAnswer(url, 4000)
        clock.await_running()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            burst = pool.submit(send_burst, url, prompts_of_demo(), n).result()
        long.close()
    outcomes = burst["outcomes"]
    return {"requests": n, "max_queue": config.max_queue, "accepted": outcomes.get("200", 0),
            "refused": outcomes.get("429", 0), "failed": n - outcomes.get("200", 0) - outcomes.get("429", 0),
            "outcomes": outcomes, "burst_s": round(burst["end"] - burst["start"], 2),
            **clock.gaps(burst["start"], burst["end"])}


def measure_long_prompt(store: Path, args: argparse.Namespace, tokens: int) -> dict:
    from switchcit.data import encode_prompt

    config = serve_config(store, args, max_tokens=4000, max_prompt_tokens=tokens + 64,
                          max_prompt_chars=40 * tokens, max_kv_tokens=3 * (tokens + 4000))
    app = create_app(config)
    clock = StepClock(app)
    tokenizer, words = app.state.engine.cm.tokenizer, " ".join(prompts_of_demo())
    long_prompt = words
    while len(encode_prompt(tokenizer, long_prompt)) < tokens:
        long_prompt += " " + words
    while len(encode_prompt(tokenizer, long_prompt)) > tokens:
        long_prompt = long_prompt[:int(len(long_prompt) * 0.99)]

    def ask(prompt: str, max_tokens: int) -> tuple[float, dict]:
        begin = time.monotonic()
        response = httpx.post(f"{url}/v1/chat/completions", timeout=3600, json={
            "model": "base", "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]})
        response.raise_for_status()
        return time.monotonic() - begin, response.json()

    with serve_in_thread(app) as url:
        short = "Say hello to the team."
        ask(short, 8)  # warm-up
        alone = statistics.median([ask(short, 8)[0] for _ in range(3)])
        long = LongAnswer(url, 4000)
        clock.await_running()
        start, during = time.monotonic(), []
        with ThreadPoolExecutor(1) as pool:
            read = pool.submit(ask, long_prompt, 8)
            while not read.done():
                during.append(ask(short, 8)[0])
                time.sleep(1.0)
            long_s, body = read.result()
        end = time.monotonic()
        long.close()
    return {"prompt_tokens": body["usage"]["prompt_tokens"], "prefill_tokens": config.prefill_tokens,
            "long_s": round(long_s, 2), "short_alone_s": round(alone, 3),
            "short_during_p50_s": round(statistics.median(during), 3), "short_during_max_s": round(max(during), 3),
            "shorts": len(during), **clock.gaps(start, end)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="a store to serve (default: build a demo store)")
    parser.add_argument("--model", default=None, help="base model (default: the store's, else embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--burst", type=int, default=None, metavar="N",
                        help="only measure a burst of N requests beside a long answer")
    parser.add_argument("--long-prompt", type=int, default=None, metavar="TOKENS",
                        help="only measure a prompt of TOKENS tokens read beside running answers")
    parser.add_argument("--adapters", type=int, default=4, help="adapters the mixed workload is spread over")
    parser.add_argument("--prefill-tokens", type=int, default=ServeConfig.prefill_tokens,
                        help="the servers' --prefill-tokens (default: serve's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="switchcit-serve-bench-") as tmp:
        store = args.store
        if store is None:
            store = Path(tmp) / "store"
            print(f"building a {args.adapters}-task demo store ...", file=sys.stderr, flush=True)
            build_store(store, args.model, args.adapters)
        if args.burst or args.long_prompt:
            result = (measure_burst(store, args, args.burst) if args.burst
                      else measure_long_prompt(store, args, args.long_prompt))
            print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
            return
        batched = measure(store, args, args.max_batch_size)
        sequential = measure(store, args, 1)
        engines = {engine: measure_mixed(store, args, engine)
                   for engine in ("continuous", "static")}
    result = {"batched_rps": round(batched, 2), "sequential_rps": round(sequential, 2),
              "ratio": round(batched / sequential, 2), "adapters": args.adapters, **engines}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.requests} requests, {args.concurrency} concurrent clients, max_tokens {args.max_tokens}")
        print(f"dynamic batching (max {args.max_batch_size}): {batched:.2f} requests/s")
        print(f"one at a time (--max-batch-size 1):  {sequential:.2f} requests/s")
        print(f"ratio: {batched / sequential:.2f}x")
        print(f"mixed workload (64 streamed requests, max_tokens 8 or 200, {args.adapters} adapters, Poisson 2/s, "
              "seed 0):")
        for engine, r in engines.items():
            print(f"  {engine:>10}: {r['rps']:.2f} requests/s, latency p50 {r['p50_s']:.2f} s p99 "
                  f"{r['p99_s']:.2f} s, time to first token p50 {r['ttft_p50_s']:.2f} s p99 {r['ttft_p99_s']:.2f} s")
        print("an 8-token request alone, and sent 1 s after a 200-token answer was asked for:")
        for engine, r in engines.items():
            print(f"  {engine:>10}: {r['short_alone_s']:.2f} s alone, {r['short_during_long_s']:.2f} s during "
                  f"({r['short_ratio']:.2f}x; the long answer had {r['long_tokens']} tokens)")


if __name__ == "__main__":
    main()
