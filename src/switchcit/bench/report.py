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
    commit = source_commit()
    if commit:
        found["switchcit commit"] = commit
    return found


def _versions_line(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def _commits_section(methods: dict[str, dict]) -> list[str]:
    """Each method's code commits, where a run resumed across sessions spans more than one (else the versions
    line names the one)."""
    found = {m: r["commits"] for m, r in methods.items() if r.get("commits")}
    if len({c for commits in found.values() for c in commits}) <= 1:
        return []
    return ["## Code each method ran on", "",
            *(f"- {m}: {', '.join(c)}" for m, c in found.items()), ""]


def source_commit() -> str | None:
    """The git commit of the switchcit code that ran, "+changes" when its files differ from it; None outside a
    git checkout (an installed wheel). Why: a version number does not tell two runs of a checkout apart, and a
    result must name the code it ran on."""
    import subprocess

    package = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        changed = subprocess.run(["git", "-C", str(package), "diff", "--quiet", "HEAD", "--", "."],
                                 capture_output=True, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if changed else "")


def machine() -> str:
    """The hardware that produced the numbers, in words: CPU model and cores, memory, GPU if any."""
    import os

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else cpu
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        memory = ""
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{memory}{gpu}; {platform.system()} {platform.release()}"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    """A figure with its 95% interval, e.g. '53.1 [52.4, 53.8]'."""
    return _cell(value) + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if value is not None and interval else "")


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
             "change of each earlier task from just after learning it to the end (negative: forgetting). "
             "R_reworded scores the same test rows in switchcit's own rewordings (`bench/data/rewordings.json`), "
             "for the tasks that have them; for SwitchCIT, the gap between the two is what routing still loses. "
             "Brackets: 95% bootstrap interval over the evaluation prompts.", "",
             *([f"Command: `{results['command']}`", ""] if results.get("command") else []),
             *([f"Machine: {results['machine']}.", ""] if results.get("machine") else []),
             "## Summary", ""]
    keys = ["ap", "bwt", *(["ap_reworded", "bwt_reworded"] if any(r.get("ap_reworded") is not None
                                                                 for r in methods.values()) else [])]
    lines += _table(["method", *(k.upper().replace("_REWORDED", " reworded") for k in keys), "seconds"],
                    [[m, *(_with_interval(r.get(k), (r.get("bootstrap") or {}).get(k)) for k in keys),
                      f"{r['seconds']:.0f}"] for m, r in methods.items()])
    lines += ["## Final score per task", ""]
    lines += _table(["method", *tasks], [[m, *(_cell((r["final"] or {}).get(t)) for t in tasks)]
                                         for m, r in methods.items()])
    reworded_tasks = [t for t in tasks if any(t in (r.get("final_reworded") or {}) for r in methods.values())]
    if reworded_tasks:
        lines += ["## Final score on reworded prompts", ""]
        lines += _table(["method", *reworded_tasks], [[m, *(_cell((r.get("final_reworded") or {}).get(t))
                                                            for t in reworded_tasks)] for m, r in methods.items()])
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
                     if "switch_unseen" in switch else "")
                  + ("; on reworded prompts after each stage: " + _accuracies(switch["switch_reworded_accuracy"])
                     if switch.get("switch_reworded_accuracy") else "") + ".", "",
                  "Confusion after the last stage (rows: true task, columns: routed task):", ""]
        lines += _table(["true \\ routed", *switch["confusion_columns"]],
                        [[t, *map(str, row)] for t, row in zip(switch["confusion_rows"], switch["confusion"])])
    lines += _studies_section(results)
    lines += ["## R matrices", ""]
    for m, r in methods.items():
        lines += [f"### {m}", ""]
        lines += _table(["after \\ on", *tasks], [[t, *map(_cell, row)] for t, row in zip(tasks, r["matrix"])])
        if r.get("ap_reworded") is not None:
            lines += [f"{m}, reworded prompts:", ""]
            lines += _table(["after \\ on", *tasks], [[t, *map(_cell, row)]
                                                       for t, row in zip(tasks, r["matrix_reworded"])])
    lines += ["## Metrics", ""]
    for t in tasks:
        spec = results["metrics"][t]
        notes = [METRIC_NOTES[spec["metric"]], *(f"secondary: {METRIC_NOTES[s]}" for s in spec["secondary"])]
        lowered = "; predictions lower-cased first" if spec["lowercase"] else ""
        lines.append(f"- {t}: {'; '.join(notes)}{lowered}")
    lines += ["", *_commits_section(methods), "## Versions", "", _versions_line(results["versions"]), ""]
    return "\n".join(lines)


def _accuracies(values: list[float | None] | None) -> str:
    return "n/a" if values is None else ", ".join(map(_cell, values))


def _studies_section(results: dict) -> list[str]:
    """Router comparison and memory budget (see studies.py), when the run has them."""
    studies, tasks = results.get("studies") or {}, results["tasks"]
    unseen = [t for t in tasks if results["metrics"][t]["unseen_wordings"]]
    lines = []
    if "memory" in studies:
        spec = studies["memory"]
        lines += ["## Memory budget", "",
                  "The switch retrained stage by stage on the newest task's features plus p% of every earlier "
                  f"task's (at least {spec['min_per_task']}), per encoder; the fallback is off. 'base' is the base "
                  "model's last-token hidden state. AP: the experts driven by the last stage's switch.", ""]
        lines += _table(["encoder", "dim", "retained %", "kept per earlier task", "accuracy after each stage",
                         *(["unseen-wording accuracy"] if unseen else []), "AP"],
                        [[f"`{r['encoder']}`", str(r["dim"]), f"{r['percent']:g}",
                          ", ".join(map(str, r["kept_per_earlier_task"])), _accuracies(r["accuracy"]),
                          *([_cell(r["unseen_accuracy"])] if unseen else []), _cell(r["ap"])] for r in spec["rows"]])
    if "arrow" in studies:
        arrow, switch = studies["arrow"], results["methods"].get("switchcit", {})
        lines += ["## Arrow", "",
                  f"PEFT's Arrow drives SwitchCIT's experts after the last stage: per token and layer, the "
                  f"top-{arrow['top_k']} adapters whose own weights best match the hidden state are mixed (no "
                  "features, so no routing accuracy; routers are compared in the routing study, "
                  "`bench --routing-only`).", ""]
        lines += _table(["routing", "AP", *tasks, *(f"{t} (unseen)" for t in unseen)],
                        [["arrow", _cell(arrow["ap"]), *(_cell(arrow["final"][t]) for t in tasks),
                          *(_cell(arrow["final_unseen"].get(t)) for t in unseen)],
                         *([["switchcit", _cell(switch["ap"]), *(_cell(switch["final"][t]) for t in tasks),
                             *(_cell(switch.get("final_unseen", {}).get(t)) for t in unseen)]]
                           if switch.get("final") else [])])
    return lines


def plot_studies(results: dict, out: Path) -> list[Path]:
    """memory.png: final accuracy and AP by retained %."""
    import matplotlib.pyplot as plt

    studies, written = results.get("studies") or {}, []
    if "memory" in studies:
        rows = studies["memory"]["rows"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for encoder in dict.fromkeys(r["encoder"] for r in rows):
            mine = [r for r in rows if r["encoder"] == encoder]
            percents = [r["percent"] for r in mine]
            left.plot(percents, [r["accuracy"][-1] for r in mine], marker="o", label=encoder)
            right.plot(percents, [r["ap"] for r in mine], marker="o", label=encoder)
        for ax, label in ((left, "switch accuracy after the last stage (%)"), (right, "AP after the last stage")):
            ax.set_xscale("log")
            ax.set_xlabel("retained share of each earlier task (%)")
            ax.set_ylabel(label)
            ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(out / "memory.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


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
    bars = {m: ((r["final"] or {}), ((r.get("bootstrap") or {}).get("final") or {}))
            for m, r in results["methods"].items()}
    written.append(plot_final_scores(tasks, bars, out / "final_scores.png",
                                     "error bars: 95% bootstrap interval over the evaluation prompts"))
    return written + plot_studies(results, out)


def plot_final_scores(tasks: list[str], bars: dict[str, tuple[dict, dict]], path: Path, note: str,
                      ylabel: str = "score after the last task (0-100)") -> Path:
    """Final score per task and method (bars: method -> (scores, 95% intervals) by task), intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(tasks) * max(1, len(bars)) / 3), 4))
    width = 0.8 / max(1, len(bars))
    for k, (m, (scores, intervals)) in enumerate(bars.items()):
        values = [scores.get(t) or 0 for t in tasks]
        errors = [[v - intervals[t][0] if intervals.get(t) else 0 for t, v in zip(tasks, values)],
                  [intervals[t][1] - v if intervals.get(t) else 0 for t, v in zip(tasks, values)]]
        ax.bar(np.arange(len(tasks)) + k * width, values, width, yerr=np.clip(errors, 0, None), capsize=2, label=m)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel(ylabel)
    ax.set_title(note, fontsize="small")
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path) -> None:
    (out / "report.md").write_text(render(results), encoding="utf-8")
    plot(results, out)


