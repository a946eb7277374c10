"""Command-line options shared by several `switchcit` commands, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse


def model_options(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    """--device, --dtype, --model (and -q/--quiet for commands with progress bars)."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--model", default=None,
                   help="base model: Hugging Face id or local folder (default: the store's, else embedded SmolLM2)")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def fallback_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-fallback", action="store_true",
                   help="always use the nearest task's adapter, even for prompts unlike every learned task")
