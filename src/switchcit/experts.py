"""Train one LoRA expert for one task on the frozen base model (PEFT), loss on answer tokens only."""

from __future__ import annotations

import math
import os
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


@dataclass
class ExpertConfig:
    """LoRA shape and training budget. Defaults suit a 2-core CPU and a model of ~100M parameters."""

    r: int = knob(8, "--rank", "LoRA rank", low=1)
    alpha: int | None = knob(None, "--lora-alpha", "LoRA alpha (default: 2 x rank)", low=0, open_low=True)
    dropout: float = knob(0.0, "--lora-dropout", "LoRA dropout", low=0, high=0.99)
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = knob(1e-3, "--lr", "learning rate", low=0, open_low=True)
    batch_size: int = knob(8, "--batch-size", "examples per training step", low=1)
    epochs: float = knob(1.0, "--epochs", "passes over the data (--max-steps bounds them)", low=0, open_low=True)
    max_steps: int | None = knob(None, "--max-steps", "bound on the training steps (default: none)", low=1)
    max_length: int = knob(512, "--max-length", "training tokens per example (longer rows keep their end)", low=8)
    warmup_ratio: float = knob(0.05, low=0, high=1)
    seed: int = knob(0, "--seed", "seed of the LoRA initialisation, the data order and the memory sample")

    def __post_init__(self) -> None:
        check_ranges(self)

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r

    def steps_for(self, n_examples: int) -> int:
        per_epoch = math.ceil(n_examples / self.batch_size)
        steps = max(1, math.ceil(per_epoch * self.epochs))
        return min(steps, self.max_steps) if self.max_steps else steps

    def lora(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")

    def to_dict(self) -> dict:
        return {**asdict(self), "alpha": self.lora_alpha}


def tokenize_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> tuple[list, list]:
    """(input_ids, labels) with the prompt masked out of the loss; long rows keep their answer end."""
    prompt = encode_prompt(tokenizer, example.prompt)
    answer = encode_answer(tokenizer, example.output or "")
    ids = (prompt + answer)[-max_length:]
    labels = ([-100] * len(prompt) + answer)[-max_length:]
    return ids, labels


def collate(rows: list[tuple[list, list]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch: every answer ends at the last position, so logits are needed only for a short tail."""
    ids, mask = left_pad([r for r, _ in rows], pad_id)
    labels, _ = left_pad([labels for _, labels in rows], pad_id, fill=-100)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def answer_loss(model, batch: dict[str, torch.Tensor], normalizer: int | None = None) -> torch.Tensor:
    """Cross-entropy summed over answer tokens / `normalizer` (default: their count, i.e. the mean).

    The LM head runs only over the answer tail (~20% less work on a small model). Data-parallel ranks pass
    the whole batch's token count, so their summed gradients equal one process's.
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    tail = int((labels != -100).sum(dim=1).max())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=tail + 1).logits[:, :-1]
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, -tail:].flatten(), ignore_index=-100,
                            reduction="sum")
    return total / (normalizer if normalizer is not None else int((labels != -100).sum()))


def data_parallel() -> tuple[int, int]:
    """(rank, world size). Under `accelerate launch` or torchrun this joins the process group (gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def batches(n_rows: int, batch_size: int, steps: int, seed: int):
    """Index lists for `steps` batches: seeded reshuffle each epoch, as many epochs as needed."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(n_rows))
            rng.shuffle(epoch)
            order.extend(epoch)
        yield order[:batch_size]
        del order[:batch_size]


def train_expert(
    model: PeftModel,
    adapter_name: str,
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    config: ExpertConfig,
    progress: bool = True,
    desc: str | None = None,
) -> dict:
    """Train `adapter_name` (already added to `model`) on `examples`; every other weight stays frozen."""
    model.set_adapter(adapter_name)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad = False
        if f".{adapter_name}." in name and "lora_" in name:
            params.append(param)
    return train_params(model, params, examples, tokenizer, config, progress, desc or f"learn {adapter_name}")


def train_params(model, params: list, examples: list[Example], tokenizer: PreTrainedTokenizerBase,
                 config: ExpertConfig, progress: bool, desc: str) -> dict:
    """The training loop shared by experts and full fine-tuning: only `params` learn, loss on answers only.

    With several processes each takes its share of every batch and gradients are summed, so the result
    matches a single process's with the same batch size.
    """
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    rank, world = data_parallel()
    if config.batch_size < world:
        raise SwitchcitError(f"batch_size {config.batch_size} is smaller than {world} processes: raise batch_size "
                             "(--batch-size)")
    rows = [tokenize_example(tokenizer, e, config.max_length) for e in examples]
    answer_tokens = [sum(label != -100 for label in labels) for _, labels in rows]
    steps = config.steps_for(len(rows))
    for param in params:
        param.requires_grad = True
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, int(steps * config.warmup_ratio))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    device = next(model.parameters()).device
    model.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress or rank > 0, unit="step")
    try:
        for indices in batches(len(rows), config.batch_size, steps, config.seed):
            mine = indices[rank::world]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in mine], tokenizer.pad_token_id).items()}
            loss = answer_loss(model, batch, normalizer=sum(answer_tokens[i] for i in indices))
            if not torch.isfinite(loss):
                raise SwitchcitError(f"the training loss became {loss.item()} at step {len(losses) + 1}: lower "
                                     "learning_rate (--lr) or check the data; nothing was written")
            loss.backward()
            if world > 1:  # one collective for all gradients, not one per tensor
                grads = [param.grad for param in params]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat)
                for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(part.view_as(g))
                loss = loss.detach()
                dist.all_reduce(loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    finally:
        bar.close()
        model.eval()
        for param in params:
            param.requires_grad = False
    return {"steps": steps, "final_loss": sum(losses[-10:]) / len(losses[-10:])}
