"""Does learning a new task cost more as tasks pile up? Learn 6 tasks in a row with a fixed step budget.

    python benchmarks/learn_scaling.py [--json] [--model M] [--tasks 6] [--steps 10]

`learn_time_ratio` is the time to learn the last task over the first (target <= 1.1): an adapter's
training never touches old adapters, and the switch retrains on a memory that grows by a few
feature vectors per task.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from switchcit import ContinualModel, ExpertConfig, Task
from switchcit import transaction as transaction_module
from switchcit.demo import demo_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    stream = demo_stream(n_train=args.examples, n_test=1, seed=0)
    cycle = (stream * args.tasks)[:args.tasks]
    tasks = [Task(f"{train.name}-{i}", train.examples) for i, (train, _) in enumerate(cycle)]
    switch_seconds: list[float] = []
    build_switch = transaction_module.build_switch

    def timed_switch(*a, **k):
        started = time.perf_counter()
        result = build_switch(*a, **k)
        switch_seconds.append(time.perf_counter() - started)
        return result

    transaction_module.build_switch = timed_switch  # measure the switch's share without changing its code
    learn_seconds, store_bytes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        cm = ContinualModel(store, base_model=args.model, progress=False,
                            expert_config=ExpertConfig(max_steps=args.steps, epochs=100))
        cm.model  # noqa: B018 - the base model's load is not part of learning the first task
        cm.encoder.encode(["warm up"])
        for task in tasks:
            started = time.perf_counter()
            cm.learn(task)
            learn_seconds.append(time.perf_counter() - started)
            store_bytes.append(sum(p.stat().st_size for p in store.rglob("*") if p.is_file()))
    per_task = [store_bytes[0]] + [b - a for a, b in zip(store_bytes, store_bytes[1:])]
    result = {"learn_time_s": learn_seconds, "learn_time_ratio": learn_seconds[-1] / learn_seconds[0],
              "switch_train_s": switch_seconds, "store_bytes_per_task": per_task,
              "config": {"model": cm.base_reference, "tasks": args.tasks, "steps": args.steps,
                         "examples": args.examples}}
    if args.json:
        print(json.dumps(result))
        return
    for i, (t, s, b) in enumerate(zip(learn_seconds, switch_seconds, per_task)):
        print(f"task {i + 1}: learn {t:6.1f} s (switch {s:5.2f} s), store +{b / 1e6:.2f} MB")
    print(f"learn_time_ratio (last / first): {result['learn_time_ratio']:.3f}")


if __name__ == "__main__":
    main()
