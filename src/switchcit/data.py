"""Task data: rows in the shapes practitioners write them, the prompt of an example, and chat formatting.

A row is Alpaca style {"instruction", "input"?, "output"}, chat style {"messages": [{"role", "content"}]},
ShareGPT style {"conversations": [{"from", "value"}]}, prompt/completion style {"prompt", "completion"}, or
any columns named with `columns` (`--columns instruction=question,output=answer`). The shape of a file is
detected from its first row, and every row must have it. The *prompt* is what the switch reads and what
the user asks: the instruction, then a blank line and the input when there is one; for chat rows, the
last user message (its answer is the next assistant message). The model sees the prompt wrapped in its
chat template when it has one. Files are read by `formats`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SwitchcitError
from .formats import Where, read_rows

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


SHARE_GPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant", "system": "system"}


@dataclass(frozen=True)
class ShapeKind:
    label: str
    columns: dict[str, str]  # role -> its column when --columns does not name it
    key: str  # the role whose column marks a row of this shape


SHAPES = {
    "alpaca": ShapeKind("Alpaca", {"instruction": "instruction", "input": "input", "output": "output"},
                        "instruction"),
    "prompt": ShapeKind("prompt/completion", {"prompt": "prompt", "output": "completion"}, "prompt"),
    "chat": ShapeKind("chat", {"messages": "messages"}, "messages"),
    "sharegpt": ShapeKind("ShareGPT", {"conversations": "conversations"}, "conversations"),
}
ROLE_SHAPE = {"instruction": "alpaca", "input": "alpaca", "prompt": "prompt", "messages": "chat",
              "conversations": "sharegpt"}
ROLES = (*ROLE_SHAPE, "output", "task")  # task: the held-out rows' task, for `switchcit eval`
ROLE_ALIASES = {"completion": "output"}
# Column names that usually hold each role, for the `--columns` an unknown shape's error suggests.
LIKELY = {"instruction": ("instruction", "question", "query", "prompt", "text", "problem", "source", "document",
                          "article", "input"),
          "output": ("output", "response", "answer", "completion", "target", "summary", "solution", "label"),
          "input": ("input", "context")}


def parse_columns(text: str | None) -> dict[str, str]:
    """`instruction=question,output=answer` -> {"instruction": "question", "output": "answer"}."""
    named: dict[str, str] = {}
    for part in (text or "").split(","):
        role, _, column = (x.strip() for x in part.partition("="))
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES or not column or role in named:
            raise SwitchcitError(f"--columns '{text}': give ROLE=COLUMN pairs, each role once, roles being "
                                 f"{', '.join(ROLES)} (e.g. --columns instruction=question,output=answer)")
        named[role] = column
    return named


@dataclass(frozen=True)
class Shape:
    """How the rows of one file hold an example: its kind and the column of each role."""

    kind: str
    columns: dict[str, str]

    @property
    def label(self) -> str:
        usual = SHAPES[self.kind].columns
        named = (column if column == usual[role] else f"{role}={column}" for role, column in self.columns.items())
        return f"{SHAPES[self.kind].label} rows ({', '.join(named)})"

    def parse(self, row: object, require_output: bool) -> Example:
        """One row -> Example; raises ValueError with a short reason."""
        if not isinstance(row, dict):
            raise ValueError("expected a JSON object")
        column = self.columns
        if self.kind == "alpaca" or self.kind == "prompt" and not isinstance(row.get(column["prompt"]), list):
            example = self._parse_fields(row, require_output)
        elif self.kind == "prompt":  # TRL's conversational prompt/completion: lists of messages
            answer = row.get(column["output"])
            example = _parse_chat(row[column["prompt"]] + (answer if isinstance(answer, list) else []),
                                  require_output, column["prompt"])
        elif self.kind == "chat":
            example = _parse_chat(row.get(column["messages"]), require_output, column["messages"])
        else:
            key = column["conversations"]
            example = _parse_chat(_share_gpt(row.get(key), key), require_output, key)
        for text in (example.prompt, example.output or ""):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("holds an unpaired UTF-16 surrogate escape (e.g. \\ud800), which is not "
                                 "text") from None
        return example

    def _parse_fields(self, row: dict, require_output: bool) -> Example:
        """Alpaca and prompt/completion rows: text columns."""
        column = self.columns
        asked = column.get("instruction") or column["prompt"]
        instruction, output = row.get(asked), row.get(column["output"])
        input_text = row.get(column["input"]) if "input" in column else None
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"missing or empty '{asked}'")
        if input_text is not None and not isinstance(input_text, str):
            raise ValueError(f"'{column['input']}' must be a string")
        if output is None and require_output:
            raise ValueError(f"missing '{column['output']}'")
        if output is not None and not isinstance(output, str):
            raise ValueError(f"'{column['output']}' must be a string")
        if require_output and not output.strip():
            raise ValueError(f"empty '{column['output']}'")
        return Example(make_prompt(instruction, input_text), output, instruction if input_text else None)


def _share_gpt(turns: object, column: str) -> list[dict]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"'{column}' must be a list of {{\"from\", \"value\"}} objects")
    return [{"role": SHARE_GPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
            if "from" in t else t for t in turns]


def _parse_chat(messages: object, require_output: bool, column: str = "messages") -> Example:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError(f"'{column}' must be a list of {{\"role\", \"content\"}} objects")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users or not messages[users[-1]]["content"].strip():
        raise ValueError(f"'{column}' has no non-empty user message")
    last = users[-1]
    answer = next((m["content"] for m in messages[last + 1:] if m["role"] == "assistant"), None)
    if require_output and (answer is None or not answer.strip()):
        raise ValueError("no non-empty assistant message after the last user message")
    return Example(messages[last]["content"], answer)


def _kinds(row: dict) -> list[str]:
    """The shapes a row has the key column of, under their usual column names."""
    return [kind for kind, s in SHAPES.items() if row.get(s.columns[s.key]) is not None]


def _found(row: dict) -> str:
    return f"columns found: {', '.join(map(str, row)) or 'none'}"


def _suggest(row: dict) -> str:
    """The --columns that most likely reads this row as instruction (+ input) -> output."""
    texts = [k for k, v in row.items() if isinstance(v, str)]
    picked: dict[str, str] = {}
    for role in ("instruction", "output", "input"):
        left = [k for k in texts if k not in picked.values()]
        column = next((k for name in LIKELY[role] for k in left if k.lower() == name), None)
        if column is None and role != "input" and left:
            column = left[0] if role == "instruction" else left[-1]
        if column:
            picked[role] = column
    if "instruction" not in picked or "output" not in picked:
        return "--columns instruction=COLUMN,output=COLUMN"
    return "--columns " + ",".join(f"{role}={picked[role]}" for role in ("instruction", "input", "output")
                                   if role in picked)


def detect_shape(row: object, named: dict[str, str], require_output: bool) -> Shape:
    """The shape of a file from its first row and the roles the user named; raises ValueError with the
    columns found and the --columns that would fix an unknown or ambiguous shape."""
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    chosen = {ROLE_SHAPE[role] for role in named if role in ROLE_SHAPE}
    if len(chosen) > 1:
        raise ValueError(f"--columns names roles of different shapes ({', '.join(sorted(chosen))}): name one shape's")
    kinds = sorted(chosen) or _kinds(row)
    if len(kinds) > 1:
        fixes = " or ".join(f"--columns {SHAPES[k].key}={SHAPES[k].columns[SHAPES[k].key]}" for k in kinds)
        raise ValueError(f"the row fits several shapes ({', '.join(SHAPES[k].label for k in kinds)}); {_found(row)}: "
                         f"pick one with {fixes}")
    if not kinds:
        raise ValueError(f"unknown row shape; {_found(row)}: name them, e.g. {_suggest(row)}")
    spec = SHAPES[kinds[0]]
    shape = Shape(kinds[0], {**spec.columns, **{r: c for r, c in named.items() if r in spec.columns}})
    needed = [spec.key, *(["output"] if require_output and "output" in spec.columns else [])]
    missing = [shape.columns[r] for r in needed if shape.columns[r] not in row]
    missing += [c for r, c in named.items() if r != "task" and c not in row and c not in missing]
    if missing:
        fix = "" if set(named) - {"task"} else f", e.g. {_suggest(row)}"
        raise ValueError(f"{spec.label} rows need the column(s) {', '.join(missing)}; {_found(row)}: name the columns "
                         f"with --columns{fix}")
    return shape


def _mixed(shape: Shape | None, row: object) -> str | None:
    """Why a row that fails to parse does: it has another shape than the file's first row."""
    if shape is None or not isinstance(row, dict) or row.get(shape.columns[SHAPES[shape.kind].key]) is not None:
        return None
    others = [k for k in _kinds(row) if k != shape.kind]
    return (f"mixed shapes: {SHAPES[others[0]].label} here, {shape.label} from the file's first row: give one "
            "shape per file") if others else None


