"""The compared methods. Each has `learn(task)` and `generate(prompts)`, on the same base model and budget.

Every method keeps what it needs to resume under its own folder: SwitchCIT its store, the others a
checkpoint of their weights after each learned task. Generations go through the shared cache, keyed
by the weights that produced them.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..continual import BASE, ContinualModel
from ..data import Example, Task, encode_prompt
from ..errors import SwitchcitError
from ..experts import ExpertConfig, train_expert
from ..generation import greedy
from ..memory import MemoryConfig
from ..models import load_base_model
from .cache import GenerationCache, Request
from .files import write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

METHODS = ("switchcit", "oracle", "seqlora", "replay_0.01", "replay_1", "multitask", "seqft", "zeroshot")
REPLAY_FRACTIONS = {"replay_0.01": 0.0001, "replay_1": 0.01}  # the names say percent, as in the paper


@dataclass
class Setup:
    """What every method shares: base model, training budget, generation settings, the run folder."""

    out: Path
    model: str
    expert: ExpertConfig
    cache: GenerationCache
    max_new_tokens: int
    device: str | None = None
    progress: bool = True
    labels: dict[str, str] = field(default_factory=dict)  # prompt -> true task, for the oracle
    full_learning_rate: float | None = None  # seqft's rate; None: the experts' rate


def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   max_new_tokens: int) -> list[str]:
    """Greedy answers to one batch, prompts in the chat format used for training."""
    return [c.text for c in greedy(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens)]


# -- SwitchCIT and the oracle -------------------------------------------------------------------------

class SwitchCIT:
    """The library's ContinualModel: one expert per task, the switch picks one per prompt."""

    routes_itself = True  # the protocol records its switch's confusion

    def __init__(self, setup: Setup):
        self.setup = setup
        self.cm = ContinualModel(setup.out / "switchcit" / "store", base_model=setup.model, device=setup.device,
                                 expert_config=setup.expert, memory_config=MemoryConfig(seed=setup.expert.seed),
                                 progress=setup.progress)
        self.learned: list[str] = []

    def learn(self, task: Task) -> None:
        self.learned.append(task.name)
        if task.name not in self.cm.task_names:  # else learned before a rerun
            self.cm.learn(task)

    def route(self, prompts: list[str]) -> list[str]:
        if self.cm.task_names != self.learned:
            raise SwitchcitError(f"the SwitchCIT store in {self.cm.store.root} holds {self.cm.task_names}, not the "
                                 f"stream so far {self.learned} (the oracle ran first?): use a new --out")
        return [r.task for r in self.cm.route(prompts)]

    def generate(self, prompts: list[str]) -> list[str]:
        return self.generate_routed(prompts, self.route(prompts))

    def generate_routed(self, prompts: list[str], tasks: list[str]) -> list[str]:
        """Each prompt with its task's expert; prompts routed to no task get the base model, as zero-shot does."""
        def run(batch: list[Request]) -> list[str]:
            answers = self.cm.generate([p for _, p in batch], [k.removeprefix("adapter:") for k, _ in batch],
                                       self.setup.max_new_tokens, batch_size=len(batch))
            return [a.output for a in answers]

        keys = [BASE if t == BASE else f"adapter:{t}" for t in tasks]
        return self.setup.cache.generate(list(zip(keys, prompts)), run, desc="generate switchcit")


class Oracle(SwitchCIT):
    """SwitchCIT's experts, each prompt given its true task's expert: the ceiling for any switch."""

    routes_itself = False

    def learn(self, task: Task) -> None:
        if task.name not in self.cm.task_names:  # only when SwitchCIT itself was not run
            self.cm.learn(task)

    def generate(self, prompts: list[str]) -> list[str]:
        return self.generate_routed(prompts, [self.setup.labels[p] for p in prompts])


# -- methods with one set of weights -------------------------------------------------------------------

