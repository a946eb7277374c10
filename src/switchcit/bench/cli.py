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
from .streams import SHAPES
from .studies import MEMORY_PERCENTS, STUDY_ROUTERS, StudyConfig

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
    p.add_argument("--seed", type=int)
    p.add_argument("--routers", default=",".join(STUDY_ROUTERS),
                   help="router comparison on SwitchCIT's run: comma-separated of "
                        f"{','.join(STUDY_ROUTERS)}, or 'none' (default: all)")
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
                   help="switch encoder of --routing-only (default: the library's, embedded MiniLM)")
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


def _tiny_model(out: Path, stream) -> str:
    """The smoke preset's model: a tiny random Llama whose tokenizer knows the stream's text."""
    from ..testing import build_tiny_model

    folder = out / "tiny-model"
    if not (folder / "config.json").exists():
        corpus = [text for t in stream.tasks for e in t.train.examples for text in (e.prompt, e.output)]
        corpus += [e.prompt for t in stream.tasks for e in [*t.seen, *t.unseen]]
        build_tiny_model(folder, corpus, seed=0)
    return str(folder.resolve())


def _list(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else [x.strip() for x in text.split(",") if x.strip()]


def _studies(args) -> StudyConfig:
    try:
        percents = [float(x) for x in _list(args.memory_percents)]
    except ValueError:
        raise SwitchcitError(f"--memory-percents '{args.memory_percents}' is not a list of numbers: give e.g. "
                             "0.01,0.1,1,10 or none") from None
    config = StudyConfig(routers=_list(args.routers), memory_percents=percents, encoders=_list(args.study_encoders))
    config.check()
    return config


def cmd_routing(args) -> None:
    """`bench --routing-only`: 300 test rows per task by default (all of CIT's; routing is cheap)."""
    from ..encoders import load_encoder
    from .routing import RoutingConfig, run_routing
    from .streams import load_stream

    s = _settings(args)
    eval_examples = args.eval_examples or ROUTING_EVAL_EXAMPLES
    config = RoutingConfig(routers=_list(args.routing_routers), encoder=args.encoder)
    config.check()
    shapes = _list(args.shapes)
    unknown = [x for x in shapes if x not in SHAPES]
    if unknown or not shapes:
        raise SwitchcitError(f"--shapes {unknown or '(none)'}: choose from {', '.join(SHAPES)}")
    streams = {shape: load_stream(s["stream"], _data_dir(args, s["stream"]), s["train_examples"], eval_examples,
                                  s["seed"], shape) for shape in shapes}
    from ..adapters import AdapterPool
    from ..models import DEFAULT_MODEL, resolve_device

    device = resolve_device(None if args.device == "auto" else args.device)
    pool = AdapterPool(args.model or DEFAULT_MODEL, device, "float32", check=lambda model: None)  # for 'base'
    encoder = load_encoder(args.encoder, pool, device)
    out = Path(args.out)
    command = "switchcit " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    report = run_routing(streams, encoder.encode, config, out, progress=not args.quiet, command=command)
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
    from .protocol import BenchConfig, run_bench
    from .streams import load_stream

    if args.routing_only:
        cmd_routing(args)
        return
    s = _settings(args)
    studies = _studies(args)
    methods = _list(args.methods)
    if not methods:
        raise SwitchcitError("--methods is empty: name at least one of " + ", ".join(METHODS))
    out = Path(args.out)
    data_dir = _data_dir(args, s["stream"])
    stream = load_stream(s["stream"], data_dir, s["train_examples"], s["eval_examples"], s["seed"])
    model = args.model or (_tiny_model(out, stream) if args.preset == "smoke" else DEFAULT_MODEL)
    spec = s["stream"] if s["stream"] in ("demo", "cit") else str(Path(s["stream"]).resolve())
    config = BenchConfig(stream=spec, model=model, methods=methods, data_dir=data_dir,
                         train_examples=s["train_examples"], eval_examples=s["eval_examples"], steps=s["steps"],
                         learning_rate=s["lr"], batch_size=s["batch_size"], max_length=s["max_length"],
                         max_new_tokens=s["max_new_tokens"], seed=s["seed"], seqft_learning_rate=args.seqft_lr,
                         device=None if args.device == "auto" else args.device, studies=studies)
    command = "switchcit " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    results = run_bench(config, stream, out, progress=not args.quiet, command=command)
    print(f"switchcit bench: {len(results['methods'])} method(s) on {len(results['tasks'])} tasks; "
          f"results in {out / 'results.json'}, report in {out / 'report.md'}")
    for name, r in results["methods"].items():
        ap = "-" if r["ap"] is None else f"{r['ap']:.1f}"
        bwt = "-" if r["bwt"] is None else f"{r['bwt']:+.1f}"
        print(f"  {name:<12} AP {ap:>6}  BWT {bwt:>6}  {r['seconds']:.0f} s")
    studies = results.get("studies", {})
    for name, r in studies.get("routers", {}).get("routers", {}).items():
        accuracy = "" if r["accuracy"] is None else f"  routing {r['accuracy'][-1]:.1f}%"
        print(f"  router {name:<8} AP {r['ap']:6.1f}{accuracy}")
    for r in studies.get("memory", {}).get("rows", []):
        print(f"  memory {r['percent']:g}% {r['encoder']}: routing {r['accuracy'][-1]:.1f}%  AP {r['ap']:.1f}")