def read_examples(source: str | Path, require_output: bool = True, columns: str | dict[str, str] | None = None,
                  progress: bool = False) -> Iterator[tuple[Where, dict, Example]]:
    """(where, row, example) for every row of a data source (see `formats.read_rows`), each file's shape detected
    from its first row and named on the progress line; errors name the file and row."""
    from tqdm.auto import tqdm

    named = parse_columns(columns) if isinstance(columns, str) else dict(columns or {})
    shape: Shape | None = None
    shape_of = None  # the file the shape was detected in: each file of a folder may have its own shape
    with tqdm(read_rows(source), desc=f"read {source}", unit=" rows", disable=not progress) as rows:
        for where, row in rows:
            try:
                if where.source != shape_of:
                    shape, shape_of = detect_shape(row, named, require_output), where.source
                    rows.set_description(f"read {where.source} as {shape.label}")
                example = shape.parse(row, require_output)
            except ValueError as exc:
                raise SwitchcitError(f"{where}: {_mixed(shape, row) or exc}") from None
            yield where, row, example
    if shape is None:
        raise SwitchcitError(f"{source}: no examples: a task needs at least one row")


def load_examples(source: str | Path, require_output: bool = True, columns: str | dict[str, str] | None = None,
                  progress: bool = False) -> list[Example]:
    """Read and validate a whole data source before anything is trained: any format of `formats`, any shape
    above; errors name the file and row (line, for JSONL)."""
    return [example for _, _, example in read_examples(source, require_output, columns, progress)]


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
