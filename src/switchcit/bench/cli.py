"""`switchcit bench`: options, presets, and the run. Heavy libraries load only when the command runs."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..encoders import DEFAULT_ENCODER
from ..errors import SwitchcitError
from .methods import METHODS
from .routing import ROUTING_ROUTERS
from .selection import MARGIN
from .streams import SHAPES
from .studies import MEMORY_PERCENTS, StudyConfig

DEFAULT_DATA_DIRS = {name: Path("..") / "shared" / "data" / name for name in ("cit", "bigbench")}
ROUTING_EVAL_EXAMPLES = 300

# Settings without a preset, sized for the CIT stream on the embedded 135M model. One LoRA step (batch 4)
# takes ~4 s on one core (~2 s on two idle cores), one answer (32 tokens, batches of 16) ~0.6 s (~0.35 s),
# so `cpu-small` runs every method on CIT in about 90 minutes at single-core speed, ~55 on two idle cores.
DEFAULTS = {"stream": "demo", "train_examples": 500, "eval_examples": 30, "steps": 20, "lr": 1e-3, "batch_size": 4,
        "max_length": 384, "max_new_tokens": 32, "seed": 0}
PRESETS = {
    # seconds on a CPU: a tiny random model built in RUN_DIR, a few examples and steps
    "smoke": {"train_examples": 24, "eval_examples": 4, "steps": 2, "lr": 1e-2, "max_new_tokens": 6},
    "cpu-small": {"stream": "cit"},
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on the `switchcit` command's subparsers."""
    p = subparsers.add_parser("bench", help="measure forgetting: SwitchCIT against baselines on a task stream",
                              description="Learn a stream of tasks with each method; after every task, score every "
                              "task seen so far. Writes results.json, report.md and plots to --out; rerunning with "
                              "the same --out resumes where a run stopped.")
    p.add_argument("--stream", default=None,
                   help="demo, cit, bigbench (48 BIG-bench tasks, read in place), or a folder of <task>.jsonl files "
                        "with a stream.json (default: the preset's, else demo)")
    p.add_argument("--data-dir", default=None, help="CIT or BIG-bench data folder (default: ../shared/data/cit or "
                   "../shared/data/bigbench when it exists; for cit, else Hugging Face datasets)")
    p.add_argument("--out", required=True, help="run folder (RUN_DIR)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--model", default=None, help="base model: Hugging Face id or local folder (default: embedded "
                   "SmolLM2; the smoke preset builds a tiny random one)")
    p.add_argument("--train-examples", type=int,
                   help=f"training examples per task (default {DEFAULTS['train_examples']})")
    p.add_argument("--eval-examples", type=int, help="evaluation examples per task (default "
                   f"{DEFAULTS['eval_examples']}; {ROUTING_EVAL_EXAMPLES} with --routing-only)")
    p.add_argument("--steps", type=int, help=f"training steps per task (default {DEFAULTS['steps']})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--seqft-lr", type=float, default=None,
                   help="learning rate of seqft's full fine-tuning (default: --lr, the same for every method)")
    p.add_argument("--batch-size", type=int, help=f"training batch size (default {DEFAULTS['batch_size']})")
    p.add_argument("--max-length", type=int, help=f"training tokens per example (default {DEFAULTS['max_length']})")
    p.add_argument("--max-new-tokens", type=int, help=f"generation length (default {DEFAULTS['max_new_tokens']})")
    p.add_argument("--seed", type=int, help=f"seed of data order, LoRA initialisation, memory and evaluation samples "
                   f"(default {DEFAULTS['seed']})")
    p.add_argument("--seeds", default=None,
                   help="run once per seed, comma-separated (e.g. 0,1,2), into OUT/seed-N, and aggregate them in OUT: "
                        "means with 95%% t-intervals over seeds")
    p.add_argument("--tasks", default=None,
                   help="only these tasks of the stream, in stream order: comma-separated names, or a JSON file with "
                        "a 'tasks' list (such as the selected.json --select-tasks writes)")
    p.add_argument("--select-tasks", type=int, default=None, metavar="N",
                   help="apply the task-selection rule instead of a run: in stream order, train each task alone "
                        "(the oracle's adapter) and keep the first N whose score after learning is at least "
                        f"{MARGIN:g} points above zero-shot; writes OUT/selected.json for --tasks")
    p.add_argument("--arrow", action=argparse.BooleanOptionalAction, default=True,
                   help="after SwitchCIT's run, score PEFT's Arrow routing over its experts (default: on)")
    p.add_argument("--memory-percents", default=",".join(map(str, MEMORY_PERCENTS)),
                   help="memory study: retained percentages of each task's features, or 'none' "
                        f"(default: {','.join(map(str, MEMORY_PERCENTS))})")
    p.add_argument("--study-encoders", default="",
                   help="memory study encoders: comma-separated sentence-transformers ids, 'base', or causal LM ids "
                        "such as facebook/opt-125m (default: the store's encoder and 'base')")
    p.add_argument("--routing-only", action="store_true",
                   help="measure routing alone, stage by stage (no LoRA training, no generation; minutes): writes "
                        "routing.json, report.md and routing.png to --out")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help="shapes of the training rows --routing-only measures, comma-separated: as_built (as the "
                        "stream builds them), inline (the whole prompt as instruction), one_wording (one wording per "
                        f"task) (default: {','.join(SHAPES)})")
    p.add_argument("--routing-routers", default=",".join(ROUTING_ROUTERS),
                   help=f"routers of --routing-only, comma-separated (default: {','.join(ROUTING_ROUTERS)})")
    p.add_argument("--encoder", default=DEFAULT_ENCODER,
                   help="switch encoder of --routing-only (default: the library's, embedded MiniLM; "
                        "REFERENCE+instruction adds the view of the prompt's instruction)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _settings(args) -> dict:
    chosen = {**DEFAULTS, **PRESETS.get(args.preset, {})}
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    return {**chosen, **given}


def _data_dir(args, stream: str) -> str | None:
    if stream not in DEFAULT_DATA_DIRS:
        return None
    if args.data_dir:
        return args.data_dir  # recorded as given: an absolute path would name the machine that ran it
    return str(DEFAULT_DATA_DIRS[stream]) if DEFAULT_DATA_DIRS[stream].is_dir() else None


def _tiny_model(out: Path, streams: list) -> str:
    """The smoke preset's model: a tiny random Llama whose tokenizer knows the streams' text (one per seed)."""
    from ..testing import build_tiny_model

    folder = out / "tiny-model"
    if not (folder / "config.json").exists():
        tasks = [t for stream in streams for t in stream.tasks]
        corpus = [text for t in tasks for e in t.train.examples for text in (e.prompt, e.output)]
        corpus += [e.prompt for t in tasks for e in [*t.seen, *t.unseen, *t.reworded]]
        build_tiny_model(folder, corpus, seed=0)
    return str(folder.resolve())


def _list(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else [x.strip() for x in text.split(",") if x.strip()]


def _seeds(args, settings: dict) -> list[int]:
    if args.seeds is None:
        return [settings["seed"]]
    if args.seed is not None:
        raise SwitchcitError("--seed and --seeds both given: give one")
    try:
        seeds = [int(x) for x in _list(args.seeds)]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SwitchcitError(f"--seeds '{args.seeds}' is not a list of distinct seeds: give e.g. 0,1,2")
    return seeds


def _tasks(text: str | None) -> list[str] | None:
    """--tasks: names, or a JSON file whose 'tasks' lists names (or objects with a 'name')."""
    import json

    if text is None:
        return None
    path = Path(text)
    if path.suffix == ".json":
        try:
            listed = json.loads(path.read_text(encoding="utf-8"))["tasks"]
        except (OSError, ValueError, KeyError, TypeError):
            raise SwitchcitError(f"--tasks {text}: not a readable JSON file with a 'tasks' list") from None
        return [t["name"] if isinstance(t, dict) else t for t in listed]
    return _list(text)


def _studies(args) -> StudyConfig:
    try:
        percents = [float(x) for x in _list(args.memory_percents)]
    except ValueError:
        raise SwitchcitError(f"--memory-percents '{args.memory_percents}' is not a list of numbers: give e.g. "
                             "0.01,0.1,1,10 or none") from None
    config = StudyConfig(memory_percents=percents, encoders=_list(args.study_encoders), arrow=args.arrow)
    config.check()
    return config


def cmd_routing(args) -> None:
    """`bench --routing-only`: 300 test rows per task by default (all of CIT's; routing is cheap)."""
    from ..encoders import load_encoder
    from .routing import RoutingConfig, run_routing
    from .streams import load_stream

    s = _settings(args)
    eval_examples = args.eval_examples or ROUTING_EVAL_EXAMPLES
    from ..adapters import AdapterPool
    from ..models import DEFAULT_MODEL, resolve_device

    model = args.model or DEFAULT_MODEL
    config = RoutingConfig(routers=_list(args.routing_routers), encoder=args.encoder, model=model)
    config.check()
    shapes = _list(args.shapes)
    unknown = [x for x in shapes if x not in SHAPES]
    if unknown or not shapes:
        raise SwitchcitError(f"--shapes {unknown or '(none)'}: choose from {', '.join(SHAPES)}")
    tasks = _tasks(args.tasks)
    streams = {shape: load_stream(s["stream"], _data_dir(args, s["stream"]), s["train_examples"], eval_examples,
                                  s["seed"], shape, tasks) for shape in shapes}
    device = resolve_device(None if args.device == "auto" else args.device)
    pool = AdapterPool(model, device, "float32", check=lambda _: None)  # for 'base'
    encoder = load_encoder(args.encoder, pool, device)
    out = Path(args.out)
    command = "switchcit " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    report = run_routing(streams, encoder, config, out, progress=not args.quiet, command=command)
    print(f"switchcit bench --routing-only: {len(report['routers'])} router(s) on {len(report['config']['tasks'])} "
          f"tasks in {report['config']['seconds']:.0f} s; results in {out / 'routing.json'}, report in "
          f"{out / 'report.md'}")
    for shape, by_router in report["shapes"].items():
        for name, r in by_router["routers"].items():
            last = r["stages"][-1]
            cells = "  ".join(f"{k} {'-' if last[k] is None else last[k]}" for k in
                              ("seen", "unseen", "reworded", "false_rejection_reworded", "unknown_caught_general"))
            print(f"  {shape:<11} {name:<9} last stage: {cells}")


def cmd_bench(args) -> None:
    from ..models import DEFAULT_MODEL
    from .protocol import BenchConfig
    from .streams import load_stream

    if args.routing_only:
        cmd_routing(args)
        return
    s = _settings(args)
    seeds = _seeds(args, s)
    studies = _studies(args)
    methods = _list(args.methods)
    if not methods:
        raise SwitchcitError("--methods is empty: name at least one of " + ", ".join(METHODS))
    out = Path(args.out)
    data_dir = _data_dir(args, s["stream"])
    tasks = _tasks(args.tasks)

    def load(seed: int):
        return load_stream(s["stream"], data_dir, s["train_examples"], s["eval_examples"], seed, tasks=tasks)

    stream = load(seeds[0])
    model = args.model or (_tiny_model(out, [load(x) for x in seeds]) if args.preset == "smoke" else DEFAULT_MODEL)
    spec = s["stream"] if s["stream"] in ("demo", "cit", "bigbench") else str(Path(s["stream"]).resolve())
    config = BenchConfig(stream=spec, model=model, methods=methods, data_dir=data_dir,
                         train_examples=s["train_examples"], eval_examples=s["eval_examples"], steps=s["steps"],
                         learning_rate=s["lr"], batch_size=s["batch_size"], max_length=s["max_length"],
                         max_new_tokens=s["max_new_tokens"], seed=seeds[0], tasks=tasks,
                         seqft_learning_rate=args.seqft_lr, device=None if args.device == "auto" else args.device,
                         studies=studies)
    command = "switchcit " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    if args.select_tasks is not None:
        _select(args, config, stream, out, command)
    elif len(seeds) > 1:
        _run_seeds(args, config, seeds, load, out, command)
    else:
        _run_one(args, config, stream, out, command)


def _select(args, config, stream, out: Path, command: str | None) -> None:
    from .selection import select_tasks

    if args.select_tasks < 1:
        raise SwitchcitError(f"--select-tasks {args.select_tasks}: give the number of tasks to keep, at least 1")
    selected = select_tasks(config, stream, out, args.select_tasks, progress=not args.quiet, command=command)
    print(f"switchcit bench --select-tasks: kept {len(selected['tasks'])} of {len(selected['candidates'])} tasks "
          f"tried; list in {out / 'selected.json'} (give it to --tasks)")
    for c in selected["candidates"]:
        print(f"  {c['name']:<40} zero-shot {c['zeroshot']:5.1f}  learned {c['learned']:5.1f}  "
              f"one answer {c['one_answer']:5.1f}  {'kept' if c['kept'] else '-':<4}  {c['seconds']:.0f} s")


def _run_seeds(args, config, seeds: list[int], load, out: Path, command: str | None) -> None:
    from .seeds import run_seeds

    results = run_seeds(config, seeds, load, out, progress=not args.quiet, command=command)
    print(f"switchcit bench: seeds {','.join(map(str, seeds))}, {len(results['methods'])} method(s) on "
          f"{len(results['tasks'])} tasks; aggregate in {out / 'results.json'}, report in {out / 'report.md'}")
    for name, r in results["methods"].items():
        cells = []
        for key in ("ap", "bwt", "ap_reworded"):
            mean, ci = r[key]["mean"], r[key]["ci95"]
            if mean is not None:
                cells.append(f"{key.upper()} {mean:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""))
        print(f"  {name:<12} " + "  ".join(cells))


def _run_one(args, config, stream, out: Path, command: str | None) -> None:
    from .protocol import run_bench

    results = run_bench(config, stream, out, progress=not args.quiet, command=command)
    print(f"switchcit bench: {len(results['methods'])} method(s) on {len(results['tasks'])} tasks; "
          f"results in {out / 'results.json'}, report in {out / 'report.md'}")
    for name, r in results["methods"].items():
        ap = "-" if r["ap"] is None else f"{r['ap']:.1f}"
        bwt = "-" if r["bwt"] is None else f"{r['bwt']:+.1f}"
        reworded = "" if r.get("ap_reworded") is None else f"  AP reworded {r['ap_reworded']:.1f}"
        print(f"  {name:<12} AP {ap:>6}  BWT {bwt:>6}{reworded}  {r['seconds']:.0f} s")
    studies = results.get("studies", {})
    for r in studies.get("memory", {}).get("rows", []):
        print(f"  memory {r['percent']:g}% {r['encoder']}: routing {r['accuracy'][-1]:.1f}%  AP {r['ap']:.1f}")
    if "arrow" in studies:
        print(f"  arrow        AP {studies['arrow']['ap']:6.1f}")
