"""What a training row teaches: its token ids with the prompt masked out of the loss, left-padded batches
of such rows, and the loss on answer tokens only. The Trainer (training.py) trains on them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .data import Example, encode_answer, encode_prompt
from .generation import left_pad

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def tokenize_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> dict[str, list]:
    """{input_ids, labels} with the prompt masked out of the loss; long rows keep their answer end. The first
    token is never a target (nothing precedes it), so the Trainer's count of targets equals the loss's."""
    prompt = encode_prompt(tokenizer, example.prompt)
    answer = encode_answer(tokenizer, example.output or "")
    ids = (prompt + answer)[-max_length:]
    labels = ([-100] * len(prompt) + answer)[-max_length:]
    return {"input_ids": ids, "labels": [-100, *labels[1:]]}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch of {input_ids, labels} rows: every answer ends at the last position, so logits are
    needed only for a short tail."""
    ids, mask = left_pad([r["input_ids"] for r in rows], pad_id)
    labels, _ = left_pad([r["labels"] for r in rows], pad_id, fill=-100)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def answer_loss(model, batch: dict[str, torch.Tensor], normalizer: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy summed over answer tokens / `normalizer` (default: their count, i.e. the mean).

    The LM head runs only over the answer tail (~20% less work on a small model). The Trainer passes the
    answer tokens of the whole accumulated batch, so accumulated micro-batches add up to one big batch.
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    tail = int((labels != -100).sum(dim=1).max())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=tail + 1).logits[:, :-1]
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, -tail:].flatten(), ignore_index=-100,
                            reduction="sum")
    return total / (normalizer if normalizer is not None else int((labels != -100).sum()))
