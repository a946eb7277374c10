"""Requests per second of `switchcit serve` with dynamic batching vs. one request at a time, same load.

With no --store it learns three demo tasks (2 steps each: only speed matters here) on the embedded
model into a temporary store first, so it runs with no arguments. Both servers run in this process, one after the other,
each on a free loopback port, and get the same prompts from the same number of concurrent clients.

    python benchmarks/serve_throughput.py [--json] [--store DIR] [--model M] [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from switchcit import ContinualModel, ExpertConfig
from switchcit.demo import demo_stream
from switchcit.serve import ServeConfig, create_app, serve_in_thread


def build_store(folder: Path, model: str | None, tasks: int = 3) -> None:
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


def measure(store: Path, model: str | None, max_batch_size: int, args: argparse.Namespace) -> float:
    prompts = [e.prompt for _, test in demo_stream(n_train=1, n_test=50, seed=1) for e in test.examples]
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
            print("building a 3-task demo store ...", file=sys.stderr, flush=True)
            build_store(store, args.model)
        batched = measure(store, args.model, args.max_batch_size, args)
        sequential = measure(store, args.model, 1, args)
    result = {"batched_rps": round(batched, 2), "sequential_rps": round(sequential, 2),
              "ratio": round(batched / sequential, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.requests} requests, {args.concurrency} concurrent clients, max_tokens {args.max_tokens}")
        print(f"dynamic batching (max {args.max_batch_size}): {batched:.2f} requests/s")
        print(f"one at a time (--max-batch-size 1):  {sequential:.2f} requests/s")
        print(f"ratio: {batched / sequential:.2f}x")


if __name__ == "__main__":
    main()
