"""One LoRA expert for one task on the frozen base model (PEFT): its knobs, its training rows (prompt
masked out), their collation and the loss on answer tokens only. How it is trained (transformers'
`Trainer`, checkpoints, logs) is training.py's, which gets the rows, collation and loss from here:
the import runs from this module to that one, never back."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .data import Example, encode_answer, encode_prompt
from .errors import SwitchcitError
from .generation import left_pad
from .settings import check_ranges, knob

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedTokenizerBase


REPORTERS = ("none", "jsonl", "tensorboard", "wandb")


@dataclass
class ExpertConfig:
    """LoRA shape and training budget: the one place every training knob and its default is stated.
    Defaults suit a 2-core CPU and a model of ~100M parameters."""

    r: int = knob(8, "--rank", "LoRA rank", low=1)
    alpha: int | None = knob(None, "--lora-alpha", "LoRA alpha (default: 2 x rank)", low=0, open_low=True)
    dropout: float = knob(0.0, "--lora-dropout", "LoRA dropout", low=0, high=0.99)
    target_modules: str = knob("all-linear", "--target-modules", "modules that get LoRA: comma-separated names "
                               "(e.g. q_proj,v_proj) or all-linear")
    learning_rate: float = knob(1e-3, "--lr", "learning rate", low=0, open_low=True)
    batch_size: int = knob(8, "--batch-size", "examples per forward pass and process", low=1)
    grad_accum: int = knob(1, "--grad-accum", "forward passes per optimizer step (the step's batch: batch_size x "
                           "grad_accum x processes)", low=1)
    epochs: float = knob(1.0, "--epochs", "passes over the data (--max-steps bounds them)", low=0, open_low=True)
    max_steps: int | None = knob(None, "--max-steps", "bound on the optimizer steps (default: none)", low=1)
    max_length: int = knob(512, "--max-length", "training tokens per example (longer rows keep their end)", low=8)
    warmup_ratio: float = knob(0.05, low=0, high=1)
    gradient_checkpointing: bool = knob(False, "--gradient-checkpointing", "recompute activations in the backward "
                                        "pass: less memory, about a third more time")
    eval_fraction: float = knob(0.0, "--eval-fraction", "share of the data held out for the eval loss (or give "
                                "--eval-data)", low=0, high=0.5)
    eval_steps: int | None = knob(None, "--eval-steps", "steps between eval losses (default: once, at the end)",
                                  low=1)
    save_steps: int = knob(50, "--save-steps", "steps between checkpoints that --resume continues from", low=1)
    logging_steps: int = knob(10, "--logging-steps", "steps between logged losses", low=1)
    report_to: str = knob("none", "--report-to", "where training logs go", choices=REPORTERS)
    log_dir: str | None = knob(None, "--log-dir", "folder for jsonl and tensorboard logs (default: "
                               "STORE/logs/TASK)")
    seed: int = knob(0, "--seed", "seed of the LoRA initialisation, the data order and the memory sample",
                     low=0, high=2**32 - 1)  # numpy's range: the Trainer seeds numpy with it

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.target_modules.strip(" ,"):
            raise SwitchcitError("target_modules (--target-modules) is empty: name modules (e.g. q_proj,v_proj) or "
                                 "give all-linear")

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r

    def steps_for(self, n_examples: int, processes: int = 1) -> int:
        """Optimizer steps for `n_examples` rows; refuses accumulation that only re-reads the same rows."""
        step = self.batch_size * self.grad_accum * processes
        if self.grad_accum > 1 and step > n_examples:
            most = max(1, n_examples // (self.batch_size * processes))
            raise SwitchcitError(f"one optimizer step of batch_size x grad_accum x processes = {self.batch_size} x "
                                 f"{self.grad_accum} x {processes} = {step} rows is more than the {n_examples} "
                                 f"training rows: give --grad-accum {most} or less (or more data)")
        steps = max(1, math.ceil(math.ceil(n_examples / step) * self.epochs))
        return min(steps, self.max_steps) if self.max_steps else steps

    def lora(self) -> LoraConfig:
        from peft import LoraConfig

        names = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        modules = "all-linear" if names == ["all-linear"] else names
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.dropout, target_modules=modules,
                          task_type="CAUSAL_LM")

    def to_dict(self) -> dict:
        return {**asdict(self), "alpha": self.lora_alpha}


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


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded `fraction` of the rows held out, at least one row on each side."""
    order = list(range(len(examples)))
    random.Random(f"eval:{seed}").shuffle(order)
    held = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    if held < 1:
        raise SwitchcitError(f"{len(examples)} example(s) leave nothing to hold out for --eval-fraction: give more "
                             "data or --eval-data FILE")
    return [examples[i] for i in sorted(order[held:])], [examples[i] for i in sorted(order[:held])]


def train_expert(model: PeftModel, adapter_name: str, examples: list[Example], tokenizer: PreTrainedTokenizerBase,
                 config: ExpertConfig, progress: bool = True, desc: str | None = None,
                 eval_examples: list[Example] | None = None, **run) -> dict:
    """Train `adapter_name` (already added to `model`) on `examples`; every other weight stays frozen.
    `run`: checkpoints and logs (training.train). With a saved result, `adapter` is its PEFT folder."""
    from functools import partial

    from .training import train

    if eval_examples is None and config.eval_fraction:
        examples, eval_examples = split_eval(examples, config.eval_fraction, config.seed)
    rows = [tokenize_example(tokenizer, e, config.max_length) for e in examples]
    evals = [tokenize_example(tokenizer, e, config.max_length) for e in eval_examples or []]
    model.set_adapter(adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad = f".{adapter_name}." in name and "lora_" in name
    try:
        stats = train(model, rows, config, collate=partial(collate, pad_id=tokenizer.pad_token_id), loss=answer_loss,
                      eval_rows=evals, progress=progress, desc=desc or f"learn {adapter_name}", **run)
    finally:
        model.requires_grad_(False)
    if stats["saved"] is not None:  # PEFT saves an adapter not named 'default' in a folder of its name
        stats["adapter"] = stats["saved"] / adapter_name if adapter_name != "default" else stats["saved"]
    return stats
