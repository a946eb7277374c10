"""Task data: JSONL loading and validation, the prompt of an example, and chat formatting.

A row is Alpaca style {"instruction", "input"?, "output"} or chat style {"messages": [...]}.
The *prompt* is what the switch reads and what the user asks: the instruction, then a blank line and
the input when there is one; for chat rows, the last user message (its answer is the next assistant
message). The model sees the prompt wrapped in its chat template when it has one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SwitchcitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
RESERVED_NAMES = frozenset({"base", "switchcit"})


@dataclass(frozen=True)
class Example:
    prompt: str
    output: str | None = None
    # The instruction the prompt was worded with, where the row says (Alpaca rows with an input): the
    # switch calibrates its unknown-request fallback on wordings held out, not only on rows held out.
    wording: str | None = field(default=None, compare=False)


@dataclass
class Task:
    """A named list of examples, learned as one unit."""

    name: str
    examples: list[Example] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_task_name(self.name)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    def check_outputs(self) -> None:
        """Learning needs every example to have an answer."""
        missing = [i for i, e in enumerate(self.examples, 1) if not e.output]
        if not self.examples or missing:
            raise SwitchcitError(f"task '{self.name}' needs examples with outputs (missing at rows {missing[:5]})")

    @property
    def wordings(self) -> list[str | None]:
        return [e.wording for e in self.examples]

    @classmethod
    def from_jsonl(cls, name: str, path: str | Path) -> Task:
        return cls(name, load_examples(path, require_output=True))


def check_task_name(name: str) -> str:
    if name in RESERVED_NAMES:
        raise SwitchcitError(f"task name '{name}' is reserved: choose another name")
    if not TASK_NAME.fullmatch(name):
        raise SwitchcitError(
            f"invalid task name '{name}': use 1-64 characters, lower-case letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def make_prompt(instruction: str, input_text: str | None = None) -> str:
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def parse_row(row: object, require_output: bool) -> Example:
    """One JSON value -> Example; raises ValueError with a short reason."""
    example = _parse_row(row, require_output)
    for text in (example.prompt, example.output or ""):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds an unpaired UTF-16 surrogate escape (e.g. \\ud800), which is not text") from None
    return example


def _parse_row(row: object, require_output: bool) -> Example:
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    if "messages" in row:
        return _parse_chat(row["messages"], require_output)
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("missing or empty 'instruction' (or give 'messages')")
    input_text = row.get("input")
    if input_text is not None and not isinstance(input_text, str):
        raise ValueError("'input' must be a string")
    output = row.get("output")
    if output is None and require_output:
        raise ValueError("missing 'output'")
    if output is not None and not isinstance(output, str):
        raise ValueError("'output' must be a string")
    if require_output and not output.strip():
        raise ValueError("empty 'output'")
    return Example(make_prompt(instruction, input_text), output, instruction if input_text else None)


def _parse_chat(messages: object, require_output: bool) -> Example:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError("'messages' must be a list of {\"role\", \"content\"} objects")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users or not messages[users[-1]]["content"].strip():
        raise ValueError("'messages' has no non-empty user message")
    last = users[-1]
    answer = next((m["content"] for m in messages[last + 1:] if m["role"] == "assistant"), None)
    if require_output and (answer is None or not answer.strip()):
        raise ValueError("no non-empty assistant message after the last user message")
    return Example(messages[last]["content"], answer)


def load_examples(path: str | Path, require_output: bool = True) -> list[Example]:
    """Read and validate a whole JSONL file before anything is trained; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise SwitchcitError(f"data file not found: {path}")
    examples = []
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines: U+2028 may stand inside a string
    except UnicodeDecodeError as exc:
        raise SwitchcitError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded): save it as UTF-8 "
                             "JSONL") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            examples.append(parse_row(json.loads(line), require_output))
        except json.JSONDecodeError as exc:
            raise SwitchcitError(f"{path}:{number}: malformed JSON ({exc.msg}): fix or remove the line") from None
        except RecursionError:
            raise SwitchcitError(f"{path}:{number}: JSON nested too deeply: give flat rows") from None
        except ValueError as exc:
            raise SwitchcitError(f"{path}:{number}: {exc}") from None
    if not examples:
        raise SwitchcitError(f"{path}: no examples: a task needs at least one JSONL row")
    return examples


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the model continues: the chat template with a generation prompt, or the bare prompt."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of the model input for a prompt; training and generation share this."""
    return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=not tokenizer.chat_template)["input_ids"]


def encode_answer(tokenizer: PreTrainedTokenizerBase, output: str) -> list[int]:
    return tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
