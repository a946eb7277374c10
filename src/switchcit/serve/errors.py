"""Errors as the OpenAI API returns them: a status, a message, and the type, param and code fields."""

from __future__ import annotations

from ..continual import BASE
from .config import AUTO


class ApiError(Exception):
    """An error answered as an OpenAI error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str, models: list[str]) -> ApiError:
    return ApiError(404, f"model '{model}' does not exist: use '{AUTO}' (routed by the switch), '{BASE}' or a task "
                    f"name ({', '.join(models[2:]) or 'none learned yet'})", param="model", code="model_not_found")
