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
from .intervals import bootstrap
from .methods import METHODS, Setup, build
from .metrics import METRICS, PER_EXAMPLE, average_performance, backward_transfer
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
    tasks: list[str] | None = None  # a selection of the stream's tasks (None: all)
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
        self.memo: dict[tuple, tuple[dict[str, float], list[float] | None]] = {}

    def __call__(self, task: BenchTask, examples: list[EvalExample],
                 predictions: list[str]) -> tuple[dict[str, float], list[float] | None]:
        """Scores by metric, and the main metric's score per prompt (None for a corpus metric such as BLEU)."""
        if task.lowercase:
            predictions = [p.lower() for p in predictions]
        key = (task.name, tuple(e.prompt for e in examples), tuple(predictions))
        if key not in self.memo:
            per_prompt = PER_EXAMPLE[task.metric](examples, predictions) if task.metric in PER_EXAMPLE else None
            main = (sum(per_prompt) / max(1, len(per_prompt)) if per_prompt is not None
                    else METRICS[task.metric](examples, predictions))
            scores = {task.metric: main, **{m: METRICS[m](examples, predictions) for m in task.secondary}}
            self.memo[key] = scores, per_prompt
        return self.memo[key]


def switch_confusion(method, tasks: list[BenchTask], learned: list[BenchTask], split: str = "seen") -> dict:
    """Routing accuracy (0-100) and confusion counts [true task][routed task] on the tasks' `split` prompts: a
    row per task of `tasks`, a column per task the switch has learned (a prompt may go to a task with no such
    prompts of its own), the last column 'base' (prompts the switch judged to be of no known task)."""
    names = [t.name for t in tasks]
    truth = [(i, e.prompt) for i, t in enumerate(tasks) for e in getattr(t, split)]
    routed = method.route([p for _, p in truth])
    columns = [*(t.name for t in learned), BASE]
    confusion = [[0] * len(columns) for _ in names]
    for (i, _), task in zip(truth, routed):
        confusion[i][columns.index(task)] += 1
    hits = sum(confusion[i][columns.index(name)] for i, name in enumerate(names))
    return {"accuracy": 100.0 * hits / max(1, len(truth)), "confusion": confusion, "labels": names,
            "columns": columns}


def evaluate(method, tasks: list[BenchTask], split: str, scorer: Scorer) -> dict:
    """The method's scores on each task's `split` prompts ('seen', 'unseen', 'reworded'; tasks without any are
    left out): {"scores": {task: {metric: score}}, "per_example": {task: [main metric per prompt]}}."""
    found = {"scores": {}, "per_example": {}}
    for task in tasks:
        examples = getattr(task, split)
        if examples:
            scores, per_prompt = scorer(task, examples, method.generate([e.prompt for e in examples]))
            found["scores"][task.name] = scores
            if per_prompt is not None:
                found["per_example"][task.name] = per_prompt
    return found


def run_method(name: str, stream: Stream, setup: Setup, scorer: Scorer, commit: str | None) -> dict:
    """All stages of one method, resuming from its saved progress; returns that progress. Each new stage records
    `commit`, the code this process runs (a run resumed across sessions may span several)."""
    from tqdm.auto import tqdm

    folder = setup.out / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "progress.json"
    progress = json.loads(path.read_text()) if path.exists() else {"stages": [], "unseen": None}
    has_unseen = [t for t in stream.tasks if t.unseen]
    if len(progress["stages"]) == len(stream.tasks) and (progress["unseen"] is not None or not has_unseen):
        return progress
    method = build(name, setup)
    routes = getattr(method, "routes_itself", False)
    for i, task in enumerate(tqdm(stream.tasks, desc=name, unit="task", disable=not setup.progress)):
        started = time.perf_counter()
        method.learn(task.train)
        if i < len(progress["stages"]):
            continue
        seen = stream.tasks[:i + 1]
        reworded = [t for t in seen if t.reworded]
        stage = {"task": task.name, **evaluate(method, seen, "seen", scorer)}
        if reworded:
            stage["reworded"] = evaluate(method, reworded, "reworded", scorer)
        if routes:
            stage["switch"] = switch_confusion(method, seen, seen)
            if reworded:
                stage["switch_reworded"] = switch_confusion(method, reworded, seen, "reworded")
        stage["seconds"] = time.perf_counter() - started
        stage["commit"] = commit
        progress["stages"].append(stage)
        write_json(path, progress)
    if has_unseen:
        started = time.perf_counter()
        progress["unseen"] = evaluate(method, has_unseen, "unseen", scorer)
        if routes:
            progress["unseen"]["switch"] = switch_confusion(method, has_unseen, stream.tasks, "unseen")
        progress["unseen"]["seconds"] = time.perf_counter() - started
        write_json(path, progress)
    del method
    gc.collect()
    return progress


