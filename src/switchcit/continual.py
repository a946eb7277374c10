"""ContinualModel: learn tasks one after another, route each prompt to its task, generate with its adapter."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .data import Task, encode_prompt
from .encoders import DEFAULT_ENCODER, load_encoder
from .errors import SwitchcitError
from .experts import ExpertConfig, data_parallel, train_expert
from .gaussian import GaussianSwitch
from .memory import MemoryConfig, TaskMemory, build_switch, load_switch, remember
from .mixed import MixedLoRA
from .models import DEFAULT_MODEL, fingerprint, load_base_model, resolve_device, same_model
from .store import Store, now
from .switch import Switch, SwitchConfig

if TYPE_CHECKING:
    import torch

BASE = "base"
_PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches
_TRAINING = "_training"


@dataclass(frozen=True)
class Route:
    task: str
    confidence: float | None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # new tokens generated, the end-of-sequence token included
    stopped: bool  # ended by the end-of-sequence token (False: by the token limit)
    prompt_tokens: int  # the prompt as the model saw it, chat template included


@dataclass(frozen=True)
class Generation:
    prompt: str
    task: str
    confidence: float | None
    output: str


class ContinualModel:
    """A base model, one LoRA adapter per learned task, and a switch that picks the adapter per prompt.

    Opening a store loads nothing heavy: the base model, encoder, switch and adapters load on first use,
    each once.
    """

    def __init__(self, store: str | Path, base_model: str | None = None, encoder: str | None = None,
                 device: str | None = None, dtype: str | None = None,
                 expert_config: ExpertConfig | None = None, memory_config: MemoryConfig | None = None,
                 switch_config: SwitchConfig | None = None, progress: bool = True, fallback: bool = True):
        self.store = Store(store)
        self.manifest = self.store.read() if self.store.exists() else None
        stored_base = self.manifest["base_model"]["reference"] if self.manifest else None
        stored_encoder = self.manifest["encoder"]["reference"] if self.manifest else None
        if encoder and stored_encoder and encoder != stored_encoder:
            raise SwitchcitError(f"store {self.store.root} routes with encoder '{stored_encoder}', not '{encoder}': "
                                 "drop --encoder or use a new store")
        self.base_reference = _absolute_if_local(base_model or stored_base or DEFAULT_MODEL)
        self.encoder_reference = stored_encoder or encoder or DEFAULT_ENCODER
        self.device = resolve_device(device)
        self.dtype = dtype
        self.expert_config = expert_config or ExpertConfig()
        self.memory_config = memory_config or MemoryConfig()
        self.switch_config = switch_config or SwitchConfig()
        stored_router = self.manifest.get("router", "mlp") if self.manifest else None  # before it: the MLP
        if switch_config and stored_router and switch_config.router != stored_router:
            raise SwitchcitError(f"store {self.store.root} routes with router '{stored_router}', not "
                                 f"'{switch_config.router}': keep its router or learn the tasks into a new store")
        if stored_router:
            self.switch_config = dataclasses.replace(self.switch_config, router=stored_router)
        self.progress = progress
        self.fallback = fallback
        self.fast_mixed = True  # batched multi-adapter LoRA (mixed.py); False: PEFT's adapter_names path
        self._mixed: MixedLoRA | None = None
        self._mixed_key: tuple = ()
        self._model = self._tokenizer = self._peft = self._encoder = None
        self._switch: Switch | GaussianSwitch | None = None
        self._switch_path: str | None = None
        self._loaded: dict[str, str] = {}  # task -> adapter path loaded in memory

    # -- lazy components -------------------------------------------------------------------------

    @property
    def tasks(self) -> list[dict]:
        """Learned tasks in learning order, as recorded in the manifest."""
        return list(self.manifest["tasks"]) if self.manifest else []

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    @property
    def model(self):
        """The generating model: the PEFT wrapper once adapters exist, else the base model."""
        self._load_base()
        return self._peft if self._peft is not None else self._model

    @property
    def tokenizer(self):
        self._load_base()
        return self._tokenizer

    def _load_base(self) -> None:
        if self._model is not None:
            return
        self._model, self._tokenizer = load_base_model(self.base_reference, self.device, self.dtype)
        if self.manifest and not same_model(self.manifest["base_model"]["fingerprint"], fingerprint(self._model)):
            raise SwitchcitError(
                f"store {self.store.root} was built on base model '{self.manifest['base_model']['reference']}', "
                f"and '{self.base_reference}' is a different model: use that base model or a new store")

    @property
    def encoder(self):
        if self._encoder is None:
            if self.encoder_reference == "base":
                self._load_base()
            self._encoder = load_encoder(self.encoder_reference, self.model if self._model else None,
                                         self._tokenizer, device=self.device)
        return self._encoder

    def _wrap(self, peft_model) -> None:
        """Adapters are injected into the base model in place; a base-model encoder must see the wrapper."""
        self._peft = peft_model
        if self._encoder is not None and self.encoder_reference == "base":
            self._encoder.model = peft_model if peft_model is not None else self._model

    def _load_adapter(self, task: str, relative: str) -> None:
        from peft import PeftModel

        path = str(self.store.path(relative))
        if task in self._loaded:
            self._remove_adapter(task)
        if self._peft is None:
            self._load_base()
            self._wrap(PeftModel.from_pretrained(self._model, path, adapter_name=task))
        else:
            self._peft.load_adapter(path, adapter_name=task)
        self._peft.eval()
        self._loaded[task] = relative

    def refresh(self) -> None:
        """Bring loaded adapters and switch in line with the store's current manifest (live updates)."""
        if not self.store.exists():
            return
        self.manifest = self.store.read()
        self._sync_loaded()

    def _sync_loaded(self) -> None:
        wanted = {t["name"]: t["adapter"] for t in self.tasks}
        for task in [t for t in self._loaded if t not in wanted]:
            self._remove_adapter(task)
        if self._model is not None and (self._loaded or self._peft is not None):
            for task, relative in wanted.items():
                if self._loaded.get(task) != relative:
                    self._load_adapter(task, relative)
        if self._switch_path != self.manifest["switch"]:
            self._switch, self._switch_path = None, None

    def load_adapters(self) -> None:
        """Load every learned task's adapter once (generation needs them all)."""
        for task in self.tasks:
            if self._loaded.get(task["name"]) != task["adapter"]:
                self._load_adapter(task["name"], task["adapter"])

    @property
    def switch(self) -> Switch | GaussianSwitch | None:
        if self._switch is None and self.manifest and self.manifest["switch"]:
            self._switch = load_switch(self.store.path(self.manifest["switch"]))
            self._switch_path = self.manifest["switch"]
        return self._switch

    # -- learning --------------------------------------------------------------------------------

    def learn(self, task: Task, replace: bool = False, expert_config: ExpertConfig | None = None) -> dict:
        """Train `task`'s adapter, then retrain the switch on its features plus the retained memory.

        Nothing in the store changes until the final atomic commit; an interrupted call leaves it as it was.
        """
        import torch
        from peft import get_peft_model

        config = expert_config or self.expert_config
        missing = [i for i, e in enumerate(task.examples, 1) if not e.output]
        if not task.examples or missing:
            raise SwitchcitError(f"task '{task.name}' needs examples with outputs (missing at rows {missing[:5]})")
        self._check_new_name(task.name, replace)
        self._load_base()
        rank, _ = data_parallel()
        features = self.encoder.encode(task.prompts) if rank == 0 else None
        torch.manual_seed(config.seed)  # LoRA A matrices are initialised at random: same seed, same adapter
        if self._peft is None:
            self._wrap(get_peft_model(self._model, config.lora(), adapter_name=_TRAINING))
        else:
            self._peft.add_adapter(_TRAINING, config.lora())
        try:
            stats = train_expert(self._peft, _TRAINING, task.examples, self.tokenizer, config,
                                 progress=self.progress, desc=f"learn {task.name}")
            if rank > 0:  # data-parallel helpers train; only the first process writes the store
                return {"name": task.name, "rank": rank, **stats}
            with self.store.lock():
                self.manifest = self.store.read() if self.store.exists() else self._new_manifest(features.shape[1])
                self._check_new_name(task.name, replace)
                adapter = self._save_training_adapter(task.name)
                memory = self._save_memory(task, features)
                entry = {"name": task.name, "adapter": adapter, "memory": memory, "examples": len(task.examples),
                         "memory_size": self.memory_config.size_for(len(features)), "steps": stats["steps"],
                         "final_loss": round(stats["final_loss"], 4), "lora": config.to_dict(),
                         "learned_at": now()}
                others = [t for t in self.tasks if t["name"] != task.name]
                switch, switch_path = self._commit([*others, entry], {task.name: features})
            self._load_adapter(task.name, adapter)
        finally:
            if _TRAINING in self._peft.peft_config:
                self._remove_adapter(_TRAINING)
        self._sync_loaded()
        self._switch, self._switch_path = switch, switch_path
        return entry

    def _remove_adapter(self, name: str) -> None:
        """Delete one adapter from memory; the last one going returns the bare base model."""
        self._loaded.pop(name, None)
        self._mixed, self._mixed_key = None, ()  # its stacked weights include this adapter's
        if len(self._peft.peft_config) == 1:
            self._model = self._peft.unload()
            self._wrap(None)
            return
        with warnings.catch_warnings():  # PEFT warns when the active adapter goes; another is set below
            warnings.simplefilter("ignore")
            self._peft.delete_adapter(name)
        self._activate(next(iter(self._peft.peft_config)))

    def _activate(self, name: str) -> None:
        """Make one adapter the active one, for inference (PEFT's set_adapter makes it trainable)."""
        self._peft.set_adapter(name)
        self._peft.requires_grad_(False)

    def _check_new_name(self, name: str, replace: bool) -> None:
        if name in self.task_names and not replace:
            raise SwitchcitError(f"task '{name}' is already in store {self.store.root}: pass --replace to retrain "
                                 "it or choose another name")

    def _new_manifest(self, dim: int) -> dict:
        return {"format": 1, "base_model": {"reference": self.base_reference, "fingerprint": fingerprint(self._model)},
                "encoder": {"reference": self.encoder_reference, "dim": dim},
                "memory": {"fraction": self.memory_config.fraction, "min_per_task": self.memory_config.min_per_task},
                "router": self.switch_config.router, "tasks": [], "switch": None, "generation": 0}

    def _save_training_adapter(self, task: str) -> str:
        """Write the just-trained adapter as a plain PEFT folder at a fresh store path."""
        adapter = self.store.fresh("adapters", task)
        staging = self.store.path(adapter) / "_staging"
        self._peft.save_pretrained(str(staging), selected_adapters=[_TRAINING])
        for item in (staging / _TRAINING).iterdir():
            item.rename(self.store.path(adapter) / item.name)
        _rmtree(staging)
        return adapter

    def _memory(self, task: dict) -> TaskMemory:
        return TaskMemory.load(self.store.path(task["memory"]))

    def _save_memory(self, task: Task, features: torch.Tensor) -> str:
        """What the store keeps of the task (memory.py): features and statistics, never its text."""
        memory = self.store.fresh("memory", task.name, ".safetensors")
        remember(features, self.memory_config, self.switch_config, task.wordings).save(self.store.path(memory))
        return memory

    def _commit(self, tasks: list[dict], full_features: dict[str, torch.Tensor]
                ) -> tuple[Switch | GaussianSwitch | None, str | None]:
        """Rebuild the switch for `tasks` from their memory (all features where given); commit the manifest."""
        generation = self.manifest.get("generation", 0) + 1
        switch, path = None, None
        if tasks:
            switch = build_switch({t["name"]: self._memory(t) for t in tasks}, self.switch_config, full_features)
            path = self.store.fresh("switch", f"v{generation}")
            switch.save(self.store.path(path))
        manifest = dict(self.manifest, tasks=tasks, switch=path, generation=generation)
        self.store.commit(manifest)
        self.manifest = manifest
        return switch, path

    def forget(self, name: str) -> None:
        """Remove a task: its adapter, its memory and its class in the switch (retrained without it), atomically."""
        with self.store.lock():
            self.manifest = self.store.read()
            if name not in self.task_names:
                raise SwitchcitError(f"task '{name}' is not in store {self.store.root}: known are {self.task_names}")
            switch = self._commit([t for t in self.tasks if t["name"] != name], {})
        self._sync_loaded()
        self._switch, self._switch_path = switch  # just trained: no need to read it back

    # -- inference -------------------------------------------------------------------------------

    def route(self, prompts: list[str]) -> list[Route]:
        """The task (and switch confidence) for each raw prompt.

        'base' (confidence None) when nothing is learned yet, or, with fallback on, when the prompt lies
        outside the region of the task the switch picked: a request of no known task gets the base model.
        """
        if not prompts:
            return []
        if self.switch is None:
            return [Route(BASE, None) for _ in prompts]
        features = self.encoder.encode(prompts)
        labels, confidences = self.switch.predict(features)
        known = self.switch.known(features, labels) if self.fallback else [True] * len(labels)
        return [Route(t, c) if k else Route(BASE, None) for t, c, k in zip(labels, confidences, known)]

    def generate(self, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
                 tasks: list[str] | None = None) -> list[Generation]:
        """Route (unless `tasks` forces each prompt's task) and answer every prompt, batched across adapters."""
        routes = self.route(prompts) if tasks is None else [Route(t, None) for t in tasks]
        outputs = self.generate_with(prompts, [r.task for r in routes], max_new_tokens, batch_size)
        return [Generation(p, r.task, r.confidence, o) for p, r, o in zip(prompts, routes, outputs)]

    def generate_with(self, prompts: list[str], tasks: list[str], max_new_tokens: int = 64,
                      batch_size: int = 16, min_new_tokens: int = 0) -> list[str]:
        """Greedy answers, each prompt with its task's adapter ('base': none); one batch mixes adapters."""
        return [c.text for c in self.complete(prompts, tasks, max_new_tokens, batch_size, min_new_tokens)]

    def complete(self, prompts: list[str], tasks: list[str], max_new_tokens: int = 64, batch_size: int = 16,
                 min_new_tokens: int = 0) -> list[Completion]:
        """`generate_with`, with each answer's exact token counts and why it ended (for API usage)."""
        from tqdm.auto import tqdm

        if len(tasks) != len(prompts):
            raise SwitchcitError(f"{len(prompts)} prompts but {len(tasks)} tasks: give one task per prompt")
        unknown = sorted(set(tasks) - set(self.task_names) - {BASE})
        if unknown:
            raise SwitchcitError(f"unknown task(s) {unknown}: known are {self.task_names} and '{BASE}'")
        self.load_adapters()
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        outputs: list[Completion] = [Completion("", 0, True, 0)] * len(prompts)
        starts = range(0, len(order), batch_size)
        quiet = not self.progress or len(starts) < 2
        for start in tqdm(starts, desc="generate", unit="batch", leave=False, disable=quiet):
            rows = order[start:start + batch_size]
            names = [_PEFT_BASE if tasks[i] == BASE else tasks[i] for i in rows]
            with self._adapters_for(names) as kwargs:
                done = greedy(self.model, self.tokenizer, [encoded[i] for i in rows], max_new_tokens,
                              min_new_tokens, **kwargs)
            for i, completion in zip(rows, done):
                outputs[i] = completion
        return outputs

    @contextmanager
    def _adapters_for(self, names: list[str]) -> Iterator[dict]:
        """Make row i of the next forward passes use adapter names[i]: the batched fast path when the adapters
        allow it (`fast_mixed`), else PEFT's mixed-adapter batches; yields extra `generate` kwargs."""
        if self._peft is None or set(names) == {_PEFT_BASE}:
            with self._peft.disable_adapter() if self._peft is not None else nullcontext():
                yield {}
            return
        if len(set(names)) == 1:  # one adapter for the whole batch: PEFT's own single-adapter path
            self._activate(names[0])
            yield {}
            return
        if not self.fast_mixed:
            yield {"adapter_names": names}
            return
        key = tuple(self._loaded.items())  # rebuilt whenever an adapter is added, replaced or removed
        if self._mixed_key != key:
            loaded = list(self._loaded)
            self._mixed = MixedLoRA(self._peft, loaded) if MixedLoRA.supports(self._peft, loaded) else None
            self._mixed_key = key
        if self._mixed is None:
            yield {"adapter_names": names}
            return
        with self._mixed.rows(names):
            yield {}


def greedy(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, min_new_tokens: int = 0,
           **generate_kwargs) -> list[Completion]:
    """Greedy answers to one batch of encoded prompts, left-padded so that every row ends at the same column."""
    import torch

    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = torch.tensor(e)
        mask[row, width - len(e):] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
    completions = []
    for row, e in enumerate(encoded):
        new = out[row, width:].tolist()
        stopped = tokenizer.eos_token_id in new  # padding follows the end token of rows done early
        count = new.index(tokenizer.eos_token_id) + 1 if stopped else len(new)
        completions.append(Completion(tokenizer.decode(new[:count], skip_special_tokens=True).strip(), count,
                                      stopped, len(e)))
    return completions


def _absolute_if_local(reference: str) -> str:
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else reference


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
