"""Server settings and the model names it answers to."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import check_ranges, knob

AUTO = "switchcit"  # the model name that lets the switch pick the task
MAX_PROMPTS = 128  # prompts in one /v1/completions request
POLL_SECONDS = 1.0  # how often the worker looks for a changed manifest
RETRY_AFTER_S = 1  # the Retry-After of a 429 (queue full) or a 503 (an adapter being reloaded)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json")


@dataclass
class ServeConfig:
    store: str
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    fallback: bool = True
    host: str = knob("127.0.0.1", "--host", "address to listen on")
    port: int = knob(8000, "--port", "port to listen on", low=0, high=65535)
    api_key: str | None = None  # the CLI reads --api-key or $SWITCHCIT_API_KEY
    engine: str = knob("continuous", "--engine", "continuous: requests join and leave the running batch at every "
                       "token; static: fixed batches, each generated to its end", choices=("continuous", "static"))
    max_batch_size: int = knob(32, "--max-batch-size", "most sequences generated at once (1: no batching)", low=1)
    max_kv_tokens: int = knob(32768, "--max-kv-tokens", "continuous engine: most KV-cache cells, running rows x the "
                              "longest prompt + max_tokens among them; past it requests queue", low=1)
    prefill_tokens: int = knob(512, "--prefill-tokens", "continuous engine: prompt tokens read per step (longer "
                               "prompts are read in chunks between decoding steps, shorter deep in a long prompt "
                               "so that each costs about as much); lower: shorter stalls, slower long prompts",
                               low=1)
    max_queue: int = knob(256, "--max-queue", "most prompts waiting for a place in the batch, beyond the "
                          "--max-batch-size being generated; past it requests get a 429 with Retry-After", low=0)
    max_wait_ms: float = knob(10.0, "--max-wait-ms", "static engine: how long a batch waits to fill up", low=0)
    max_tokens: int = knob(512, "--max-tokens", "largest max_tokens a request may ask (and its default)", low=1)
    max_prompt_chars: int = knob(16000, "--max-prompt-chars", "longest prompt accepted, in characters", low=1)
    max_prompt_tokens: int = knob(4096, "--max-prompt-tokens", "longest prompt accepted, in the model's tokens "
                                  "(chat template included; not checked in router-only mode)", low=1)
    max_body_bytes: int = knob(8 * 2**20, "--max-body-bytes", "largest request body accepted", low=1)
    body_timeout_s: float = knob(30.0, low=0, open_low=True)  # a body not received by then gets a 408
    header_timeout_s: float = knob(20.0, "--header-timeout", "seconds a connection may take to send a request's "
                                   "headers, from its opening or its previous answer, before it is closed", low=0,
                                   open_low=True)
    keep_alive_s: float = knob(5.0, "--keep-alive-timeout", "seconds an idle keep-alive connection stays open",
                               low=0, open_low=True)
    upstream: str | None = knob(None, "--upstream", "router-only mode: route, then forward to this OpenAI-compatible "
                                "multi-LoRA server URL (e.g. vLLM) with the task's adapter as model (default: none)")
    upstream_base_model: str | None = knob(None, "--upstream-base-model", "the upstream's name for the base model "
                                           "(default: the store's base model reference)")
    upstream_api_key: str | None = None  # the CLI reads --upstream-api-key or $SWITCHCIT_UPSTREAM_API_KEY
    upstream_timeout: float = knob(600.0, low=0, open_low=True)

    def __post_init__(self) -> None:
        check_ranges(self)