def _matrix(stages: list[dict], stream: Stream, part: str | None) -> list[list[float | None]]:
    """R[i][j] from the stages' scores (`part` None: seen prompts, 'reworded': reworded ones); null above the
    diagonal, for stages not run and for tasks without such prompts."""
    names = [t.name for t in stream.tasks]

    def score(i: int, j: int) -> float | None:
        found = stages[i] if part is None else stages[i].get(part) or {}
        return found.get("scores", {}).get(names[j], {}).get(stream.tasks[j].metric)

    return [[score(i, j) if i < len(stages) and j <= i else None for j in range(len(names))]
            for i in range(len(names))]


def _bootstrap(stages: list[dict], stream: Stream, part: str | None) -> dict | None:
    """Bootstrap intervals over prompts of AP, BWT and the final scores, where every scored task has its
    per-prompt scores (runs from before they were kept, and corpus metrics, have none)."""
    names = [t.name for t in stream.tasks]

    def pick(stage: dict) -> dict:
        return (stage if part is None else stage.get(part) or {}).get("per_example", {})

    scored = (stages[-1] if part is None else stages[-1].get(part) or {}).get("scores", {})
    final = pick(stages[-1])
    if not scored or set(final) != set(scored):
        return None
    learned = {name: pick(stages[j])[name] for j, name in enumerate(names) if name in pick(stages[j])}
    return bootstrap(final, learned, names[-1])


def summarize(progress: dict, stream: Stream) -> dict:
    """One method's results: the R matrix (null above the diagonal and for stages not run), AP, BWT, the same on
    reworded prompts (R_reworded), final scores, bootstrap intervals over prompts, ..."""
    names = [t.name for t in stream.tasks]
    stages = progress["stages"]
    matrix, reworded = _matrix(stages, stream, None), _matrix(stages, stream, "reworded")
    done = len(stages) == len(names)
    unseen = progress.get("unseen") or {}
    result = {"matrix": matrix, "ap": average_performance(matrix) if done else None,
              "bwt": backward_transfer(matrix) if done else None,
              "final": dict(zip(names, matrix[-1])) if done else None,
              "matrix_reworded": reworded, "ap_reworded": average_performance(reworded) if done else None,
              "bwt_reworded": backward_transfer(reworded) if done else None,
              "final_reworded": {n: v for n, v in zip(names, reworded[-1]) if v is not None} if done else None,
              "secondary": {t.name: {m: stages[-1]["scores"][t.name][m] for m in t.secondary}
                            for t in stream.tasks if t.secondary} if done else None,
              "seconds": sum(s["seconds"] for s in stages) + unseen.get("seconds", 0),
              "commits": list(dict.fromkeys(s["commit"] for s in stages if s.get("commit")))}
    if done:
        intervals = {"seen": _bootstrap(stages, stream, None), "reworded": _bootstrap(stages, stream, "reworded")}
        result["bootstrap"] = {**(intervals["seen"] or {}),
                               **{f"{k}_reworded": v for k, v in (intervals["reworded"] or {}).items()}}
    if unseen:
        metric = {t.name: t.metric for t in stream.tasks}
        result["final_unseen"] = {t: scores[metric[t]] for t, scores in unseen["scores"].items()}
    if stages and "switch" in stages[0]:
        last = stages[-1]["switch"]
        result.update(switch_accuracy=[s["switch"]["accuracy"] for s in stages], confusion=last["confusion"],
                      confusion_rows=last["labels"], confusion_columns=last["columns"])
        if "switch_reworded" in stages[-1]:
            result["switch_reworded_accuracy"] = [s.get("switch_reworded", {}).get("accuracy") for s in stages]
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
    """Run (or resume) the config's methods in canonical order; write results.json, report.md and plots. The
    results also summarize the methods an earlier command ran into the same folder (same settings, checked),
    so adding a method to a run adds a row instead of dropping the others."""
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
    before = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    results = {"config": asdict(config), "command": command, "machine": machine(), "versions": versions(),
               "tasks": [t.name for t in stream.tasks],
               "metrics": {t.name: {"metric": t.metric, "secondary": list(t.secondary), "lowercase": t.lowercase,
                                    "unseen_wordings": bool(t.unseen)} for t in stream.tasks},
               "methods": {}}
    for name in METHODS:  # canonical order: SwitchCIT before the oracle that reuses its experts
        if name in config.methods:
            stages = run_method(name, stream, setup, scorer, results["versions"].get("switchcit commit"))
        elif (out / name / "progress.json").exists():  # run here before: the folder's results keep it
            stages = json.loads((out / name / "progress.json").read_text())
        else:
            continue
        results["methods"][name] = summarize(stages, stream)
        write_json(out / "results.json", results)
    studies = config.studies
    finished = "switchcit" in config.methods and results["methods"]["switchcit"]["ap"] is not None
    if finished and (studies.memory_percents or studies.arrow):
        method = build("switchcit", setup)
        results["studies"] = run_studies(studies, stream, method, scorer, out, config.seed)
        del method
        gc.collect()
    elif "switchcit" not in config.methods and "studies" in before:  # studies of switchcit's experts, kept
        results["studies"] = before["studies"]
    write_json(out / "results.json", results)
    write_report(results, out)
    return results
