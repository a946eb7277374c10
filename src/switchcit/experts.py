"""One LoRA expert for one task on the frozen base model (PEFT): its knobs, and training it with only its
own weights trainable. The training itself is training.py's (transformers' `Trainer`), on rows,
batches and a loss from supervision.py: experts -> training -> supervision, never back."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import SwitchcitError
from .settings import check_ranges, knob

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedTokenizerBase

    from .data import Example


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


def train_expert(model: PeftModel, adapter_name: str, examples: list[Example], tokenizer: PreTrainedTokenizerBase,
                 config: ExpertConfig, progress: bool = True, desc: str | None = None, **run) -> dict:
    """Train `adapter_name` (already added to `model`) on `examples`; every other weight stays frozen.
    `run`: eval data, checkpoints and logs (training.train). With a saved result, `adapter` is its PEFT folder."""
    from .training import train

    model.set_adapter(adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad = f".{adapter_name}." in name and "lora_" in name
    try:
        stats = train(model, examples, tokenizer, config, progress=progress, desc=desc or f"learn {adapter_name}",
                      **run)
    finally:
        model.requires_grad_(False)
    if stats["saved"] is not None:  # PEFT saves an adapter not named 'default' in a folder of its name
        stats["adapter"] = stats["saved"] / adapter_name if adapter_name != "default" else stats["saved"]
    return stats
