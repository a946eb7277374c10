"""The OpenAI API's request and response shapes: validation, answers, and server-sent events."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass

from ..continual import BASE, Route
from ..generation import Generation
from .config import AUTO, MAX_PROMPTS, ServeConfig
from .errors import ApiError, invalid, model_not_found


@dataclass
class Ask:
    """A validated chat or completion request."""

    chat: bool
    model: str
    prompts: list[str]
    single: bool  # one prompt given as a string: the "switchcit" field is an object, not a list
    max_tokens: int
    stream: bool
    include_usage: bool
    stop: list[str]
    body: dict  # as received, forwarded in router-only mode

    @property
    def task(self) -> str | None:
        return None if self.model == AUTO else self.model


def _text(content: object, param: str) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise invalid("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported", param)
        return "".join(p["text"] for p in content)
    raise invalid("message content must be a string or a list of text parts", param)


def _chat_prompt(body: dict, max_chars: int) -> str:
    """The last user message: what the switch reads and the expert answers, as in training."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    texts, prompt = [], None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        texts.append(_text(message.get("content"), f"messages[{i}].content"))
        if message["role"] == "user":
            prompt = texts[-1]
    if prompt is None:
        raise invalid("'messages' has no user message", "messages")
    _check_text([prompt], "messages")
    if sum(map(len, texts)) > max_chars:
        raise invalid(f"the messages are longer than this server's limit of {max_chars} characters", "messages",
                       "context_length_exceeded")
    return prompt


def _check_text(prompts: list[str], param: str) -> None:
    """Refuse, before it joins a batch, text that no tokenizer takes: empty, or not encodable (lone surrogates)."""
    for p in prompts:
        if not p.strip():
            raise invalid("a prompt is empty: send some text", param)
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("a prompt holds an unpaired UTF-16 surrogate, which is not text: fix its encoding",
                          param) from None


def _completion_prompts(body: dict, max_chars: int) -> tuple[list[str], bool]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise invalid("'prompt' must be a string or a non-empty list of strings (token arrays are not "
                       "supported)", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise invalid(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    _check_text(prompts, "prompt")
    if any(len(p) > max_chars for p in prompts):
        raise invalid(f"a prompt is longer than this server's limit of {max_chars} characters", "prompt",
                       "context_length_exceeded")
    return prompts, isinstance(prompt, str)


# The request bodies as OpenAPI documents them (parsing is `parse_ask`'s: OpenAI clients send more fields).
_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]}
_COMMON = {"model": {"type": "string", "description": "'switchcit' routes; 'base' or a task name forces"},
           "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
           "stream": {"type": "boolean"}, "stream_options": {"type": "object"}, "stop": _STOP,
           "n": {"type": "integer"}, "temperature": {"type": "number"}}
_CONTENT = {"oneOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}]}
REQUEST_SCHEMAS = {
    "completion": {"type": "object", "required": ["model", "prompt"], "properties": {
        **_COMMON, "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}},
    "chat": {"type": "object", "required": ["model", "messages"], "properties": {
        **_COMMON, "messages": {"type": "array", "items": {"type": "object", "required": ["role", "content"],
                                                            "properties": {"role": {"type": "string"},
                                                                           "content": _CONTENT}}}}},
}


def openapi_body(kind: str) -> dict:
    """`openapi_extra` for a route whose body `parse_ask` reads: the schema, and the errors it answers."""
    error = {"description": "an OpenAI error object: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": REQUEST_SCHEMAS[kind]}}},
            "responses": {str(code): error for code in (400, 401, 404, 408, 413, 429, 500, 503)}}


def _max_tokens(body: dict, limit: int) -> int:
    name = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    if name is None:
        return limit
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise invalid(f"'{name}' must be an integer from 1 to {limit}", name)
    return value


