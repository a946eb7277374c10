"""`switchcit serve`: options, and running the server with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..errors import SwitchcitError
from ..options import config_from, config_options, fallback_option, model_options
from .app import create_app
from .config import ServeConfig
from .connections import uvicorn_config
from .upstream import vllm_command

log = logging.getLogger("switchcit.serve")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `switchcit serve` and its options."""
    p = subparsers.add_parser("serve", help="serve a store over an OpenAI-compatible HTTP API")
    p.add_argument("--store", required=True, help="store folder (tasks learned while serving are picked up live)")
    config_options(p, ServeConfig)
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="require 'Authorization: Bearer KEY', the key being this file's first line (or set "
                        "$SWITCHCIT_API_KEY; /health stays open; default: no key)")
    p.add_argument("--api-key", default=None,
                   help="the key itself: visible to every local user in `ps`, prefer --api-key-file")
    p.add_argument("--upstream-api-key", default=os.environ.get("SWITCHCIT_UPSTREAM_API_KEY"),
                   help="API key for the upstream (default: $SWITCHCIT_UPSTREAM_API_KEY)")
    p.add_argument("--print-vllm-command", action="store_true",
                   help="print the `vllm serve` command that serves this store's adapters, then exit")
    fallback_option(p)
    model_options(p, quiet=False)
    p.set_defaults(func=cmd_serve)
    return p


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key:
        log.warning("--api-key on the command line is visible to every local user in `ps`: prefer "
                    "--api-key-file or $SWITCHCIT_API_KEY")
        return args.api_key
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError):
            key = ""
        if not key:  # an empty key would serve without authentication
            raise SwitchcitError(f"cannot read an API key from {args.api_key_file}: give a readable file whose "
                                 "first line is the key")
        return key
    return os.environ.get("SWITCHCIT_API_KEY")


def cmd_serve(args: argparse.Namespace) -> None:
    if args.print_vllm_command:
        print(vllm_command(args.store))
        return
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="switchcit: %(message)s")
    config = config_from(args, ServeConfig, store=args.store, model=args.model, device=args.device, dtype=args.dtype,
                         fallback=not args.no_fallback, api_key=_api_key(args), upstream_api_key=args.upstream_api_key)
    if not config.api_key and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", config.host)
    app = create_app(config)
    mode = f"routing to {config.upstream}" if config.upstream else "generating"
    log.info("serving store %s (%d tasks, %s) on http://%s:%d/v1", config.store, len(app.state.engine.cm.task_names),
             mode, config.host, config.port)
    uvicorn.Server(uvicorn_config(app, host=config.host, port=config.port, log_level="info")).run()
