"""Which tasks of a stream a model can learn at all: the rule that picks a stream's tasks before any run.

Many of BIG-bench's 48 tasks are beyond a 135M model, and a stream of tasks nothing learns measures no
forgetting. The rule, fixed before any continual run (issue 23): in stream order, train each task alone
(the oracle's adapter, the bench's budget) and keep the first `count` tasks whose score after learning is
at least `margin` points above both zero-shot and the score of always giving the most common answer (a
task learned only in its answer format, a binary choice answered 'correct' every time, beats zero-shot
without learning the task: winowhy, 46 against 0, and 56 for always 'incorrect'). Each task is an
ordinary one-task bench run (oracle and zeroshot) in OUT/<task>, so a killed selection resumes and nothing
is generated twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from .files import write_json
from .protocol import BenchConfig, run_bench
from .streams import BenchTask, Stream
from .studies import StudyConfig

MARGIN = 10.0  # points above zero-shot and the constant answer after learning the task alone


def one_answer(task: BenchTask) -> float:
    """The score of always giving the test rows' most common answer: a task learned only in its answer format (a
    binary choice answered 'correct' every time) reaches it without learning the task."""
    counts = Counter(e.references[0] for e in task.seen)
    return 100.0 * max(counts.values()) / len(task.seen) if task.seen else 0.0


def select_tasks(config: BenchConfig, stream: Stream, out: Path, count: int, margin: float = MARGIN,
                 progress: bool = True, command: str | None = None) -> dict:
    """Apply the rule; writes and returns OUT/selected.json: {"rule", "settings", "candidates", "tasks"} where
    "tasks" (the kept names, in stream order) is what `bench --tasks OUT/selected.json` reads."""
    rule = (f"in stream order, each task trained alone ({config.steps} steps, the oracle's adapter); kept when its "
            f"score after learning is at least {margin:g} points above zero-shot and above always giving the "
            f"test rows' most common answer; the first {count} kept")
    candidates = []
    selected = {"rule": rule, "command": command, "settings": config.identity(), "candidates": candidates,
                "tasks": []}
    alone = StudyConfig(memory_percents=[], arrow=False)
    for task in stream.tasks:
        if len(selected["tasks"]) == count:
            break
        one = replace(config, methods=["oracle", "zeroshot"], tasks=[task.name], studies=alone)
        methods = run_bench(one, Stream(stream.name, [task]), out / task.name, progress, command)["methods"]
        learned, zeroshot = methods["oracle"]["ap"], methods["zeroshot"]["ap"]
        kept = learned - max(zeroshot, one_answer(task)) >= margin
        candidates.append({"name": task.name, "metric": task.metric, "zeroshot": zeroshot, "learned": learned,
                           "gain": learned - zeroshot, "kept": kept, "one_answer": one_answer(task),
                           "seconds": methods["oracle"]["seconds"] + methods["zeroshot"]["seconds"]})
        if kept:
            selected["tasks"].append(task.name)
        write_json(out / "selected.json", selected)
    return selected
