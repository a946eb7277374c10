"""The stage x task protocol: after learning task i, score every method on every task seen so far.

Methods run one after another (each with a freshly loaded base model). After each stage a method's
scores are saved in RUN_DIR/<method>/progress.json, so a killed run resumes at the first stage not
yet scored; generations are cached (see cache.py), so resuming repeats no generation either.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..continual import BASE
from ..errors import SwitchcitError
from ..experts import ExpertConfig
from .cache import GenerationCache
from .files import write_json
from .methods import METHODS, Setup, build
from .metrics import METRICS, average_performance, backward_transfer
from .streams import BenchTask, EvalExample, Stream
from .studies import StudyConfig, run_studies


@dataclass
class BenchConfig:
    stream: str
    model: str
    methods: list[str]
    data_dir: str | None
    train_examples: int
    eval_examples: int
    steps: int
    learning_rate: float
    batch_size: int
    max_length: int
    max_new_tokens: int
    seed: int
    seqft_learning_rate: float | None = None  # full fine-tuning often wants a far smaller rate than LoRA
    device: str | None = None
    studies: StudyConfig = field(default_factory=StudyConfig)  # run on SwitchCIT's finished run

    def identity(self) -> dict:
        """The settings a resumed run must share with the run it continues (methods and studies may change)."""
        return {k: v for k, v in asdict(self).items() if k not in ("methods", "device", "studies")}

    def expert(self) -> ExpertConfig:
        return ExpertConfig(learning_rate=self.learning_rate, batch_size=self.batch_size, max_steps=self.steps,
                            epochs=float(self.steps), max_length=self.max_length, seed=self.seed)


class Scorer:
    """Scores a task's predictions with its metric (and secondary ones); identical predictions are scored once."""

    def __init__(self):
        self.memo: dict[tuple, dict[str, float]] = {}

    def __call__(self, task: BenchTask, examples: list[EvalExample], predictions: list[str]) -> dict[str, float]:
        if task.lowercase:
            predictions = [p.lower() for p in predictions]
        key = (task.name, tuple(e.prompt for e in examples), tuple(predictions))
        if key not in self.memo:
            self.memo[key] = {m: METRICS[m](examples, predictions) for m in (task.metric, *task.secondary)}
        return self.memo[key]


def switch_confusion(method, tasks: list[BenchTask], unseen: bool = False) -> dict:
    """Routing accuracy (0-100) and confusion counts [true task][routed task], the last column 'base'
    (prompts the switch judged to be of no known task)."""
    names = [t.name for t in tasks]
    truth = [(i, e.prompt) for i, t in enumerate(tasks) for e in (t.unseen if unseen else t.seen)]
    routed = method.route([p for _, p in truth])
    columns = [*names, BASE]
    confusion = [[0] * len(columns) for _ in names]
    for (i, _), task in zip(truth, routed):
        confusion[i][columns.index(task)] += 1
    hits = sum(confusion[i][i] for i in range(len(names)))
    return {"accuracy": 100.0 * hits / max(1, len(truth)), "confusion": confusion, "labels": names,
            "columns": columns}


def run_method(name: str, stream: Stream, setup: Setup, scorer: Scorer) -> dict:
    """All stages of one method, resuming from its saved progress; returns that progress."""
    from tqdm.auto import tqdm

    folder = setup.out / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "progress.json"
    progress = json.loads(path.read_text()) if path.exists() else {"stages": [], "unseen": None}
    has_unseen = [t for t in stream.tasks if t.unseen]
    if len(progress["stages"]) == len(stream.tasks) and (progress["unseen"] is not None or not has_unseen):
        return progress
    method = build(name, setup)
    for i, task in enumerate(tqdm(stream.tasks, desc=name, unit="task", disable=not setup.progress)):
        started = time.perf_counter()
        method.learn(task.train)
        if i < len(progress["stages"]):
            continue
        seen = stream.tasks[:i + 1]
        stage = {"task": task.name,
                 "scores": {t.name: scorer(t, t.seen, method.generate([e.prompt for e in t.seen])) for t in seen}}
        if getattr(method, "routes_itself", False):
            stage["switch"] = switch_confusion(method, seen)
        stage["seconds"] = time.perf_counter() - started
        progress["stages"].append(stage)
        write_json(path, progress)
    if has_unseen:
        started = time.perf_counter()
        progress["unseen"] = {"scores": {t.name: scorer(t, t.unseen, method.generate([e.prompt for e in t.unseen]))
                                         for t in has_unseen}}
        if getattr(method, "routes_itself", False):
            progress["unseen"]["switch"] = switch_confusion(method, has_unseen, unseen=True)
        progress["unseen"]["seconds"] = time.perf_counter() - started
        write_json(path, progress)
    del method
    gc.collect()
    return progress


