"""OpenAI-compatible HTTP server over a store: each request is answered with its task's adapter.

One worker thread owns the model (engine.py) and answers concurrent requests in mixed-adapter batches.
In router-only mode (`--upstream`, upstream.py) it only routes, and each request is forwarded to an
OpenAI-compatible multi-LoRA server (vLLM, LoRAX, another switchcit) under its adapter's name.
Web libraries are imported inside functions so that `switchcit --help` stays fast.
"""

from .app import create_app, serve_in_thread
from .cli import add_parser, cmd_serve
from .config import ServeConfig
from .upstream import vllm_command

__all__ = ["ServeConfig", "add_parser", "cmd_serve", "create_app", "serve_in_thread", "vllm_command"]
