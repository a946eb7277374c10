"""ContinualModel: learn tasks one after another, route each prompt to its task, generate with its adapter.
A thin facade: the adapter pool owns the model, the store what is on disk, transaction.py what a change writes."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace as with_fields
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import BASE, TRAINING, AdapterPool
from .background import background_mean
from .data import Example, Task
from .encoders import DEFAULT_ENCODER, Encoder, load_encoder, views
from .errors import SwitchcitError, failed_writes
from .experts import ExpertConfig, train_expert
from .gaussian import GaussianSwitch
from .generation import EMPTY_PROMPT, NOTHING_LEARNED, Generation, Route, forced_routes, generate_routed
from .memory import MemoryConfig, load_switch
from .models import DEFAULT_MODEL, absolute_if_local, fingerprint, resolve_device, same_model
from .store import Manifest, Store, TaskEntry
from .switch import Switch, SwitchConfig
from .transaction import commit, write_task
from .variants import encode_variants

if TYPE_CHECKING:
    import torch


class ContinualModel:
    """A base model, one LoRA adapter per learned task, and a switch that picks the adapter per prompt.
    Opening a store loads nothing heavy: the base model, encoder, switch and adapters load on first use."""

    def __init__(self, store: str | Path, base_model: str | None = None, encoder: str | None = None,
                 device: str | None = None, dtype: str | None = None,
                 expert_config: ExpertConfig | None = None, memory_config: MemoryConfig | None = None,
                 switch_config: SwitchConfig | None = None, progress: bool = True, fallback: bool = True):
        self.store = Store(store)
        self.manifest: Manifest | None = self.store.read() if self.store.exists() else None
        m = self.manifest
        if m:
            m.refuse_mismatch(self.store.root, encoder, switch_config and switch_config.router)
        self.base_reference = absolute_if_local(base_model or (m.base_model if m else DEFAULT_MODEL))
        self.encoder_reference = m.encoder if m else encoder or DEFAULT_ENCODER
        self.expert_config = expert_config or ExpertConfig()
        self.memory_config = memory_config or MemoryConfig()
        self.switch_config = with_fields(switch_config or SwitchConfig(), **({"router": m.router} if m else {}))
        self.progress, self.fallback = progress, fallback
        self.device = resolve_device(device)
        self.adapters = AdapterPool(self.base_reference, self.device, dtype, self._check_base)
        self._encoder: Encoder | None = None
        self._switch: tuple[str, Switch | GaussianSwitch] | None = None  # (its store path, the switch)

    @property
    def tasks(self) -> list[TaskEntry]:  # in learning order
        return list(self.manifest.tasks) if self.manifest else []

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    model = property(lambda self: self.adapters.model, doc="the generating model (PEFT wrapper or base)")
    tokenizer = property(lambda self: self.adapters.tokenizer)

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_reference, self.adapters, self.device)
        return self._encoder

    @property
    def switch(self) -> Switch | GaussianSwitch | None:
        path = self.manifest.switch if self.manifest else None
        if path and (self._switch is None or self._switch[0] != path):
            self._switch = path, load_switch(self.store.path(path))
        return self._switch[1] if path else None

    def _check_base(self, model) -> None:
        if self.manifest and not same_model(self.manifest.base_fingerprint, fingerprint(model)):
            raise SwitchcitError(f"store {self.store.root} was built on base model '{self.manifest.base_model}', and "
                                 f"'{self.base_reference}' is a different model: use that base model or a new store")

    def load_adapters(self, load_missing: bool = True) -> None:
        """Bring the loaded adapters in line with the manifest (generation needs them all)."""
        self.adapters.sync(self._adapter_paths(self.manifest), load_missing)

    def _adapter_paths(self, manifest: Manifest | None) -> dict[str, Path]:
        return {t.name: self.store.path(t.adapter) for t in (manifest.tasks if manifest else [])}

    def refresh(self, manifest: Manifest | None = None, load_missing: bool = False) -> bool:
        """Follow the store to its current manifest, or to `manifest` when the caller read it already (live
        updates); True if it changed. Manifest and loaded adapters change as one step: should an adapter fail
        to load, neither changes, and the next refresh tries again."""
        if manifest is None:
            manifest = self.store.read() if self.store.exists() else None
        self.adapters.sync(self._adapter_paths(manifest), load_missing)
        changed, self.manifest = manifest != self.manifest, manifest
        return changed

    def learn(self, task: Task, replace: bool = False, expert_config: ExpertConfig | None = None,
              eval_examples: list[Example] | None = None, resume: bool = False) -> TaskEntry | None:
        """Train `task`'s adapter, then rebuild the switch with it; None in data-parallel helper processes.
        Nothing the store's readers see changes until the final atomic commit; an interrupted call leaves
        only its trainer checkpoints, which `resume` continues from. One process at a time learns a task."""
        import torch

        from .training import data_parallel, run_key

        config = expert_config or self.expert_config
        task.check_outputs()
        rank, processes = data_parallel()
        config.steps_for(len(task.examples), processes)  # a step larger than the data is refused before any work
        self._check_store(task.name, replace)
        root = self.store.root
        with failed_writes(f"learn '{task.name}'", f"free space or fix permissions in {root}, then learn again "
                           "(--resume continues from the last checkpoint); the store keeps its last committed state"), \
                self.store.owning(task.name) if rank == 0 else nullcontext(self.store.checkpoints(task.name)) as runs:
            features = variants = background = None
            if rank == 0:
                features = self.encoder.encode(task.prompts)
                variants = encode_variants(self.encoder.encode, task.prompts, self.memory_config.seed)
                background = self._background(self.switch_config.kind == GaussianSwitch.kind)
            torch.manual_seed(config.seed)  # LoRA A matrices are initialised at random: same seed, same adapter
            with self.adapters.training(config.lora()) as peft:
                run = run_key(task.examples, eval_examples, config, self.adapters.base, self.base_reference)
                log_dir = Path(config.log_dir) if config.log_dir else self.store.logs(task.name)
                stats = train_expert(peft, TRAINING, task.examples, self.tokenizer, config, self.progress,
                                     f"learn {task.name}", eval_examples=eval_examples, resume=resume,
                                     run_dir=runs / run, log_dir=log_dir)
                if rank > 0:  # data-parallel helpers train; only the first process writes the store
                    return None
                with self.store.change(create=True):
                    self.manifest = self.store.read() if self.store.exists() else Manifest(
                        self.base_reference, fingerprint(self.adapters.base), self.encoder_reference,
                        features.shape[1], self.memory_config.fraction, self.memory_config.min_per_task,
                        self.switch_config.kind)
                    self._check_store(task.name, replace)
                    entry = write_task(self.store, task, features, variants, stats, config, self.memory_config,
                                       self.switch_config, run, views(self.manifest.encoder))
                    tasks = [*[t for t in self.tasks if t.name != task.name], entry]
                    self.manifest, self._switch = commit(self.store, self.manifest, tasks, self.switch_config,
                                                         {task.name: features}, background)
                    self.store.drop_checkpoints(task.name)
        self.refresh()
        return entry

    def forget(self, name: str) -> None:
        """Remove a task: its adapter, memory, checkpoints and logs in the store, and its class in the switch
        (rebuilt without it), atomically; the previous generation's files, which hold it too, go at once."""
        root = self.store.root
        with failed_writes(f"forget '{name}'", f"free space or fix permissions in {root}, then forget again; the "
                           "store keeps its last committed state"), self.store.change():
            self.manifest = self.store.read()
            if name not in self.task_names and not self.store.leftovers(name):
                raise SwitchcitError(f"task '{name}' is not in store {root}: known are {self.task_names}")
            with self.store.owning(name):  # the commit first: a forget that fails to write keeps the task whole
                if name in self.task_names:
                    self.manifest, self._switch = commit(self.store, self.manifest,
                                                         [t for t in self.tasks if t.name != name],
                                                         self.switch_config, {}, self._background(False),
                                                         keep_previous=False)
                    self.refresh(self.manifest)  # its adapter goes now, even if dropping its files fails below
                self.store.drop_checkpoints(name)
                self.store.drop_logs(name)
        self.refresh()

    def _background(self, make: bool) -> torch.Tensor | None:
        """The background class's mean (background.py): the current switch's, else, where `make`, encoded now
        (a store's first task, or a store made before the background class)."""
        kept = getattr(self.switch, "background", None)
        return kept if kept is not None or not make else background_mean(self.encoder_reference, self.encoder.encode)

    def _check_store(self, name: str, replace: bool) -> None:
        """Before training and again at the commit (another process may have made or changed the store): the same
        encoder and router, a new name or `replace`, a whole and writable store, the same base model (loaded here)."""
        if self.manifest:
            self.manifest.refuse_mismatch(self.store.root, self.encoder_reference, self.switch_config.kind)
        if name in self.task_names and not replace:
            raise SwitchcitError(f"task '{name}' is already in store {self.store.root}: pass replace=True "
                                 "(--replace) to retrain it, or choose another name")
        self.store.check_ready()
        self._check_base(self.adapters.base)

    def route(self, prompts: list[str]) -> list[Route]:
        """The task (and switch confidence) for each raw prompt: 'base' (confidence None) when nothing is learned
        yet or, with fallback on, when the prompt is of no known task; a base route names the task the switch
        would have picked (`nearest`) and why it did not (`reason`)."""
        routes = [Route(BASE, None, None, NOTHING_LEARNED if p.strip() else EMPTY_PROMPT) for p in prompts]
        asked = [i for i, p in enumerate(prompts) if p.strip()]
        if asked and self.switch is not None:  # an empty prompt asks for no task
            features = self.encoder.encode([prompts[i] for i in asked])
            labels, confidences = self.switch.predict(features)
            rejected = self.switch.rejections(features, labels) if self.fallback else [None] * len(labels)
            for i, t, c, why in zip(asked, labels, confidences, rejected):
                routes[i] = Route(t, c) if why is None else Route(BASE, None, t, why)
        return routes

    def generate(self, prompts: list[str], tasks: list[str] | None = None, max_new_tokens: int = 64,
                 batch_size: int = 16, min_new_tokens: int = 0) -> list[Generation]:
        """Greedy answers, each with its routed task's adapter (or `tasks[i]`'s; 'base': none), batched
        across adapters; prompts of similar length share a batch."""
        routes = self.route(prompts) if tasks is None else forced_routes(prompts, tasks, [BASE, *self.task_names])
        self.load_adapters()
        return generate_routed(self.adapters, prompts, routes, max_new_tokens, batch_size, min_new_tokens,
                               self.progress)