def summarize(progress: dict, stream: Stream) -> dict:
    """One method's results: the R matrix (null above the diagonal and for stages not run), AP, BWT, ..."""
    names = [t.name for t in stream.tasks]
    stages = progress["stages"]
    matrix = [[stages[i]["scores"][names[j]][stream.tasks[j].metric] if i < len(stages) and j <= i else None
               for j in range(len(names))] for i in range(len(names))]
    done = len(stages) == len(names)
    unseen = progress.get("unseen") or {}
    result = {"matrix": matrix, "ap": average_performance(matrix) if done else None,
              "bwt": backward_transfer(matrix) if done else None,
              "final": dict(zip(names, matrix[-1])) if done else None,
              "secondary": {t.name: {m: stages[-1]["scores"][t.name][m] for m in t.secondary}
                            for t in stream.tasks if t.secondary} if done else None,
              "seconds": sum(s["seconds"] for s in stages) + unseen.get("seconds", 0)}
    if unseen:
        metric = {t.name: t.metric for t in stream.tasks}
        result["final_unseen"] = {t: scores[metric[t]] for t, scores in unseen["scores"].items()}
    if stages and "switch" in stages[0]:
        last = stages[-1]["switch"]
        result.update(switch_accuracy=[s["switch"]["accuracy"] for s in stages], confusion=last["confusion"],
                      confusion_rows=last["labels"], confusion_columns=last["columns"])
        if unseen:
            result["switch_unseen"] = unseen["switch"]  # accuracy, confusion, labels (rows), columns
    return result


def check_config(out: Path, config: BenchConfig) -> None:
    """A RUN_DIR belongs to one setting: refuse to mix results of different ones."""
    path = out / "config.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in config.identity().items() if before.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise SwitchcitError(f"{out} holds a run with other settings ({detail}): use another --out to start anew")
    write_json(path, config.identity())


def run_bench(config: BenchConfig, stream: Stream, out: Path, progress: bool = True,
              command: str | None = None) -> dict:
    """Run (or resume) every method in canonical order; write results.json, report.md and plots."""
    from .report import machine, versions, write_report

    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise SwitchcitError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    config.studies.check()
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    cache = GenerationCache(out / "generations.jsonl", batch_size=16, progress=progress)
    setup = Setup(out, config.model, config.expert(), cache, config.max_new_tokens, config.device, progress,
                  stream.labels(), config.seqft_learning_rate)
    scorer = Scorer()
    results = {"config": asdict(config), "command": command, "machine": machine(), "versions": versions(),
               "tasks": [t.name for t in stream.tasks],
               "metrics": {t.name: {"metric": t.metric, "secondary": list(t.secondary), "lowercase": t.lowercase,
                                    "unseen_wordings": bool(t.unseen)} for t in stream.tasks},
               "methods": {}}
    for name in [m for m in METHODS if m in config.methods]:  # SwitchCIT before the oracle that reuses its experts
        results["methods"][name] = summarize(run_method(name, stream, setup, scorer), stream)
        write_json(out / "results.json", results)
    studies = config.studies
    finished = results["methods"].get("switchcit", {}).get("ap") is not None
    if finished and (studies.routers or studies.memory_percents):
        method = build("switchcit", setup)
        results["studies"] = run_studies(studies, stream, method, scorer, out, config.seed)
        del method
        gc.collect()
        write_json(out / "results.json", results)
    write_report(results, out)
    return results
