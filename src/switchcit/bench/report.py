"""results.json -> report.md and PNG plots (a stage x task heatmap per method, final scores by method)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

from .metrics import METRIC_NOTES

PACKAGES = ("switchcit", "torch", "transformers", "peft", "sentence-transformers", "sacrebleu", "rouge-score",
            "bert-score", "matplotlib")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def render(results: dict) -> str:
    """The report as Markdown: summary, final scores, unseen wordings, switch routing, every R matrix."""
    config, tasks, methods = results["config"], results["tasks"], results["methods"]
    lines = [f"# switchcit bench: {config['stream']} stream", "",
             f"Base model `{config['model']}`; {len(tasks)} tasks ({', '.join(tasks)}); per task "
             f"{config['train_examples']} training examples at most, {config['steps']} steps of batch "
             f"{config['batch_size']} at learning rate {config['learning_rate']}; {config['eval_examples']} "
             f"evaluation examples at most, greedy decoding up to {config['max_new_tokens']} new tokens; seed "
             f"{config['seed']}."
             + (f" seqft fine-tunes all weights at learning rate {config['seqft_learning_rate']}."
                if config.get("seqft_learning_rate") else ""), "",
             "R[i][j] is the score on task j after learning task i. AP is the mean of the last row; BWT the mean "
             "change of each earlier task from just after learning it to the end (negative: forgetting).", "",
             "## Summary", ""]
    lines += _table(["method", "AP", "BWT", "seconds"],
                    [[m, _cell(r["ap"]), _cell(r["bwt"]), f"{r['seconds']:.0f}"] for m, r in methods.items()])
    lines += ["## Final score per task", ""]
    lines += _table(["method", *tasks], [[m, *(_cell((r["final"] or {}).get(t)) for t in tasks)]
                                         for m, r in methods.items()])
    unseen_tasks = [t for t in tasks if results["metrics"][t]["unseen_wordings"]]
    if unseen_tasks:
        lines += ["## Final score with unseen instruction wordings", ""]
        lines += _table(["method", *unseen_tasks],
                        [[m, *(_cell(r.get("final_unseen", {}).get(t)) for t in unseen_tasks)]
                         for m, r in methods.items()])
    secondary = [(t, s) for t in tasks for s in results["metrics"][t]["secondary"]]
    if secondary:
        lines += ["## Secondary scores after the last task (not in R)", ""]
        lines += _table(["method", *(f"{t} {s}" for t, s in secondary)],
                        [[m, *(_cell((r["secondary"] or {}).get(t, {}).get(s)) for t, s in secondary)]
                         for m, r in methods.items()])
    switch = methods.get("switchcit", {})
    if "switch_accuracy" in switch:
        lines += ["## SwitchCIT routing", "", "Switch accuracy after each stage: "
                  + ", ".join(f"{a:.1f}" for a in switch["switch_accuracy"])
                  + (f"; on unseen wordings after the last stage: {switch['switch_unseen']['accuracy']:.1f}"
                     if "switch_unseen" in switch else "") + ".", "",
                  "Confusion after the last stage (rows: true task, columns: routed task):", ""]
        lines += _table(["true \\ routed", *switch["confusion_columns"]],
                        [[t, *map(str, row)] for t, row in zip(switch["confusion_rows"], switch["confusion"])])
    lines += ["## R matrices", ""]
    for m, r in methods.items():
        lines += [f"### {m}", ""]
        lines += _table(["after \\ on", *tasks], [[t, *map(_cell, row)] for t, row in zip(tasks, r["matrix"])])
    lines += ["## Metrics", ""]
    for t in tasks:
        spec = results["metrics"][t]
        notes = [METRIC_NOTES[spec["metric"]], *(f"secondary: {METRIC_NOTES[s]}" for s in spec["secondary"])]
        lowered = "; predictions lower-cased first" if spec["lowercase"] else ""
        lines.append(f"- {t}: {'; '.join(notes)}{lowered}")
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[Path]:
    """heatmap_<method>.png per method and final_scores.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, written = results["tasks"], []
    for m, r in results["methods"].items():
        data = np.array([[np.nan if v is None else v for v in row] for row in r["matrix"]], dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 1.0 * len(tasks) + 1.5))
        image = ax.imshow(data, cmap="viridis", vmin=0, vmax=100)  # one scale, so methods compare by colour
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w" if v < 60 else "k")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
        ax.set_title(f"{m}: R[stage][task]")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(out / f"heatmap_{m}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    methods = list(results["methods"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(tasks) * max(1, len(methods)) / 3), 4))
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        final = results["methods"][m]["final"] or {}
        ax.bar(np.arange(len(tasks)) + k * width, [final.get(t) or 0 for t in tasks], width, label=m)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("score after the last task (0-100)")
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    written.append(out / "final_scores.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def write_report(results: dict, out: Path) -> None:
    (out / "report.md").write_text(render(results), encoding="utf-8")
    plot(results, out)