def _figure_cell(fig: dict) -> str:
    return _with_interval(fig["mean"], fig["ci95"])


def render_seeds(results: dict) -> str:
    """The aggregate over seeds as Markdown: means with t-intervals, then each seed with its bootstrap intervals."""
    from .seeds import FIGURES, REFERENCE

    config, tasks, methods, seeds = results["config"], results["tasks"], results["methods"], results["seeds"]
    keys = [k for k in FIGURES if any(m[k]["per_seed"] != [None] * len(seeds) for m in methods.values())]
    header = [k.upper().replace("_REWORDED", " reworded") for k in keys]
    lines = [f"# switchcit bench: {config['stream']} stream, seeds {', '.join(map(str, seeds))}", "",
             f"Base model `{config['model']}`; {len(tasks)} tasks ({', '.join(tasks)}); per task "
             f"{config['train_examples']} training examples at most, {config['steps']} steps of batch "
             f"{config['batch_size']} at learning rate {config['learning_rate']}; {config['eval_examples']} "
             f"evaluation examples at most, greedy decoding up to {config['max_new_tokens']} new tokens.", "",
             "Each seed draws the data order, the LoRA initialisation, the memory sample and the evaluation sample; "
             "each is a whole run in its folder ("
             + ", ".join(f"[{p}]({p}/report.md)" for p in results["runs"].values())
             + "). A figure is the mean over seeds with its 95% t-interval over seeds in brackets; per seed, "
               "brackets hold the 95% bootstrap interval over its evaluation prompts.", "",
             *([f"Command: `{results['command']}`", ""] if results.get("command") else []),
             *([f"Machine: {results['machine']}.", ""] if results.get("machine") else []),
             "## Summary (mean over seeds [95% t-interval])", ""]
    lines += _table(["method", *header, "seconds per seed"],
                    [[m, *(_figure_cell(r[k]) for k in keys), ", ".join(_cell(x) for x in r["seconds"])]
                     for m, r in methods.items()])
    paired = {m: r[f"minus_{REFERENCE}"] for m, r in methods.items() if f"minus_{REFERENCE}" in r}
    if paired:
        lines += [f"## Difference to the {REFERENCE}, paired by seed (mean [95% t-interval])", "",
                  f"Each seed's figure minus the {REFERENCE}'s on the same seed: an interval that holds 0 finds no "
                  "difference at this number of seeds.", ""]
        lines += _table(["method", "AP", "AP reworded"],
                        [[m, *(_figure_cell(d[k]) for k in ("ap", "ap_reworded"))] for m, d in paired.items()])
    lines += ["## Per seed [95% bootstrap interval over prompts]", ""]
    lines += _table(["method", "seed", *header],
                    [[m, str(seed), *(_with_interval(r[k]["per_seed"][i], (r[k].get("per_seed_ci95") or [None] *
                                                                           len(seeds))[i]) for k in keys)]
                     for m, r in methods.items() for i, seed in enumerate(seeds)])
    for part, title in (("final", "Final score per task"), ("final_reworded", "Final score on reworded prompts")):
        shown = [t for t in tasks if any(t in r[part] for r in methods.values())]
        if shown:
            lines += [f"## {title} (mean over seeds [95% t-interval])", ""]
            lines += _table(["method", *shown], [[m, *(_figure_cell(r[part][t]) if t in r[part] else "-"
                                                       for t in shown)] for m, r in methods.items()])
    if results.get("memory"):
        lines += ["## Memory study (mean over seeds [95% t-interval])", "",
                  "The paper's MLP switch retrained stage by stage on the newest task's features plus p% of every "
                  "earlier task's (at least one), fallback off: its routing accuracy after the last stage, the AP of "
                  f"the experts it drives, and that AP minus the {REFERENCE}'s, paired by seed.", ""]
        lines += _table(["encoder", "retained %", "accuracy", "AP", f"AP minus {REFERENCE}"],
                        [[f"`{r['encoder']}`", f"{r['percent']:g}", _figure_cell(r["accuracy"]), _figure_cell(r["ap"]),
                          _figure_cell(r[f"ap_minus_{REFERENCE}"]) if f"ap_minus_{REFERENCE}" in r else "-"]
                         for r in results["memory"]])
    if results.get("versions"):
        lines += [*_commits_section(methods), "## Versions", "",
                  f"As seed {seeds[0]}'s run recorded them (each seed's report names its own): "
                  + _versions_line(results["versions"]), ""]
    return "\n".join(lines) + "\n![final scores](final_scores.png)\n\n![summary](summary.png)\n"


