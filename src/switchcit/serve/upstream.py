"""Router-only mode: route here, generate on an OpenAI-compatible multi-LoRA server (vLLM, LoRAX)."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from collections.abc import AsyncIterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING

from ..continual import BASE, Route
from ..store import Store
from .config import ServeConfig
from .errors import ApiError
from .openai_api import Ask, routing, sse

if TYPE_CHECKING:
    import httpx

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


class Upstream:
    """Forwards routed requests to an OpenAI-compatible multi-LoRA server, the task's adapter as `model`."""

    def __init__(self, config: ServeConfig, base_model: str):
        import httpx

        url = config.upstream.rstrip("/")
        self.url = url if url.endswith("/v1") else f"{url}/v1"
        self.base_model = config.upstream_base_model or base_model
        headers = {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=config.upstream_timeout)

    def _bodies(self, ask: Ask, routes: list[Route]) -> list[dict]:
        """One upstream request per prompt, since each prompt may need another adapter."""
        bodies = []
        for prompt, route in zip(ask.prompts, routes):
            body = dict(ask.body, model=self.base_model if route.task == BASE else route.task)
            if not ask.chat:
                body["prompt"] = prompt
            bodies.append(body)
        return bodies

    def _path(self, ask: Ask) -> str:
        return f"{self.url}/chat/completions" if ask.chat else f"{self.url}/completions"

    async def _send(self, ask: Ask, body: dict) -> httpx.Response:
        import httpx

        try:
            response = await self.client.send(self.client.build_request("POST", self._path(ask), json=body),
                                              stream=True)
        except httpx.HTTPError as exc:
            raise ApiError(502, f"upstream {self.url} failed: {type(exc).__name__}: {exc}", "upstream_error") from None
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            raise _upstream_error(response)
        return response

    async def complete(self, ask: Ask, routes: list[Route]) -> dict:
        async def one(body: dict) -> dict:
            response = await self._send(ask, body)
            await response.aread()
            try:
                return response.json()
            except ValueError:
                raise ApiError(502, f"upstream answered invalid JSON: {response.text[:200]}",
                               "upstream_error") from None

        results = await asyncio.gather(*(one(b) for b in self._bodies(ask, routes)))
        choices = [dict(c, index=i) for i, r in enumerate(results) for c in r.get("choices", [])[:1]]
        usage = {k: sum((r.get("usage") or {}).get(k, 0) for r in results)
                 for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {**results[0], "model": ask.model, "choices": choices, "usage": usage,
                "switchcit": routing(ask, routes)}

    async def open_stream(self, ask: Ask, routes: list[Route]) -> AsyncIterator[str]:
        """Relay the upstream streams one prompt after another; opening the first one raises its error."""
        bodies = self._bodies(ask, routes)
        first = await self._send(ask, bodies[0])

        async def events() -> AsyncIterator[str]:
            extra = {"switchcit": routing(ask, routes)}
            response = first
            try:
                for index, body in enumerate(bodies):
                    if response is None:
                        try:
                            response = await self._send(ask, body)
                        except ApiError as exc:
                            yield sse(exc.body())
                            return
                    async for line in response.aiter_lines():
                        data = line[5:].strip() if line.startswith("data:") else ""
                        if not data or data == "[DONE]":
                            continue
                        chunk = json.loads(data)
                        if "error" in chunk:
                            yield sse(chunk)
                            return
                        chunk["model"] = ask.model
                        for choice in chunk.get("choices") or []:
                            choice["index"] = index
                        yield sse({**chunk, **extra})
                        extra = {}
                    await response.aclose()
                    response = None
                yield sse("[DONE]")
            finally:
                if response is not None:
                    await response.aclose()

        return events()


def _upstream_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, f"upstream: {error['message']}", error.get("type", "upstream_error"),
                        error.get("param"), error.get("code"))
    except (ValueError, KeyError, TypeError):
        return ApiError(502, f"upstream answered HTTP {response.status_code}: {response.text[:200]}",
                        "upstream_error")


def vllm_command(store: str | Path) -> str:
    """A `vllm serve` command that serves the store's base model with every task's adapter under its name."""
    from ..models import model_location

    store = Store(store)
    manifest = store.read()
    reference = manifest.base_model
    with redirect_stdout(sys.stderr):  # converting the embedded model prints a note; stdout is the command
        location = model_location(reference)
    rank = max([t.lora.get("r", 8) for t in manifest.tasks], default=8)
    rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    command = ["vllm", "serve", location]
    if location != reference:  # router-only mode names the base model by the store's reference
        command += ["--served-model-name", reference]
    command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max(1, len(manifest.tasks)))]
    if manifest.tasks:
        command += ["--lora-modules", *[f"{t.name}={store.path(t.adapter).resolve()}" for t in manifest.tasks]]
    return shlex.join(command)
