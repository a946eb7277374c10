"""Several seeds of one benchmark: each seed a whole run in OUT/seed-N, then their aggregate in OUT.

A seed draws the data order, the LoRA initialisation, the memory sample and the evaluation sample, so
the spread over seeds is the run's own noise. The aggregate gives each figure of a method as its mean,
a 95% t-interval over seeds and the per-seed values with their bootstrap intervals over prompts. Each
seed's folder is an ordinary run, so it resumes per method and stage like any other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..errors import SwitchcitError
from .files import write_json
from .intervals import figure
from .protocol import BenchConfig, run_bench
from .streams import Stream

FIGURES = ("ap", "bwt", "ap_reworded", "bwt_reworded")
REFERENCE = "oracle"  # the bound a method is compared with, paired by seed (the paper's claim: SwitchCIT ~ oracle)


def seed_folder(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def aggregate(runs: dict[int, dict]) -> dict:
    """The seeds' results.json files as one: per method, each figure as {mean, ci95, per_seed, per_seed_ci95}."""
    seeds = list(runs)
    first = runs[seeds[0]]
    names = list(dict.fromkeys(m for r in runs.values() for m in r["methods"]))
    methods = {}
    for name in names:
        per = [runs[s]["methods"].get(name) or {} for s in seeds]
        boot = [r.get("bootstrap") or {} for r in per]
        entry = {k: figure([r.get(k) for r in per], [b.get(k) for b in boot]) for k in FIGURES}
        for part in ("final", "final_reworded"):
            tasks = [t for t in first["tasks"] if any(t in (r.get(part) or {}) for r in per)]
            entry[part] = {t: figure([(r.get(part) or {}).get(t) for r in per],
                                     [((b.get(part) or {}).get(t)) for b in boot]) for t in tasks}
        entry["seconds"] = [r.get("seconds") for r in per]
        entry["commits"] = list(dict.fromkeys(c for r in per for c in r.get("commits") or []))
        methods[name] = entry
    if REFERENCE in methods:
        for name, entry in methods.items():
            if name != REFERENCE:
                entry[f"minus_{REFERENCE}"] = {k: paired_difference(entry[k], methods[REFERENCE][k])
                                                for k in ("ap", "ap_reworded")}
    found = {"seeds": seeds, "config": {k: v for k, v in first["config"].items() if k != "seed"},
             "command": first.get("command"), "machine": first.get("machine"), "versions": first.get("versions"),
             "tasks": first["tasks"], "metrics": first["metrics"],
             "runs": {str(s): seed_folder(Path(), s).as_posix() for s in seeds}, "methods": methods}
    memory = memory_study(runs, methods.get(REFERENCE))
    if memory:
        found["memory"] = memory
    return found


def memory_study(runs: dict[int, dict], reference: dict | None) -> list[dict]:
    """The memory study over seeds (the paper's claim: a switch from 0.01% of each task's features routes as well):
    per encoder and retained share, the last stage's switch accuracy and AP, and AP minus the reference's paired
    by seed. A seed without the study leaves mean and interval None."""
    seeds = list(runs)
    rows: dict[tuple[str, float], list[dict | None]] = {}
    for i, seed in enumerate(seeds):
        for row in ((runs[seed].get("studies") or {}).get("memory") or {}).get("rows", []):
            rows.setdefault((row["encoder"], row["percent"]), [None] * len(seeds))[i] = row
    found = []
    for (encoder, percent), per in rows.items():
        entry = {"encoder": encoder, "percent": percent,
                 "accuracy": figure([r["accuracy"][-1] if r else None for r in per]),
                 "ap": figure([r["ap"] if r else None for r in per])}
        if reference:
            entry[f"ap_minus_{REFERENCE}"] = paired_difference(entry["ap"], reference["ap"])
        found.append(entry)
    return found


def paired_difference(a: dict, b: dict) -> dict:
    """A figure minus another, seed by seed, with the t-interval of the differences: the seeds share data order
    and evaluation prompts, so pairing removes their common noise."""
    return figure([None if x is None or y is None else x - y for x, y in zip(a["per_seed"], b["per_seed"])])


def check_layout(out: Path, config: BenchConfig) -> None:
    """OUT holds seed folders and their aggregate, never a single-seed run of its own; and one setting."""
    path = out / "config.json"
    identity = {k: v for k, v in config.identity().items() if k != "seed"}
    if path.exists():
        before = json.loads(path.read_text())
        if "seeds" not in before:
            raise SwitchcitError(f"{out} holds a single-seed run: give --seeds another --out")
        changed = [k for k, v in identity.items() if before.get(k) != v]
        if changed:
            raise SwitchcitError(f"{out} holds runs with other settings ({', '.join(changed)}): use another --out "
                                 "to start anew")


def run_seeds(config: BenchConfig, seeds: list[int], load: Callable[[int], Stream], out: Path,
              progress: bool = True, command: str | None = None) -> dict:
    """Run (or resume) the benchmark once per seed into OUT/seed-N; write the aggregate's results.json, report.md
    and plots in OUT."""
    from .report import write_seeds_report

    out.mkdir(parents=True, exist_ok=True)
    check_layout(out, config)
    write_json(out / "config.json", {**{k: v for k, v in config.identity().items() if k != "seed"}, "seeds": seeds})
    runs = {seed: run_bench(replace(config, seed=seed), load(seed), seed_folder(out, seed), progress, command)
            for seed in seeds}
    results = aggregate(runs)
    results["command"] = command
    write_json(out / "results.json", results)
    write_seeds_report(results, out)
    return results
