"""Command-line options shared by several `switchcit` commands, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of `cls` that names a flag, its help ending with the dataclass default.
    Options default to None, so only what the user typed overrides the dataclass (see `config_from`)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag"):
            continue
        if isinstance(f.default, bool):  # a switch: on when given
            p.add_argument(meta["flag"], dest=f"{cls.__name__}.{f.name}", action="store_true", default=None,
                           help=meta["help"] + f" (default: {'on' if f.default else 'off'})")
            continue
        kind = type(f.default) if f.default is not None else _annotated_type(str(f.type))
        shown = "" if f.default is None else f" (default: {f.default})"  # a None default is explained in the help
        metavar = None if meta.get("choices") else f.name.upper()  # choices show as {a,b,c}
        p.add_argument(meta["flag"], dest=f"{cls.__name__}.{f.name}", type=kind, default=None, metavar=metavar,
                       choices=meta.get("choices"), help=meta["help"] + shown)


def _annotated_type(annotation: str) -> type:
    """The value type of an optional field (`int | None` -> int), from its annotation's text."""
    return next((t for name, t in (("str", str), ("float", float), ("int", int)) if name in annotation), str)


def config_from(args: argparse.Namespace, cls: type[T], **fixed: Any) -> T:
    """`cls` with the options the user gave (and `fixed` values) over its defaults."""
    given = {f.name: getattr(args, f"{cls.__name__}.{f.name}", None) for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in given.items() if v is not None}, **fixed})



def model_options(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    """--device, --dtype, --model (and -q/--quiet for commands with progress bars)."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "nf4"],
                   help="weights' type; nf4: a 4-bit base for QLoRA (CUDA, bitsandbytes) (default: auto = "
                   "bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--model", default=None,
                   help="base model: Hugging Face id or local folder (default: the store's, else embedded SmolLM2)")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (default: off)")


def fallback_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-fallback", action="store_true",
                   help="always use the nearest task's adapter, even for prompts unlike every learned task")


def columns_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--columns", default=None, metavar="ROLE=COLUMN,...",
                   help="which columns hold what, when the row shape is not detected: e.g. instruction=question,"
                   "output=answer or prompt=text,output=summary (roles: instruction, input, output, prompt, "
                   "messages, conversations, task) (default: detected from the first row)")