class SingleModel:
    """One model for all tasks. After each learned task its weights are checkpointed, so a rerun resumes."""

    name: str

    def __init__(self, setup: Setup, name: str | None = None):
        self.setup = setup
        self.name = name or self.name
        self.folder = setup.out / self.name
        self.seen: list[Task] = []
        marker = self.folder / "checkpoint.json"
        self.checkpointed = json.loads(marker.read_text())["stage"] if marker.exists() else 0
        self.model, self.tokenizer = load_base_model(setup.model, setup.device)
        if self.checkpointed:
            self.restore(self.folder / f"checkpoint-{self.checkpointed}")

    @property
    def key(self) -> str:
        return f"{self.name}@{len(self.seen)}"

    @property
    def trainer_folder(self) -> dict:
        """The Trainer's working folder, inside the method's own; the method checkpoints by itself."""
        return {"run_dir": self.folder / "trainer", "save": False}

    def learn(self, task: Task) -> None:
        self.seen.append(task)
        if len(self.seen) <= self.checkpointed:  # restored weights already include this task
            return
        self.train(task)
        stage = len(self.seen)
        self.save(self.folder / f"checkpoint-{stage}")  # a folder half written by a kill is rewritten here
        write_json(self.folder / "checkpoint.json", {"stage": stage})
        shutil.rmtree(self.folder / f"checkpoint-{stage - 1}", ignore_errors=True)
        self.checkpointed = stage

    def generate(self, prompts: list[str]) -> list[str]:
        def run(batch: list[Request]) -> list[str]:
            return generate_batch(self.model, self.tokenizer, [p for _, p in batch], self.setup.max_new_tokens)

        return self.setup.cache.generate([(self.key, p) for p in prompts], run, desc=f"generate {self.name}")

    def train(self, task: Task) -> None:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def restore(self, folder: Path) -> None:
        raise NotImplementedError


class ZeroShot(SingleModel):
    """The base model as it is; its answers never change, so they are generated once."""

    name = "zeroshot"
    key = BASE

    def learn(self, task: Task) -> None:
        pass


class SequentialFull(SingleModel):
    """Full fine-tuning of every weight, task after task."""

    name = "seqft"

    def train(self, task: Task) -> None:
        from ..training import train

        expert = self.setup.expert
        config = replace(expert, learning_rate=self.setup.full_learning_rate or expert.learning_rate)
        # every weight trains, on the experts' Trainer (batching, schedule, clipping): only what is trained differs
        self.model.requires_grad_(True)
        train(self.model, task.examples, self.tokenizer, config, progress=self.setup.progress,
              desc=f"{self.name} {task.name}", **self.trainer_folder)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def restore(self, folder: Path) -> None:
        self.model, self.tokenizer = load_base_model(str(folder), self.setup.device)


class SequentialLoRA(SingleModel):
    """One LoRA adapter trained on and on; with `replay_fraction`, each task's data gets a share of every
    earlier task's data mixed in (at least one example each), in the same number of steps."""

    name = "seqlora"

    def __init__(self, setup: Setup, name: str | None = None, replay_fraction: float = 0.0):
        self.replay_fraction = replay_fraction
        super().__init__(setup, name)
        if not self.checkpointed:
            self.model = fresh_lora(self.model, setup.expert)

    def training_examples(self, task: Task) -> list[Example]:
        if not self.replay_fraction:
            return task.examples
        rng = random.Random(f"{self.setup.expert.seed}:{self.name}:{task.name}")
        replayed = [e for t in self.seen[:-1]
                    for e in rng.sample(t.examples, max(1, math.ceil(self.replay_fraction * len(t.examples))))]
        return task.examples + replayed

    def train(self, task: Task) -> None:
        train_expert(self.model, "default", self.training_examples(task), self.tokenizer, self.setup.expert,
                     self.setup.progress, f"{self.name} {task.name}", **self.trainer_folder)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)

    def restore(self, folder: Path) -> None:
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(self.model, str(folder), is_trainable=True)


class MultiTask(SequentialLoRA):
    """A fresh LoRA adapter per stage, trained jointly on every task seen so far with the steps all
    sequential methods have spent by then: the usual upper reference."""

    name = "multitask"

    def training_examples(self, task: Task) -> list[Example]:
        return [e for t in self.seen for e in t.examples]

    def train(self, task: Task) -> None:
        self.model = fresh_lora(self.model.unload(), self.setup.expert)
        expert = self.setup.expert
        budget = replace(expert, max_steps=expert.max_steps * len(self.seen), epochs=expert.epochs * len(self.seen))
        train_expert(self.model, "default", self.training_examples(task), self.tokenizer, budget,
                     self.setup.progress, f"{self.name} {len(self.seen)} tasks", **self.trainer_folder)


def fresh_lora(model: PreTrainedModel, config: ExpertConfig):
    """A new adapter named 'default', initialised alike for every method (seeded)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    return get_peft_model(model, config.lora())


def build(name: str, setup: Setup):
    """A method by its id (see METHODS)."""
    if name in REPLAY_FRACTIONS:
        return SequentialLoRA(setup, name, REPLAY_FRACTIONS[name])
    classes = {"switchcit": SwitchCIT, "oracle": Oracle, "seqlora": SequentialLoRA, "multitask": MultiTask,
               "seqft": SequentialFull, "zeroshot": ZeroShot}
    if name not in classes:
        raise SwitchcitError(f"unknown method '{name}': choose from {', '.join(METHODS)}")
    return classes[name](setup)
