"""Routed generation speed: base model vs one adapter vs switchcit's mixed batch vs the naive per-request path.

    python benchmarks/routed_generation.py [--json] [--model M] [--adapters 4] [--batch 16] [--new-tokens 32]

All paths run side by side in one process on the same prompts (exactly T new tokens, greedy);
each is repeated and the median is reported. `mixed` is switchcit's batched path (src/switchcit/mixed.py)
as the library picks it, `mixed_gather` the same with per-row gathers (its layout beyond DENSE_UP_TO
adapters), and `peft_mixed` PEFT's own mixed-adapter batches, for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from switchcit import ContinualModel, ExpertConfig, Task
from switchcit.demo import demo_stream
from switchcit.mixed import DENSE_UP_TO


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def build(store: Path, model: str | None, adapters: int, rank: int) -> tuple[ContinualModel, list]:
    """A store with `adapters` tasks, each trained for one step: speed does not depend on weight values."""
    cm = ContinualModel(store, base_model=model, progress=False,
                        expert_config=ExpertConfig(r=rank, alpha=2 * rank, max_steps=1, batch_size=1))
    stream = demo_stream(n_train=8, n_test=64, seed=0)
    stream = [(Task(f"{train.name}-{i}", train.examples), test)
              for i, (train, test) in enumerate((stream * adapters)[:adapters])]
    for train, _ in stream:
        cm.learn(train)
    return cm, stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cm, stream = build(Path(tmp) / "store", args.model, args.adapters, args.rank)
        prompts = [stream[i % len(stream)][1].prompts[i // len(stream)] for i in range(args.batch)]
        tasks = [stream[i % len(stream)][0].name for i in range(args.batch)]
        routed = [r.task for r in cm.route(prompts)]
        t = args.new_tokens
        gen = dict(max_new_tokens=t, min_new_tokens=t, batch_size=args.batch)

        def mixed(fast: bool, dense: bool | None = None) -> tuple[float, float]:
            cm.adapters.fast_mixed = fast
            route = timed(lambda: cm.route(prompts))
            if fast:
                cm.generate(prompts[:2], routed[:2], max_new_tokens=1)  # builds the pool's stacked weights
                default = len(cm.adapters._mixed.adapters) <= DENSE_UP_TO
                cm.adapters._mixed.dense = default if dense is None else dense  # both layouts use the same weights
            return route, route + timed(lambda: cm.generate(prompts, routed, **gen))

        def naive() -> None:
            for prompt, task in zip(prompts, [r.task for r in cm.route(prompts)]):
                cm.generate([prompt], [task], **gen)

        samples: dict[str, list[float]] = {k: [] for k in ("base", "single_adapter", "mixed", "mixed_gather",
                                                            "peft_mixed", "naive")}
        overhead = []
        for repeat in range(args.repeats + 1):  # round 0 warms every path up and is discarded
            if repeat == 1:
                samples, overhead = {k: [] for k in samples}, []
            samples["base"].append(timed(lambda: cm.generate(prompts, ["base"] * len(prompts), **gen)))
            samples["single_adapter"].append(timed(lambda: cm.generate(prompts, [tasks[0]] * len(prompts), **gen)))
            route_s, total = mixed(True)
            samples["mixed"].append(total)
            overhead.append(route_s / total)
            samples["mixed_gather"].append(mixed(True, dense=False)[1])
            samples["peft_mixed"].append(mixed(False)[1])
            samples["naive"].append(timed(naive))

    tokens = args.batch * t
    tps = {k: tokens / statistics.median(v) for k, v in samples.items()}
    result = {"tokens_per_s": tps, "mixed_vs_base": tps["mixed"] / tps["base"],
              "mixed_vs_naive": tps["mixed"] / tps["naive"], "mixed_vs_single": tps["mixed"] / tps["single_adapter"],
              "gather_vs_base": tps["mixed_gather"] / tps["base"],
              "peft_mixed_vs_base": tps["peft_mixed"] / tps["base"], "switch_overhead": statistics.median(overhead),
              "routing_agrees_with_labels": sum(a == b for a, b in zip(routed, tasks)) / len(tasks),
              "config": {"model": cm.base_reference, "adapters": args.adapters, "batch": args.batch, "new_tokens": t,
                         "rank": args.rank, "repeats": args.repeats, "device": cm.device}}
    if args.json:
        print(json.dumps(result))
        return
    for name, value in tps.items():
        print(f"{name:>15}: {value:8.1f} tokens/s")
    for key in ("mixed_vs_base", "mixed_vs_naive", "mixed_vs_single", "gather_vs_base", "peft_mixed_vs_base",
                "switch_overhead"):
        print(f"{key:>19}: {result[key]:.3f}")


if __name__ == "__main__":
    main()