def parse_ask(body: object, chat: bool, config: ServeConfig, models: list[str]) -> Ask:
    """Validate a request body; raises ApiError (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid(f"'model' is required: '{AUTO}' routes each request, '{BASE}' or a task name forces it",
                       "model")
    if chat:
        prompts, single = [_chat_prompt(body, config.max_prompt_chars)], True
    else:
        prompts, single = _completion_prompts(body, config.max_prompt_chars)
    max_tokens = _max_tokens(body, config.max_tokens)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise invalid("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    if body.get("n") not in (None, 1):
        raise invalid("only n=1 is supported: answers are greedy, so more would be copies", "n")
    if model not in models:
        raise model_not_found(model, models)
    return Ask(chat, model, prompts, single, max_tokens, stream, bool(options.get("include_usage")), stop, body)


def routing(ask: Ask, routes: list[Route]) -> dict | list[dict]:
    fields = [{**asdict(r), "confidence": None if r.confidence is None else round(r.confidence, 4)} for r in routes]
    return fields[0] if ask.single else fields


def _finish(ask: Ask, answer: Generation) -> tuple[str, str]:
    """The answer cut at the first stop string, and OpenAI's finish_reason."""
    text = answer.output
    cuts = [text.find(s) for s in ask.stop if s in text]
    if cuts:
        return text[:min(cuts)], "stop"
    return text, "stop" if answer.stopped else "length"


def _usage(answers: list[Generation]) -> dict:
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(ask: Ask, streaming: bool) -> dict:
    kind = ("chat.completion.chunk" if streaming else "chat.completion") if ask.chat else "text_completion"
    prefix = "chatcmpl" if ask.chat else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
            "model": ask.model}


def response_body(ask: Ask, answers: list[Generation]) -> dict:
    choices = []
    for index, answer in enumerate(answers):
        text, reason = _finish(ask, answer)
        content = {"message": {"role": "assistant", "content": text}} if ask.chat else {"text": text}
        choices.append({"index": index, **content, "logprobs": None, "finish_reason": reason})
    return {**_head(ask, False), "choices": choices, "usage": _usage(answers),
            "switchcit": routing(ask, [a.route for a in answers])}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Chunks:
    """The SSE chunks of one streamed answer; the first one made carries the routing."""

    def __init__(self, ask: Ask, routes: list[Route]):
        self.ask, self.head = ask, _head(ask, True)
        self.extra = {"switchcit": routing(ask, routes)}

    def __call__(self, index: int, text: str | None, reason: str | None = None, role: bool = False) -> str:
        if self.ask.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        event, self.extra = sse({**self.head, "choices": [choice], **self.extra}), {}
        return event

    def end(self, answers: list[Generation]) -> Iterator[str]:
        if self.ask.include_usage:
            yield sse({**self.head, "choices": [], "usage": _usage(answers)})
        yield sse("[DONE]")


def stream_events(ask: Ask, answers: list[Generation]) -> Iterator[str]:
    """Finished answers (static engine) as SSE chunks of about a word each."""
    chunk = _Chunks(ask, [a.route for a in answers])
    for index, answer in enumerate(answers):
        text, reason = _finish(ask, answer)
        if ask.chat:
            yield chunk(index, None, role=True)
        for piece in re.findall(r"\s*\S+", text):
            yield chunk(index, piece)
        yield chunk(index, None, reason)
    yield from chunk.end(answers)


async def token_events(ask: Ask, routes: list[Route], events: AsyncIterator[tuple[int, str, object]]) \
        -> AsyncIterator[str]:
    """Answers as they are decoded: `events` gives (index, 'text', piece), then (index, 'done', Generation or
    ApiError) for each prompt, and (0, 'idle', None) for a heartbeat (an SSE comment). A failure mid-stream
    ends it with an error event, as OpenAI's API does."""
    chunk = _Chunks(ask, routes)
    yield chunk(0, None, role=True) if ask.chat else chunk(0, "")
    answers = []
    async for index, kind, value in events:
        if kind == "text":
            yield chunk(index, value)
        elif kind == "idle":
            yield ": keep-alive\n\n"
        elif isinstance(value, ApiError):
            yield sse(value.body())
            return
        else:
            answers.append(value)
            yield chunk(index, None, _finish(ask, value)[1])
    for line in chunk.end(answers):
        yield line
