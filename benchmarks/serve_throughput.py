"""Requests per second of `switchcit serve` with batching vs. one request at a time, same load; then a
mixed workload on the continuous and the static engine, side by side.

With no --store it learns four demo tasks (2 steps each: only speed matters here) on the embedded
model into a temporary store first, so it runs with no arguments. All servers run in this process, one
after the other, each on a free loopback port.

1. Closed loop: the same prompts from the same number of concurrent clients, batched (continuous engine)
   and --max-batch-size 1: `batched_rps`, `sequential_rps`, `ratio`.
2. Mixed workload (fixed): 64 streamed requests, max_tokens 8 or 200 (half each, shuffled with seed 0),
   forced round-robin to 4 adapters, Poisson arrivals at 2 requests/s (seed 0). For each engine:
   throughput, p50/p99 end-to-end latency and p50/p99 time to first token (first streamed chunk after
   the routing chunk, i.e. the first token: the continuous engine streams tokens as they are made, the
   static one only once its batch is done).
3. Short during long: an 8-token request alone, then sent 1 s after a 200-token answer was asked for;
   `short_ratio` is the second over the first (per engine, next to the mixed workload's keys).

    python benchmarks/serve_throughput.py [--json] [--store DIR] [--model M] [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from switchcit import ContinualModel, ExpertConfig
from switchcit.demo import demo_stream
from switchcit.serve import ServeConfig, create_app, serve_in_thread


def build_store(folder: Path, model: str | None, tasks: int = 4) -> None:
    cm = ContinualModel(folder, base_model=model, progress=False,
                        expert_config=ExpertConfig(max_steps=2, batch_size=4, epochs=100))
    for train, _ in demo_stream(n_train=16, n_test=1, seed=0)[:tasks]:
        cm.learn(train)


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


def measure_mixed(store: Path, model: str | None, engine: str) -> dict:
    config = ServeConfig(str(store), model=model, engine=engine, max_tokens=200)
    app = create_app(config)
    tasks, prompts = app.state.engine.cm.task_names[:4], prompts_of_demo()
    with serve_in_thread(app) as url:
        return {**asyncio.run(mixed(url, tasks, prompts)), **asyncio.run(short_during_long(url))}


def measure(store: Path, model: str | None, max_batch_size: int, args: argparse.Namespace) -> float:
    prompts = prompts_of_demo()
    config = ServeConfig(str(store), model=model, max_batch_size=max_batch_size, max_tokens=args.max_tokens)
    with serve_in_thread(create_app(config)) as url:
        asyncio.run(load(url, prompts, args.concurrency, args.concurrency, args.max_tokens))  # warm-up
        return asyncio.run(load(url, prompts, args.requests, args.concurrency, args.max_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="a store to serve (default: build a demo store)")
    parser.add_argument("--model", default=None, help="base model (default: the store's, else embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="switchcit-serve-bench-") as tmp:
        store = args.store
        if store is None:
            store = Path(tmp) / "store"
            print("building a 4-task demo store ...", file=sys.stderr, flush=True)
            build_store(store, args.model)
        batched = measure(store, args.model, args.max_batch_size, args)
        sequential = measure(store, args.model, 1, args)
        engines = {engine: measure_mixed(store, args.model, engine) for engine in ("continuous", "static")}
    result = {"batched_rps": round(batched, 2), "sequential_rps": round(sequential, 2),
              "ratio": round(batched / sequential, 2), **engines}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.requests} requests, {args.concurrency} concurrent clients, max_tokens {args.max_tokens}")
        print(f"dynamic batching (max {args.max_batch_size}): {batched:.2f} requests/s")
        print(f"one at a time (--max-batch-size 1):  {sequential:.2f} requests/s")
        print(f"ratio: {batched / sequential:.2f}x")
        print("mixed workload (64 streamed requests, max_tokens 8 or 200, 4 adapters, Poisson 2/s, seed 0):")
        for engine, r in engines.items():
            print(f"  {engine:>10}: {r['rps']:.2f} requests/s, latency p50 {r['p50_s']:.2f} s p99 "
                  f"{r['p99_s']:.2f} s, time to first token p50 {r['ttft_p50_s']:.2f} s p99 {r['ttft_p99_s']:.2f} s")
        print("an 8-token request alone, and sent 1 s after a 200-token answer was asked for:")
        for engine, r in engines.items():
            print(f"  {engine:>10}: {r['short_alone_s']:.2f} s alone, {r['short_during_long_s']:.2f} s during "
                  f"({r['short_ratio']:.2f}x; the long answer had {r['long_tokens']} tokens)")


if __name__ == "__main__":
    main()
