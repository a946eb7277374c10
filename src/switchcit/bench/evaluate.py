"""`switchcit eval`: how well a store does on the user's own held-out rows, task by task.

Per task: the share of rows the switch routes to that task, the share it sends to the base model, where
the rows went (confusion), and the answer score both as routed and with the row's own task's adapter
forced (the oracle), so the user sees what routing costs. Beside them, routing only, switchcit's everyday
requests of no task (`data/general_requests.txt`): the share sent to the base model and the tasks that keep the
rest, since a task whose prompts read like requests to any assistant (bare questions, everyday goals) keeps
requests like them, and only the user can give its rows an instruction that tells them apart. It runs the
library's own paths (`ContinualModel.generate`, routed and forced) and the bench's metrics. A correctly routed
row's oracle answer is its routed answer (the same adapter and prompt), so only misrouted rows are generated twice.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ..adapters import BASE
from ..data import Example, parse_columns, read_examples
from ..errors import SwitchcitError
from ..formats import is_saved_dataset
from ..options import columns_option, fallback_option, model_options

KEEPS_EVERYDAY = 5.0  # percent of the everyday requests a newly learned task may keep before `learn` notes it
METRIC_NAMES = {"exact": "exact_match", "rouge": "rouge1", "bleu": "bleu", "sari": "sari", "bertscore": "bertscore"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` on the `switchcit` command's subparsers."""
    p = subparsers.add_parser("eval", help="score a store on held-out rows of its tasks: routing and answers per task",
                              description="Route and answer held-out rows of learned tasks; report per task the "
                              "routing accuracy, the share sent to the base model, where misrouted rows went, and "
                              "the answer score as routed and with the row's own task forced (oracle).")
    p.add_argument("--store", required=True)
    p.add_argument("--data", required=True, help="held-out rows with outputs: a folder of <task>.<ext> files, one "
                   "file with --task, or rows with a 'task' column; any format `learn` reads")
    p.add_argument("--task", default=None, help="the task of the rows (with a folder or a 'task' column: evaluate "
                   "only this task)")
    columns_option(p)
    p.add_argument("--metric", default="exact", choices=list(METRIC_NAMES), help="answer score (default: exact)")
    p.add_argument("--max-examples", type=int, default=None, help="at most N rows per task (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length (default: 128)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", default=None, help="folder for eval.json, report.md and confusion.png")
    fallback_option(p)
    model_options(p)
    return p


def read_heldout(source: str, known: list[str], task: str | None = None, columns: str | None = None,
                 max_examples: int | None = None, progress: bool = False) -> dict[str, list[Example]]:
    """Held-out examples by task, in the store's learning order: a row's task is its 'task' column, else its
    file's name in a folder, else `task`."""
    if max_examples is not None and max_examples < 1:
        raise SwitchcitError(f"--max-examples must be at least 1, not {max_examples}")
    named = parse_columns(columns) if columns else {}
    column = named.get("task", "task")
    by_file = Path(source).is_dir() and not is_saved_dataset(Path(source))
    heldout: dict[str, list[Example]] = {}
    for where, row, example in read_examples(source, True, named, progress):
        label = row.get(column)
        label = str(label) if label is not None else Path(where.source).stem if by_file else task
        if label is None:
            raise SwitchcitError(f"{where}: no task for this row: give --task NAME, a '{column}' column, or a folder "
                                 "of <task>.<ext> files")
        if task and label != task:
            continue
        if label not in known:
            raise SwitchcitError(f"{where}: task '{label}' is not in the store (it has {', '.join(known) or 'none'}): "
                                 "evaluate learned tasks")
        rows = heldout.setdefault(label, [])
        if max_examples is None or len(rows) < max_examples:
            rows.append(example)
    if not heldout:
        raise SwitchcitError(f"{source}: no rows of task '{task}'")
    return {name: heldout[name] for name in known if name in heldout}  # in learning order


def _source(example: Example) -> str:
    """What SARI compares against: the input of an instruction + input prompt, else the whole prompt."""
    return example.prompt[len(example.wording) + 2:] if example.wording else example.prompt


def everyday_routes(cm) -> list[tuple[str, str]]:
    """(request, the task it went to) for each everyday request of no task, routed as the store routes."""
    from .routing import general_requests

    requests = general_requests()
    return [(request, route.task) for request, route in zip(requests, cm.route(requests))]


def everyday(cm) -> dict:
    """{n, to_base, kept_by: {task: requests, most first}}: the everyday requests of no task, routed."""
    routes = everyday_routes(cm)
    kept = Counter(task for _, task in routes if task != BASE)
    return {"n": len(routes), "to_base": 100 * (len(routes) - sum(kept.values())) / len(routes),
            "kept_by": dict(kept.most_common())}


def everyday_note(cm, name: str) -> str | None:
    """What `learn` says when task `name` keeps KEEPS_EVERYDAY percent or more of the everyday requests: requests
    like them would get its adapter instead of the base model, and only the user knows whether they should."""
    routes = everyday_routes(cm)
    kept = [request for request, task in routes if task == name]
    share = 100 * len(kept) / len(routes)
    if share < KEEPS_EVERYDAY:
        return None
    return (f"task '{name}' keeps {len(kept)} of switchcit's {len(routes)} everyday requests of no task "
            f"({share:.0f}%), e.g. {kept[0]!r}: its prompts read like requests to any assistant, so requests like "
            "these will get its adapter, not the base model; if they should not, start its rows with an instruction "
            "that says what the task asks (e.g. 'Answer yes or no: ...') and learn it again with --replace")