def write_seeds_report(results: dict, out: Path) -> None:
    """report.md, final_scores.png and summary.png (AP and AP on reworded prompts) of the aggregate, t-intervals
    as error bars."""
    (out / "report.md").write_text(render_seeds(results), encoding="utf-8")
    methods, note = results["methods"], "error bars: 95% t-interval over seeds"

    def bars(part: str, keys: list[str] | None = None) -> dict[str, tuple[dict, dict]]:
        found = {}
        for m, r in methods.items():
            figs = {k: r[k] for k in keys} if keys else r[part]
            found[m] = ({k: f["mean"] for k, f in figs.items()}, {k: f["ci95"] for k, f in figs.items()})
        return found

    plot_final_scores(results["tasks"], bars("final"), out / "final_scores.png", note)
    plot_final_scores(["ap", "ap_reworded"], bars("", ["ap", "ap_reworded"]), out / "summary.png", note,
                      "after the last task (0-100)")


ROUTING_COLUMNS = (("seen", "seen"), ("seen_learned_wordings", "seen, learned wordings"), ("unseen", "unseen"),
                   ("reworded", "reworded"),
                   ("leave_one_wording_out", "leave one wording out"),
                   ("unknown_caught", "unknown caught"), ("unknown_caught_demo", "other stream caught"),
                   ("unknown_caught_general", "general requests caught"),
                   ("auroc", "AUROC"), ("auroc_general", "AUROC general"),
                   ("false_rejection_seen", "false rejection seen"),
                   ("false_rejection_unseen", "false rejection unseen"),
                   ("false_rejection_reworded", "false rejection reworded"),
                   ("false_rejection_lowo", "false rejection left-out wording"), ("joint_seen", "joint seen"),
                   ("joint_unseen", "joint unseen"))


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _routing_cell(column: str, value: float | None) -> str:
    return f"{value:.3f}" if column.startswith("auroc") and value is not None else _cell(value)


