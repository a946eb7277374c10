"""Where a store's test prompts go, per task: to their task, to another, or to the base model and why.

    python benchmarks/fallback_reasons.py --store docs/results/bigbench12-cpu-small/seed-0/switchcit/store \
        --stream bigbench --data-dir ../shared/data/bigbench --eval-examples 50 --seed 0

Why: a known task's request that the base model answers has lost its expert, and the two tests of the
fallback point at different fixes: outside every task's region (the task's rows are too alike: add rows or
wordings, or loosen --false-rejection), or nearer the everyday requests than its task (the task's inputs
look like what people ask any assistant). It reads the store's own tasks from the stream, with the seed and
sizes of the bench run that made the store, so the prompts are that run's; routing only, the LLM is never
loaded. Prints a Markdown table, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from switchcit import BASE, ContinualModel
from switchcit.bench.streams import load_stream


def tally(cm: ContinualModel, name: str, prompts: list[str]) -> dict:
    routes = cm.route(prompts)
    reasons = Counter(r.reason for r in routes if r.task == BASE)
    return {"task": name, "prompts": len(prompts), "right": sum(r.task == name for r in routes),
            "other_task": sum(r.task not in (name, BASE) for r in routes), "base": dict(reasons)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--stream", required=True, help="demo, cit, bigbench or a user's stream folder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-examples", type=int, default=500, help="as the bench run (cpu-small: 500)")
    p.add_argument("--eval-examples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    cm = ContinualModel(args.store, progress=False)
    stream = load_stream(args.stream, args.data_dir, args.train_examples, args.eval_examples, args.seed,
                         tasks=cm.task_names)
    rows = [{"split": split, **tally(cm, t.name, [e.prompt for e in examples])}
            for t in stream.tasks for split, examples in (("seen", t.seen), ("reworded", t.reworded)) if examples]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    reasons = sorted({why for r in rows for why in r["base"]})
    print("| task | prompts | to their task | to another task | " + " | ".join(f"base: {w}" for w in reasons) + " |")
    print("|---" * (4 + len(reasons)) + "|")
    for r in rows:
        print(f"| {r['task']} ({r['split']}) | {r['prompts']} | {r['right']} | {r['other_task']} | "
              + " | ".join(str(r["base"].get(w, 0)) for w in reasons) + " |")


if __name__ == "__main__":
    main()
