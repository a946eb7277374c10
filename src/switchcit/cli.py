"""The `switchcit` command. Heavy libraries are imported inside the commands so `--help` stays fast."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

from .bench import add_parser as add_bench_parser
from .bench import cmd_bench
from .bench.evaluate import add_parser as add_eval_parser
from .bench.evaluate import everyday_note
from .bundle import MAX_BYTES
from .encoders import DEFAULT_ENCODER
from .errors import SwitchcitError, one_line, write_failure
from .experts import ExpertConfig
from .memory import MemoryConfig
from .options import columns_option, config_from, config_options, fallback_option, model_options
from .serve import add_parser as add_serve_parser
from .serve import cmd_serve
from .switch import SwitchConfig

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def _byte_count(text: str) -> int:
    """A number of bytes, with an optional unit: 1000000, 512MiB, 8GiB, 1.5GB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with KiB, MiB, GiB, KB, "
                                         "MB or GB")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _prompt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store folder")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to answer")
    p.add_argument("--file", help="prompts in any format and shape `learn` reads (output optional)")
    columns_option(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    fallback_option(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchcit", description="Continual instruction tuning: one LoRA "
                                     "expert per task, and a switch that routes each request to its expert.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("learn", help="learn a new task into a store (creates the store if needed)")
    p.add_argument("--store", required=True)
    p.add_argument("--task", required=True, help="task name: [a-z0-9][a-z0-9_-]{0,63}")
    p.add_argument("--data", required=True, help="training rows: JSONL, JSON, CSV, TSV, Parquet, a folder of them, a "
                   "save_to_disk folder or hf:ORG/NAME[:SPLIT]; Alpaca, chat, ShareGPT or prompt/completion rows")
    columns_option(p)
    p.add_argument("--replace", action="store_true", help="retrain a task already in the store (default: off)")
    p.add_argument("--eval-data", default=None, metavar="FILE", help="rows for the eval loss, read like --data "
                   "(instead of --eval-fraction)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted learn of this task, data and "
                   "configuration from its last checkpoint (default: off)")
    config_options(p, ExpertConfig)
    p.add_argument("--encoder", default=None, help="switch encoder for a new store: sentence-transformers id or "
                   "folder, 'base' (the base model's last-token state), or a causal LM id; +instruction after any "
                   "of them adds the view of the prompt's instruction alone (default: "
                   f"{DEFAULT_ENCODER})")
    config_options(p, SwitchConfig)
    config_options(p, MemoryConfig)
    model_options(p)

    p = sub.add_parser("route", help="print the task each prompt is routed to")
    _prompt_options(p)
    model_options(p)

    p = sub.add_parser("generate", help="answer prompts, each with its routed task's adapter")
    _prompt_options(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the rows with task, confidence and output columns to this "
                   ".jsonl, .csv, .tsv or .parquet file as they are answered")
    model_options(p)

    p = sub.add_parser("tasks", help="list the tasks in a store")
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("forget", help="remove a task: its adapter, its memory and its class in the switch")
    p.add_argument("--store", required=True)
    p.add_argument("--task", required=True)

    p = sub.add_parser("export", help="write a store to one tar bundle with checksums")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="bundle file to write (e.g. model.tar)")

    p = sub.add_parser("import", help="unpack a bundle made by `export` into a new store folder")
    p.add_argument("bundle")
    p.add_argument("--store", required=True, help="new (or empty) folder for the store")
    p.add_argument("--max-bytes", type=_byte_count, default=MAX_BYTES, metavar="SIZE",
                   help=f"most bytes the bundle may unpack to, e.g. 512MiB (default: {MAX_BYTES // 2**30}GiB)")

    p = sub.add_parser("demo", help="learn the built-in 4-task stream on the embedded model and report")
    p.add_argument("--store", default=None, help="keep the demo store here (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=30, help="training steps per task")
    p.add_argument("--train-examples", type=int, default=200)
    p.add_argument("--test-examples", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    model_options(p)

    add_serve_parser(sub)
    add_bench_parser(sub)
    add_eval_parser(sub)
    return parser


def _open(args, **kwargs):
    """An existing store (a typo in --store must not silently answer with the base model)."""
    from .continual import ContinualModel
    from .store import Store

    Store(args.store).read()
    return ContinualModel(args.store, base_model=args.model, device=args.device, dtype=args.dtype,
                          progress=not args.quiet, fallback=not args.no_fallback, **kwargs)


def _inputs(args) -> list[tuple[dict, str]]:
    """(row, prompt) per prompt, all read and checked before any is answered."""
    from .data import read_examples

    if args.file and args.prompts:
        raise SwitchcitError("give prompts as arguments or --file, not both")
    if args.file:
        return [(row, e.prompt) for _, row, e in read_examples(args.file, False, args.columns)]
    if not args.prompts:
        raise SwitchcitError("no prompts: give PROMPT arguments or --file FILE")
    return [({"prompt": p}, p) for p in args.prompts]


def _outside_store(args, path: str) -> str:
    out, store = Path(path).resolve(), Path(args.store).resolve()
    source = getattr(args, "file", None) or getattr(args, "data", None)
    if out == store or store in out.parents or source and out == Path(source).resolve():
        raise SwitchcitError(f"{path} is inside store {args.store} or is the input: write it elsewhere")
    return path


def cmd_learn(args) -> None:
    from .continual import ContinualModel
    from .data import Task, load_examples
    from .store import KINDS, LOGS, Store

    expert = config_from(args, ExpertConfig)  # bad options fail first, before any data is read
    memory = config_from(args, MemoryConfig, seed=expert.seed)
    switch = config_from(args, SwitchConfig)
    if args.eval_data and expert.eval_fraction:
        raise SwitchcitError("give --eval-data or --eval-fraction, not both")
    store = Store(args.store)  # a store we cannot write to fails before a large file is read
    ours = {LOGS, *KINDS}  # what a first learn that was interrupted can leave; the next commit sweeps it
    if store.exists():
        store.read()
    elif store.root.exists() and any(p.name not in ours and not p.name.startswith(".") for p in store.root.iterdir()):
        raise SwitchcitError(f"{args.store} exists and is not a switchcit store: choose an empty or new folder")
    task = Task(args.task, load_examples(args.data, columns=args.columns, progress=not args.quiet))
    eval_examples = load_examples(args.eval_data, columns=args.columns) if args.eval_data else None
    cm = ContinualModel(args.store, base_model=args.model, encoder=args.encoder, device=args.device,
                        dtype=args.dtype, progress=not args.quiet, expert_config=expert, memory_config=memory,
                        switch_config=switch)
    entry = cm.learn(task, replace=args.replace, eval_examples=eval_examples, resume=args.resume)
    if entry is not None:  # None in data-parallel helper processes
        evaluated = "" if entry.eval_loss is None else f", eval loss {entry.eval_loss}"
        print(f"learned task '{entry.name}' ({entry.examples} examples, {entry.steps} steps, "
              f"loss {entry.final_loss}{evaluated}); store {args.store} now has {len(cm.tasks)} task(s)")
        note = everyday_note(cm, entry.name)
        if note:
            print(f"note: {note}", file=sys.stderr)


def cmd_route(args) -> None:
    prompts = [p for _, p in _inputs(args)]
    for prompt, r in zip(prompts, _open(args).route(prompts)):
        if args.json:
            print(json.dumps({"prompt": prompt, **asdict(r)}))
        else:
            conf = "-" if r.confidence is None else f"{r.confidence:.3f}"
            print(f"{r.task}\t{conf}\t{(prompt.splitlines() or [''])[0]}")


def cmd_generate(args) -> None:
    """Answers in chunks of a few batches, each printed or written (--out) as soon as it is done."""
    from .formats import RowWriter

    inputs, cm = _inputs(args), _open(args)
    chunk = max(1, args.batch_size * 8)
    types = {"task": "string", "confidence": "float64", "output": "string"}
    with RowWriter(_outside_store(args, args.out), types) if args.out else contextlib.nullcontext() as writer:
        for start in range(0, len(inputs), chunk):
            rows = inputs[start:start + chunk]
            answers = cm.generate([p for _, p in rows], max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            if writer:
                writer.write([{**row, "task": a.task, "confidence": a.confidence, "output": a.output}
                              for (row, _), a in zip(rows, answers)])
                continue
            for a in answers:
                conf = "" if a.confidence is None else f" {a.confidence:.3f}"
                print(json.dumps({"prompt": a.prompt, **asdict(a.route), "output": a.output})
                      if args.json else f"[{a.task}{conf}] {a.output}", flush=True)


def cmd_eval(args) -> None:
    from .bench.evaluate import evaluate, read_heldout, render_table, write_report

    out = _outside_store(args, args.out) if args.out else None
    cm = _open(args)
    heldout = read_heldout(args.data, cm.task_names, args.task, args.columns, args.max_examples, not args.quiet)
    report = evaluate(cm, heldout, args.metric, args.max_new_tokens, args.batch_size)
    print(json.dumps(report) if args.json else render_table(report))
    if out:
        write_report(report, Path(out))


def cmd_tasks(args) -> None:
    from .store import Store

    manifest = Store(args.store).read()
    if args.json:
        print(json.dumps([t.to_json() for t in manifest.tasks]))
        return
    print(f"store {args.store}: base model {manifest.base_model}, encoder {manifest.encoder}, "
          f"router {manifest.router}")
    for t in manifest.tasks:
        evaluated = "" if t.eval_loss is None else f"  eval loss {t.eval_loss}"
        print(f"  {t.name:<24} {t.examples:>7} examples  {t.memory_size:>5} kept  {t.steps:>6} steps  "
              f"{t.learned_at}  {t.adapter}{evaluated}")


def cmd_forget(args) -> None:
    from .continual import ContinualModel

    cm = ContinualModel(args.store)
    cm.forget(args.task)
    print(f"forgot task '{args.task}'; store {args.store} now has {len(cm.tasks)} task(s)")


def cmd_export(args) -> None:
    from .bundle import export_store

    info = export_store(args.store, args.out)
    print(f"exported {info['tasks']} task(s), {info['files']} files, {info['bytes']} bytes to {args.out}")


def cmd_import(args) -> None:
    from .bundle import import_bundle

    manifest = import_bundle(args.bundle, args.store, args.max_bytes)
    print(f"imported {len(manifest.tasks)} task(s) into {args.store}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(store=args.store, model=args.model, steps=args.steps, n_train=args.train_examples,
             n_test=args.test_examples, seed=args.seed, device=args.device, progress=not args.quiet)


COMMANDS = {"learn": cmd_learn, "route": cmd_route, "generate": cmd_generate, "tasks": cmd_tasks,
            "forget": cmd_forget, "export": cmd_export, "import": cmd_import, "serve": cmd_serve, "bench": cmd_bench,
            "demo": cmd_demo, "eval": cmd_eval}


# What an interrupted command leaves, for the commands that write something.
_AFTER_INTERRUPT = {"learn": "the store keeps its last committed state (learn again with --resume to continue from "
                             "the last checkpoint)",
                    "forget": "the store keeps its last committed state", "import": "nothing was imported",
                    "export": "no bundle was written"}


def _fail(message: str, code: int = 1) -> int:
    print(f"switchcit: {one_line(message)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a command; whatever stops it is one line on stderr and a non-zero exit, never a traceback
    (SWITCHCIT_TRACEBACK=1 shows it for an unexpected error)."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe is reported here, not by the interpreter on its way out
    except SwitchcitError as exc:
        return _fail(f"error: {exc}")
    except BrokenPipeError:  # `switchcit tasks | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush is silent too
        return 141  # what a shell reports for a process ended by SIGPIPE
    except KeyboardInterrupt:
        after = _AFTER_INTERRUPT.get(args.command)
        return _fail("interrupted" + (f"; {after}" if after else ""), 130)
    except Exception as exc:
        if os.environ.get("SWITCHCIT_TRACEBACK"):
            raise
        if isinstance(exc, ModuleNotFoundError):  # an optional dependency: the extras name them all
            package = (exc.name or "?").split(".")[0]
            return _fail(f"error: this needs the Python package '{package}', which is not installed: pip install "
                         "'switchcit[bench]' (metrics, plots) or 'switchcit[data]' (Parquet, datasets)")
        why = write_failure(exc)
        if why is not None:
            where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
            return _fail(f"error: {why}{where}")
        first = (str(exc).strip().splitlines() or [""])[0]
        return _fail(f"error: unexpected {type(exc).__name__}: {first} (set SWITCHCIT_TRACEBACK=1 to see where, and "
                     "please report it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
