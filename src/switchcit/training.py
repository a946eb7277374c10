"""Expert training on transformers' `Trainer`: gradient accumulation, gradient checkpointing, mixed
precision, evaluation, logging, resumable checkpoints and every `accelerate` backend (DDP, FSDP,
DeepSpeed) come from it.

`Trainer` rather than TRL's `SFTTrainer`: switchcit tokenizes its own chat rows with the prompt masked
out of the loss (supervision.py: the rows, their batches and the loss on answer tokens only); what
`SFTTrainer` adds on top (dataset formatting, packing, chat templates) would be switched off, and it
would be one more fast-moving dependency. What is ours: switchcit's warm-up-then-linear schedule (no
step at a zero learning rate), a progress bar that shows the loss instead of printing it, a JSONL log,
and the run key that names a run's checkpoints (STORE/.checkpoints/TASK/KEY, KEY a hash of everything
that changes the result, so that `--resume` never continues a different run).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .errors import SwitchcitError
from .supervision import answer_loss, collate, tokenize_example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .data import Example
    from .experts import ExpertConfig  # for annotations only: experts.py imports this module, not the reverse

_COMPLETE = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it was cut short


class SeededOrder(Sampler):
    """The whole run's row order, `total` indices: a seeded reshuffle per pass over the data, passes back to
    back, so every batch is full and the order depends on the seed alone (not on the Trainer's sampler).
    Under several processes the Trainer hands consecutive batches to consecutive processes."""

    def __init__(self, rows: int, total: int, seed: int):
        self.rows, self.total, self.seed = rows, total, seed

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        rng, left = random.Random(self.seed), self.total
        while left > 0:
            order = list(range(self.rows))
            rng.shuffle(order)
            yield from order[:left]
            left -= len(order[:left])


class _AnswerTrainer(Trainer):
    """The Trainer with switchcit's loss, schedule and data order."""

    loss_is_scaled_for_ga = True  # the loss is divided by the answer tokens of the whole accumulated batch

    def __init__(self, *args, warmup_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup_steps = warmup_steps
        self.model_accepts_loss_kwargs = True  # so the Trainer counts the answer tokens of every batch

    def _get_train_sampler(self, train_dataset=None):
        a = self.args
        total = a.max_steps * a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        return SeededOrder(len(train_dataset or self.train_dataset), total, a.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        training = model.training
        loss = answer_loss(model, inputs, num_items_in_batch if training else None)
        if training and not torch.isfinite(loss):
            raise SwitchcitError(f"the training loss became {loss.item()} at step {self.state.global_step + 1}: "
                                 "lower learning_rate (--lr) or check the data; nothing was written")
        if training and num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # processes' gradients are averaged: make it their sum
        return (loss, {}) if return_outputs else loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Linear warm-up from 1/warmup of the rate (not from 0), then linear decay to 0."""
        import torch

        if self.lr_scheduler is None:
            warmup, steps = self.warmup_steps, num_training_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer,
                lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
        return self.lr_scheduler


class _Bar(ProgressCallback):
    """The Trainer's progress bar with a description, showing the latest loss instead of printing log lines."""

    def __init__(self, desc: str):
        super().__init__()
        self.desc = desc

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and "loss" in (logs or {}):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # evaluation is short: no second bar inside the first


class JsonlLogger(TrainerCallback):
    """`--report-to jsonl`: one JSON object per log event (step, epoch and the logged values), appended."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def data_parallel() -> tuple[int, int]:
    """(rank, world size) as `torchrun` and `accelerate launch` set them; the Trainer joins the process group.
    Read from the environment: making accelerate's state here would fix it before the Trainer picks its device."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_key(examples: list[Example], eval_examples: list[Example] | None, config: ExpertConfig, base,
            reference: str) -> str:
    """What a resumed run must share with the run it continues, all that changes its result: the data and
    held-out rows, the training settings, the base model (reference, weights' fingerprint, dtype,
    quantization, device type) and the number of processes."""
    from .models import fingerprint

    bookkeeping = {"save_steps", "logging_steps", "report_to", "log_dir", "eval_steps"}
    settings = {k: v for k, v in config.to_dict().items() if k not in bookkeeping}
    model = {"reference": reference, "fingerprint": fingerprint(base), "dtype": str(base.dtype),
             "4bit": bool(getattr(base, "is_loaded_in_4bit", False)), "device": base.device.type}
    digest = hashlib.sha256(json.dumps([settings, model, data_parallel()[1]], sort_keys=True).encode())
    for held, rows in enumerate((examples, eval_examples or [])):
        for e in rows:
            digest.update(json.dumps([held, e.prompt, e.output]).encode())
    return digest.hexdigest()[:16]


def complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished writing this checkpoint: its last file exists and parses (a run killed while
    writing it leaves the file cut short, and resuming from it would fail)."""
    try:
        json.loads((checkpoint / _COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint of a run and its step, if any."""
    steps = {p: p.name.removeprefix("checkpoint-") for p in run_dir.glob("checkpoint-*") if complete(p)}
    return max(((p, int(s)) for p, s in steps.items() if s.isdigit()), key=lambda found: found[1], default=None)


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded `fraction` of the rows held out, at least one row on each side."""
    order = list(range(len(examples)))
    random.Random(f"eval:{seed}").shuffle(order)
    held = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    if held < 1:
        raise SwitchcitError(f"{len(examples)} example(s) leave nothing to hold out for --eval-fraction: give more "
                             "data or --eval-data FILE")
    return [examples[i] for i in sorted(order[held:])], [examples[i] for i in sorted(order[:held])]


def _reporters(config: ExpertConfig, log_dir: Path | None) -> list[TrainerCallback]:
    """Our callbacks for --report-to (wandb is the Trainer's own); a missing package is one line, before training."""
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(config.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise SwitchcitError(f"--report-to {config.report_to} needs the {package} package: pip install {package}")
    if config.report_to in ("jsonl", "tensorboard") and log_dir is None:
        raise SwitchcitError(f"--report-to {config.report_to} needs a log folder: give --log-dir DIR")
    if config.report_to == "jsonl":
        return [JsonlLogger(log_dir / "log.jsonl")]
    if config.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(SummaryWriter(log_dir=str(log_dir)))]
    return []


def train(model, examples: list[Example], tokenizer: PreTrainedTokenizerBase, config: ExpertConfig, *,
          run_dir: Path, save: bool = True, eval_examples: list[Example] | None = None, resume: bool = False,
          log_dir: Path | None = None, progress: bool = True, desc: str = "learn") -> dict:
    """Train the parameters of `model` that require grad on `examples`; loss on answer tokens only.

    `run_dir`: the trainer's folder; with `save`, checkpoints go there and, at the end, the trained weights
    (`saved` in the result). `resume` continues from its newest checkpoint; without it, the first process
    clears what an older run left there. Returns the optimizer steps, the final training loss and, with
    eval data, the last eval loss."""
    import torch
    from transformers import TrainingArguments

    rank, processes = data_parallel()
    if eval_examples is None and config.eval_fraction:
        examples, eval_examples = split_eval(examples, config.eval_fraction, config.seed)
    if config.eval_steps and not eval_examples:
        raise SwitchcitError("--eval-steps needs held-out rows: give --eval-data FILE or --eval-fraction F")
    steps = config.steps_for(len(examples), processes)
    start = None
    if resume:
        start = last_checkpoint(run_dir) if run_dir.is_dir() else None
        if start is None:
            raise SwitchcitError("--resume: no checkpoint of this task for this data and configuration (data, "
                                 "held-out rows, training settings, base model and its dtype, processes): run "
                                 "without --resume, or with the settings of the run to continue")
        if rank == 0:
            print(f"switchcit: {desc}: resuming from step {start[1]}", file=sys.stderr)
    callbacks = _reporters(config, log_dir)
    if not resume and rank == 0 and run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh start: never resume later from this run's older checkpoints
    pad = tokenizer.pad_token_id
    rows = [tokenize_example(tokenizer, e, config.max_length) for e in examples]
    evals = [tokenize_example(tokenizer, e, config.max_length) for e in eval_examples or []]
    device = next(model.parameters()).device
    periodic_eval = bool(evals and config.eval_steps)
    args = TrainingArguments(
        output_dir=str(run_dir), max_steps=steps, seed=config.seed,
        data_seed=config.seed, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate, weight_decay=0.0, max_grad_norm=1.0,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        bf16=device.type == "cuda" and model.dtype == torch.bfloat16, use_cpu=device.type == "cpu",
        logging_steps=min(config.logging_steps, steps), save_strategy="steps" if save else "no",
        save_steps=config.save_steps, save_total_limit=1, eval_strategy="steps" if periodic_eval else "no",
        eval_steps=config.eval_steps if periodic_eval else None, prediction_loss_only=True,
        report_to=["wandb"] if config.report_to == "wandb" else "none", disable_tqdm=not progress,
        remove_unused_columns=False, label_names=["labels"], dataloader_pin_memory=False,
        ddp_find_unused_parameters=False, average_tokens_across_devices=True)
    trainer = _AnswerTrainer(model=model, args=args, train_dataset=rows, eval_dataset=evals or None,
                             data_collator=lambda batch: collate(batch, pad), callbacks=callbacks,
                             warmup_steps=max(1, int(steps * config.warmup_ratio)))
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_Bar(desc))
    try:
        trainer.train(resume_from_checkpoint=str(start[0]) if start else None)
        eval_loss = trainer.evaluate()["eval_loss"] if evals else None
        if save:  # every process takes part: FSDP and ZeRO-3 gather the sharded weights here
            trainer.save_model(str(run_dir / "trained"))  # PEFT: a folder per adapter not named 'default'
    finally:
        model.eval()
        if config.gradient_checkpointing:
            model.activation_checkpointing_disable()
        for callback in trainer.callback_handler.callbacks:
            getattr(getattr(callback, "tb_writer", None), "close", lambda: None)()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"steps": trainer.state.global_step, "final_loss": losses[-1] if losses else float("nan"),
            "eval_loss": eval_loss, "saved": run_dir / "trained" if save else None}
