"""Left padding and the greedy loop: one place for the batch layout that training, the library, the server
and the benchmark share.

Rows are left-padded so every prompt ends at the same column: generation then appends new tokens to
every row at once, and training needs logits only for the answer tail at the right edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from .adapters import AdapterPool


OUTSIDE_REGIONS = "outside every learned task's region"  # why the fallback sent a request to the base model
NEARER_EVERYDAY = "nearer everyday requests than its nearest task"
NOTHING_LEARNED = "no task learned yet"
EMPTY_PROMPT = "empty prompt"


@dataclass(frozen=True)
class Route:
    """Where a request goes. When the switch sent it to the base model, `nearest` is the task it would have
    picked and `reason` says why it did not: a base answer is never silent about its cause."""

    task: str
    confidence: float | None
    nearest: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Generation:
    """One answer: the prompt, the task that answered it and how sure the switch was, and the exact counts
    an API reports (new tokens with the end token; prompt tokens as the model saw them, template included)."""

    prompt: str
    task: str
    confidence: float | None
    output: str
    tokens: int = 0
    stopped: bool = True  # ended by the end-of-sequence token (False: by the token limit)
    prompt_tokens: int = 0
    nearest: str | None = None  # as in Route: the switch's pick when it answered with the base model, and why
    reason: str | None = None

    @property
    def route(self) -> Route:
        return Route(self.task, self.confidence, self.nearest, self.reason)


class Decoded(NamedTuple):
    text: str
    tokens: int
    stopped: bool


def left_pad(rows: list[list[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of rows right-aligned in one tensor; `fill` pads ids (default `pad_id`)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def greedy(model, tokenizer: PreTrainedTokenizerBase, encoded: list[list[int]], max_new_tokens: int,
           min_new_tokens: int = 0, **generate_kwargs) -> list[Decoded]:
    """Greedy answers to one batch of encoded prompts."""
    import torch

    ids, mask = left_pad(encoded, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
    decoded = []
    for row in out[:, ids.shape[1]:].tolist():
        stopped = tokenizer.eos_token_id in row  # padding follows the end token of rows done early
        count = row.index(tokenizer.eos_token_id) + 1 if stopped else len(row)
        decoded.append(Decoded(tokenizer.decode(row[:count], skip_special_tokens=True).strip(), count, stopped))
    return decoded


def forced_routes(prompts: list[str], tasks: list[str], known: list[str]) -> list[Route]:
    """Routes that a caller chose: one known task per prompt."""
    from .errors import SwitchcitError

    if len(tasks) != len(prompts):
        raise SwitchcitError(f"{len(prompts)} prompts but {len(tasks)} tasks: give one task per prompt")
    unknown = sorted(set(tasks) - set(known))
    if unknown:
        raise SwitchcitError(f"unknown task(s) {unknown}: known are {known}")
    return [Route(t, None) for t in tasks]


def generate_routed(pool: AdapterPool, prompts: list[str], routes: list[Route], max_new_tokens: int,
                    batch_size: int, min_new_tokens: int = 0, progress: bool = True) -> list[Generation]:
    """Greedy answers, prompt i with routes[i]'s adapter; prompts of similar length share a batch, and one
    batch mixes adapters, its rows grouped by adapter."""
    from tqdm.auto import tqdm

    from .data import encode_prompt
    from .errors import SwitchcitError

    if max_new_tokens < 1 or batch_size < 1 or min_new_tokens < 0:
        raise SwitchcitError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1 and "
                             f"min_new_tokens ({min_new_tokens}) not negative")
    encoded = [encode_prompt(pool.tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[Generation] = [None] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", leave=False, disable=not progress or len(starts) < 2):
        rows = order[start:start + batch_size]
        rows = [rows[j] for j in pool.grouped([routes[i].task for i in rows])]
        with pool.rows([routes[i].task for i in rows]) as kwargs:
            done = greedy(pool.model, pool.tokenizer, [encoded[i] for i in rows], max_new_tokens, min_new_tokens,
                          **kwargs)
        for i, d in zip(rows, done):
            answers[i] = Generation(prompts[i], routes[i].task, routes[i].confidence, d.text, d.tokens, d.stopped,
                                    len(encoded[i]), routes[i].nearest, routes[i].reason)
    return answers
