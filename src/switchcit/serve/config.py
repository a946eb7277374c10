"""Server settings, the model names it answers to, and errors as OpenAI error objects."""

from __future__ import annotations

from dataclasses import dataclass

from ..continual import BASE
from ..errors import SwitchcitError

AUTO = "switchcit"  # the model name that lets the switch pick the task
MAX_PROMPTS = 128  # prompts in one /v1/completions request
POLL_SECONDS = 1.0  # how often the worker looks for a changed manifest
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServeConfig:
    store: str
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    fallback: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    max_tokens: int = 512
    max_prompt_chars: int = 16000
    upstream: str | None = None
    upstream_base_model: str | None = None
    upstream_api_key: str | None = None
    upstream_timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise SwitchcitError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0:
            raise SwitchcitError("--max-wait-ms must not be negative")


class ApiError(Exception):
    """An error answered as an OpenAI error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str, models: list[str]) -> ApiError:
    return ApiError(404, f"model '{model}' does not exist: use '{AUTO}' (routed by the switch), '{BASE}' or a task "
                    f"name ({', '.join(models[2:]) or 'none learned yet'})", param="model", code="model_not_found")
