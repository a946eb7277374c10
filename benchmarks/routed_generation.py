"""Routed generation speed: base model vs one adapter vs switchcit's mixed batch vs the naive per-request path.

    python benchmarks/routed_generation.py [--json] [--model M] [--adapters 4] [--batch 16] [--new-tokens 32]
    python benchmarks/routed_generation.py --sweep [--points 1x32,4x32,16x32,32x32,64x32,64x64] [--out DIR]

All paths run side by side in one process on the same prompts (exactly T new tokens, greedy);
each is repeated and the median is reported. Row i asks for task i (round robin; with more adapters than
rows, spread over all of them), so a batch touches min(adapters, batch) adapters. `mixed` is switchcit's
path as the library runs it (encode + switch timed, then one batch on mixed.py's default layout),
`mixed_dense` and `mixed_gather` the same with the masked dense layout and the grouped layout forced
(`mixed_gather` keeps its old name: it held per-row gathers, the many-adapter layout before grouped
products), and `peft_mixed` PEFT's own mixed-adapter batches (`adapter_names=`), for reference.
`--sweep` grows one store through the points (ADAPTERSxBATCH), measures every path but the naive one at
each, prints a table and writes `sweep.json` and `sweep.png` (tokens/s against adapters) into --out after
every point, so a sweep cut short keeps what it measured.
`--model random:tiny` is a random 2-layer Llama made on the spot, for a fast dry run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from switchcit import ContinualModel, ExpertConfig, Task
from switchcit.demo import demo_stream
from switchcit.mixed import MixedLoRA

SWEEP = "1x32,4x32,16x32,32x32,64x32,64x64"


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def base_model(model: str | None, folder: Path) -> str | None:
    """The model reference to learn on; `random:tiny` builds a random tiny Llama into `folder`."""
    if model != "random:tiny":
        return model
    from switchcit.testing import build_tiny_model

    corpus = [e.prompt + " " + e.output for train, test in demo_stream(40, 10) for e in train.examples + test.examples]
    return str(build_tiny_model(folder, corpus))


def grow(cm: ContinualModel, stream: list, adapters: int) -> list:
    """Learn tasks until the store has `adapters` (each one step: speed does not depend on weight values)."""
    tasks = [(Task(f"{train.name}-{i}", train.examples), test)
             for i, (train, test) in enumerate((stream * adapters)[:adapters])]
    for train, _ in tasks[len(cm.task_names):]:
        cm.learn(train)
    return tasks


def measure(cm: ContinualModel, tasks: list, batch: int, new_tokens: int, repeats: int, naive: bool) -> dict:
    """Tokens/s of every path on one batch, side by side, and the ratios between them."""
    n = len(tasks)
    pick = [(i * n) // batch if n > batch else i % n for i in range(batch)]
    prompts = [tasks[k][1].prompts[i // n % len(tasks[k][1].prompts)] for i, k in enumerate(pick)]
    labels = [tasks[k][0].name for k in pick]
    routed = [r.task for r in cm.route(prompts)]
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=batch)
    pool = cm.adapters
    cm.generate(prompts[:2], labels[:2], max_new_tokens=1)  # loads the adapters and builds the stacked weights
    default = pool._mixed
    names = default.adapters

    def mixed(layout: MixedLoRA | None = None) -> tuple[float, float]:
        pool._mixed = layout or default  # both forced layouts stack the same adapters as the default one
        route = timed(lambda: cm.route(prompts))
        total = route + timed(lambda: cm.generate(prompts, labels, **gen))
        pool._mixed = default
        return route, total

    def peft_mixed() -> float:
        pool.fast_mixed = False
        try:
            return timed(lambda: cm.generate(prompts, labels, **gen))
        finally:
            pool.fast_mixed = True

    def each_alone() -> None:
        for prompt, task in zip(prompts, [r.task for r in cm.route(prompts)]):
            cm.generate([prompt], [task], **gen)

    keys = ("base", "single_adapter", "mixed", "mixed_dense", "mixed_gather", "peft_mixed") + ("naive",) * naive
    samples: dict[str, list[float]] = {k: [] for k in keys}
    overhead: list[float] = []
    rss_mb = 0.0
    for repeat in range(repeats + 1):  # round 0 warms every path up and is discarded
        if repeat == 0:
            mixed()
            rss_mb = resident_mb()  # the library's own footprint: the forced layouts' stacks are not built yet
        if repeat == 1:
            samples, overhead = {k: [] for k in samples}, []
        samples["base"].append(timed(lambda: cm.generate(prompts, ["base"] * batch, **gen)))
        samples["single_adapter"].append(timed(lambda: cm.generate(prompts, [labels[0]] * batch, **gen)))
        route_s, total = mixed()
        samples["mixed"].append(total)
        overhead.append(route_s / total)
        for key, dense in (("mixed_dense", True), ("mixed_gather", False)):
            samples[key].append(mixed(MixedLoRA(cm.model, names, dense=dense))[1])  # built outside the timing
        samples["peft_mixed"].append(peft_mixed())
        if naive:
            samples["naive"].append(timed(each_alone))
    tps = {k: batch * new_tokens / statistics.median(v) for k, v in samples.items()}
    ratios = {"mixed_vs_base": tps["mixed"] / tps["base"], "mixed_vs_single": tps["mixed"] / tps["single_adapter"],
              "single_vs_base": tps["single_adapter"] / tps["base"],
              "gather_vs_base": tps["mixed_gather"] / tps["base"], "dense_vs_base": tps["mixed_dense"] / tps["base"],
              "peft_mixed_vs_base": tps["peft_mixed"] / tps["base"],
              "mixed_vs_peft_mixed": tps["mixed"] / tps["peft_mixed"]}
    if naive:
        ratios["mixed_vs_naive"] = tps["mixed"] / tps["naive"]
    return {"tokens_per_s": tps, **ratios, "switch_overhead": statistics.median(overhead),
            "routing_agrees_with_labels": sum(a == b for a, b in zip(routed, labels)) / batch,
            "layout": "dense" if default.dense else "grouped", "adapters_in_batch": len(set(labels)),
            "stacked_mb": sum(a.nbytes + b.nbytes for _, a, b in default.layers) / 2**20, "rss_mb": rss_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def resident_mb() -> float:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def plot(rows: list[dict], path: Path) -> None:
    """Tokens/s against adapters at the sweep's most common batch: each path a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = statistics.mode(r["config"]["batch"] for r in rows)
    rows = [r for r in rows if r["config"]["batch"] == batch]
    adapters = [r["config"]["adapters"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"base": ":", "peft_mixed": "--", "single_adapter": "-.", "mixed": "-", "mixed_dense": "-",
              "mixed_gather": "-"}
    for key, style in styles.items():
        ax.plot(adapters, [r["tokens_per_s"][key] for r in rows], style, marker="o", label=key,
                linewidth=2.5 if key == "mixed" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(adapters, [str(a) for a in adapters])
    ax.set_xlabel("adapters (stacked and in the batch)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{rows[0]['config']['model']}, batch {batch}, {rows[0]['config']['new_tokens']} new tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="base model (default: the embedded SmolLM2-135M; random:tiny: a random 2-layer Llama)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="measure every point of --points (no naive path)")
    parser.add_argument("--points", default=SWEEP, help="the sweep's ADAPTERSxBATCH points")
    parser.add_argument("--out", type=Path, default=Path("docs/results/routed-generation-sweep"),
                        help="where --sweep writes sweep.json and sweep.png")
    args = parser.parse_args()

    points = sorted(tuple(int(v) for v in p.split("x")) for p in args.points.split(",")) if args.sweep else \
        [(args.adapters, args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        model = base_model(args.model, Path(tmp) / "model")
        cm = ContinualModel(Path(tmp) / "store", base_model=model, progress=False,
                            expert_config=ExpertConfig(r=args.rank, alpha=2 * args.rank, max_steps=1, batch_size=1))
        stream = demo_stream(n_train=8, n_test=64, seed=0)
        rows = []
        for adapters, batch in points:
            result = measure(cm, grow(cm, stream, adapters), batch, args.new_tokens, args.repeats, not args.sweep)
            result["config"] = {"model": args.model or cm.base_reference, "adapters": adapters, "batch": batch,
                                "new_tokens": args.new_tokens, "rank": args.rank, "repeats": args.repeats,
                                "device": cm.device}
            rows.append(result)
            if args.sweep:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
                plot(rows, args.out / "sweep.png")
                if not args.json:
                    print(f"adapters {adapters} batch {batch}: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in result["tokens_per_s"].items()) + " tokens/s", flush=True)
    if args.json:
        print(json.dumps(rows if args.sweep else rows[0]))
        return
    paths = list(rows[0]["tokens_per_s"])
    print(f"{'adapters':>8} {'batch':>5} {'layout':>7} " + " ".join(f"{p:>14}" for p in paths)
          + f" {'mixed/base':>10} {'mixed/peft':>10} {'switch':>6}")
    for r in rows:
        print(f"{r['config']['adapters']:>8} {r['config']['batch']:>5} {r['layout']:>7} "
              + " ".join(f"{r['tokens_per_s'][p]:>14.1f}" for p in paths)
              + f" {r['mixed_vs_base']:>10.3f} {r['mixed_vs_peft_mixed']:>10.3f} {r['switch_overhead']:>6.3f}")


if __name__ == "__main__":
    main()