def evaluate(cm, heldout: dict[str, list[Example]], metric: str = "exact", max_new_tokens: int = 128,
             batch_size: int = 16) -> dict:
    """The report: {"metric", "tasks": {task: {n, routing_accuracy, to_base, confusion, score, oracle_score}},
    "overall", "everyday"}, percentages 0-100; overall routing over all rows, overall scores the mean over tasks;
    everyday: see `everyday`."""
    from .metrics import METRICS
    from .streams import EvalExample

    if metric not in METRIC_NAMES:
        raise SwitchcitError(f"unknown metric '{metric}': use one of {', '.join(METRIC_NAMES)}")
    labels = [t for t, rows in heldout.items() for _ in rows]
    examples = [e for rows in heldout.values() for e in rows]
    prompts = [e.prompt for e in examples]
    routed = cm.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    wrong = [i for i, a in enumerate(routed) if a.task != labels[i]]
    oracle = [a.output for a in routed]
    if wrong:
        forced = cm.generate([prompts[i] for i in wrong], [labels[i] for i in wrong], max_new_tokens, batch_size)
        for i, answer in zip(wrong, forced):
            oracle[i] = answer.output
    score = METRICS[METRIC_NAMES[metric]]
    tasks, start = {}, 0
    for name, rows in heldout.items():
        span = range(start, start + len(rows))
        start += len(rows)
        references = [EvalExample(e.prompt, (e.output,), _source(e)) for e in rows]
        went = Counter(routed[i].task for i in span)
        tasks[name] = {"n": len(rows), "routing_accuracy": 100 * went[name] / len(rows),
                       "to_base": 100 * went[BASE] / len(rows), "confusion": dict(went.most_common()),
                       "score": score(references, [routed[i].output for i in span]),
                       "oracle_score": score(references, [oracle[i] for i in span])}
    overall = {"n": len(examples), "routing_accuracy": 100 * (len(examples) - len(wrong)) / len(examples),
               "to_base": 100 * sum(a.task == BASE for a in routed) / len(examples),
               "score": sum(t["score"] for t in tasks.values()) / len(tasks),
               "oracle_score": sum(t["oracle_score"] for t in tasks.values()) / len(tasks)}
    return {"metric": metric, "tasks": tasks, "overall": overall, "everyday": everyday(cm)}


def _misrouted(name: str, confusion: dict[str, int]) -> str:
    return ", ".join(f"{to} {count}" for to, count in confusion.items() if to != name) or "-"


def _lines(report: dict) -> list[tuple[str, dict, str]]:
    """(name, figures, where misrouted rows went) per task, then overall."""
    return [(name, t, _misrouted(name, t["confusion"]) if "confusion" in t else "")
            for name, t in [*report["tasks"].items(), ("overall", report["overall"])]]


def _everyday_line(report: dict) -> str:
    found = report["everyday"]
    kept = ", ".join(f"{t} {n}" for t, n in found["kept_by"].items()) or "none"
    return (f"everyday requests of no task ({found['n']}, switchcit's own): {found['to_base']:.1f}% sent to the base "
            f"model; kept by {kept}")


def render_table(report: dict) -> str:
    """The terminal table: one line per task and an overall line."""
    from .metrics import METRIC_NOTES

    header = f"{'task':<16} {'n':>6} {'routing':>8} {'to base':>8} {'score':>7} {'oracle':>7}  misrouted to"
    lines = [header, "-" * len(header)]
    for name, t, where in _lines(report):
        lines.append(f"{name:<16} {t['n']:>6} {t['routing_accuracy']:>7.1f}% {t['to_base']:>7.1f}% "
                     f"{t['score']:>7.1f} {t['oracle_score']:>7.1f}  {where}".rstrip())
    lines.append(f"score: {METRIC_NOTES[METRIC_NAMES[report['metric']]]} (0-100), as routed and with each row's own "
                 "task forced (oracle); overall scores: the mean over tasks")
    lines.append(_everyday_line(report))
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    from .metrics import METRIC_NOTES
    from .report import _table

    rows = [[f"`{name}`", str(t["n"]), f"{t['routing_accuracy']:.1f}", f"{t['to_base']:.1f}", f"{t['score']:.1f}",
             f"{t['oracle_score']:.1f}", where] for name, t, where in _lines(report)]
    return "\n".join(["# switchcit eval", "",
                      f"Score: {METRIC_NOTES[METRIC_NAMES[report['metric']]]} (0-100), as routed and with each row's "
                      "own task forced (oracle). Routing and to-base are percentages of the task's rows; overall "
                      "scores are the mean over tasks.", "",
                      *_table(["task", "rows", "routing %", "to base %", "score", "oracle", "misrouted to"], rows),
                      "", _everyday_line(report) + ".", "",
                      "![where each task's rows were routed](confusion.png)", ""])


def plot_confusion(report: dict, path: Path) -> Path:
    """confusion.png: rows are the true tasks, columns where their rows were routed, cells the share (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(report["tasks"])
    targets = list(dict.fromkeys([*tasks, *(to for t in report["tasks"].values() for to in t["confusion"])]))
    targets = [t for t in targets if t != BASE] + [BASE]
    shares = np.array([[100 * report["tasks"][t]["confusion"].get(to, 0) / report["tasks"][t]["n"] for to in targets]
                       for t in tasks])
    fig, ax = plt.subplots(figsize=(1.1 * len(targets) + 2.5, 0.8 * len(tasks) + 1.8))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=100)
    for (i, j), v in np.ndenumerate(shares):
        count = report["tasks"][tasks[i]]["confusion"].get(targets[j], 0)
        if count:
            ax.text(j, i, f"{v:.0f}%\n({count})", ha="center", va="center", color="w" if v > 60 else "k",
                    fontsize="small")
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true task")
    fig.colorbar(image, ax=ax, label="% of the task's rows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    plot_confusion(report, out / "confusion.png")