def render_routing(report: dict) -> str:
    """routing.json as markdown: the last stage per router, the mean over stages, and the trade-off curve."""
    config, routers = report["config"], report["routers"]
    lines = [f"# Routing on the {config['stream']} stream", "",
             f"Tasks in learning order: {', '.join(config['tasks'])}. Encoder `{config['encoder']}`; default "
             f"router `{report['default']}`; {config['seconds']:.0f} s in all. Percentages, fallback on (a known-task "
             "prompt sent to base is a miss); unknown prompts are the later tasks' at each stage, and, apart, "
             f"{config['other_prompts']} prompts of another stream. Columns are defined in "
             "`switchcit/bench/routing.py`.", ""]
    cells = [c for c, _ in ROUTING_COLUMNS]
    for title, pick in (("After the last stage", lambda s: s[-1]),
                        ("Mean over stages (unknown columns: stages with later tasks)",
                         lambda s: {c: _mean([x[c] for x in s]) for c in cells})):
        lines += [f"## {title}", ""]
        picked = {name: pick(r["stages"]) for name, r in routers.items()}
        lines += _table(["router", *[name for _, name in ROUTING_COLUMNS]],
                        [[f"`{name}`", *[_routing_cell(c, row[c]) for c in cells]] for name, row in picked.items()])
        lines.append("")
    lines += ["## After the last stage, per shape of the training rows", "",
              "as_built: instruction and input apart where the stream has them; inline: the whole prompt as the "
              "instruction; one_wording: one wording per task.", ""]
    lines += _table(["shape", "router", *[name for _, name in ROUTING_COLUMNS]],
                    [[shape, f"`{name}`", *[_routing_cell(c, r["stages"][-1][c]) for c in cells]]
                     for shape, by in report.get("shapes", {}).items() for name, r in by["routers"].items()])
    reworded = {(shape, name): r["stages"][-1].get("reworded_by_task") or {}
                for shape, by in report.get("shapes", {}).items() for name, r in by["routers"].items()}
    reworded_tasks = list(dict.fromkeys(t for by_task in reworded.values() for t in by_task))
    if reworded_tasks:
        lines += ["", "## Rewordings routed to their task after the last stage, per task", ""]
        lines += _table(["shape", "router", *reworded_tasks],
                        [[shape, f"`{name}`", *[_cell(by_task.get(t)) for t in reworded_tasks]]
                         for (shape, name), by_task in reworded.items()])
    taken = [(shape, name, r["general_taken"]) for shape, by in report.get("shapes", {}).items()
             for name, r in by["routers"].items() if r.get("general_taken")]
    if taken:
        lines += ["", "## Everyday requests not caught after the last stage: the tasks that keep them", "",
                  "Percent of the general requests each task keeps past the fallback (the five that keep most).", ""]
        lines += _table(["shape", "router", "tasks"],
                        [[shape, f"`{name}`", ", ".join(f"{t} {_cell(v)}" for t, v in list(by_task.items())[:5])]
                         for shape, name, by_task in taken])
    small = [(shape, name, r["small_task"]) for shape, by in report.get("shapes", {}).items()
             for name, r in by["routers"].items() if r.get("small_task")]
    if small:
        lines += ["", "## A task from a few rows: the last task learned from its first rows alone, beside the others",
                  "",
                  "Rows 0 is the store without it. It must swallow no unknown requests (general requests caught "
                  "within 5 points of the store without it) and take no other task's prompts.", ""]
        lines += _table(["shape", "router", "task", "rows", "general requests caught", "other stream caught",
                         "other tasks: seen", "other tasks: reworded", "its own test prompts"],
                        [[shape, f"`{name}`", found["task"], str(row.get("rows", 0)), _cell(row["general_caught"]),
                          _cell(row["others_caught"]), _cell(row["seen"]), _cell(row["reworded"]),
                          _cell(row["own_seen"])]
                         for shape, name, found in small for row in [found["without"], *found["with"]]])
    lines += ["", "## Accuracy on training wordings after each stage (incremental / joint)", ""]
    lines += _table(["router", *[f"after {t}" for t in config["tasks"]]],
                    [[f"`{name}`", *[f"{_cell(s['seen'])} / {_cell(s['joint_seen'])}" for s in r["stages"]]]
                     for name, r in routers.items()])
    for name, r in routers.items():
        if "tradeoff" in r:
            lines += ["", f"## Trade-off of `{name}`: its fallback threshold scaled, mean over stages with unknowns",
                      ""]
            lines += _table(["threshold x", "unknown caught", "other stream caught", "false rejection seen",
                             "false rejection unseen", "false rejection left-out wording"],
                            [[f"{p['multiplier']:g}", _cell(p["unknown_caught"]), _cell(p["unknown_caught_demo"]),
                              _cell(p["false_rejection_seen"]), _cell(p["false_rejection_unseen"]),
                              _cell(p["false_rejection_lowo"])]
                             for p in r["tradeoff"]])
    last_stage = {(shape, name): r["tradeoff_last_stage"] for shape, by in report.get("shapes", {}).items()
                  for name, r in by["routers"].items() if "tradeoff_last_stage" in r}
    if last_stage:
        lines += ["", "## Trade-off after the last stage, per shape: the fallback threshold scaled", ""]
        lines += _table(["shape", "router", "threshold x", "general requests caught", "false rejection seen",
                         "false rejection unseen", "false rejection reworded"],
                        [[shape, f"`{name}`", f"{p['multiplier']:g}", _cell(p["unknown_caught_general"]),
                          _cell(p["false_rejection_seen"]), _cell(p["false_rejection_unseen"]),
                          _cell(p["false_rejection_reworded"])]
                         for (shape, name), points in last_stage.items() for p in points])
    return "\n".join(lines) + "\n\n![routing](routing.png)\n"


def plot_routing(report: dict, out: Path) -> Path:
    """routing.png: seen-wording accuracy by stage per router, and each fallback's trade-off curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["config"]["tasks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in report["routers"].items():
        left.plot(range(1, len(tasks) + 1), [s["seen"] for s in r["stages"]], marker="o", label=name)
        if "tradeoff" in r:
            points = [p for p in r["tradeoff"] if p["unknown_caught"] is not None]
            unseen = [p["false_rejection_unseen"] if p["false_rejection_unseen"] is not None
                      else p["false_rejection_seen"] for p in points]
            right.plot(unseen, [p["unknown_caught"] for p in points], marker=".", label=name)
    left.set_xticks(range(1, len(tasks) + 1), [f"after {t}" for t in tasks], rotation=20)
    left.set_ylabel("routed to their task, training wordings (%)")
    left.legend(fontsize="small")
    right.set_xlabel("known prompts sent to base, unseen wordings (%)")
    right.set_ylabel("unknown prompts sent to base (%)")
    if right.lines:
        right.legend(fontsize="small")
    fig.tight_layout()
    path = out / "routing.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_routing_report(report: dict, out: Path) -> None:
    (out / "report.md").write_text(render_routing(report), encoding="utf-8")
    plot_routing(report, out)
