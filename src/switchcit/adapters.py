"""The adapter pool: the frozen base model, its PEFT wrapper, the task adapters loaded into it, the
temporary training adapter, and which adapter each row of a batch uses.

It is the one owner of the model's mutable state. PEFT injects adapters into the base model in place,
so anything that must see the model without adapters (the 'base' switch encoder) asks the pool for it
(`base_only`) rather than holding a reference of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .errors import SwitchcitError
from .mixed import NO_ADAPTER, MixedLoRA, adapters_off, tuner_layers
from .models import load_base_model

if TYPE_CHECKING:
    from peft import LoraConfig

BASE = "base"  # the task name of "no adapter"
TRAINING = "_training"


class AdapterMissing(SwitchcitError):
    """A batch asked for a task whose adapter is not loaded: it fails rather than answer with the base model."""


class _Loaded(NamedTuple):
    path: str
    name: str  # PEFT's name for it: the task's own, or a fresh one while a replacement is loaded beside the old




class AdapterPool:
    def __init__(self, reference: str, device: str, dtype: str | None, check: Callable[[object], None]):
        self.reference, self.device, self.dtype = reference, device, dtype
        self._check = check  # called once with the loaded base model (the store's fingerprint check)
        self._model = self._tokenizer = self._peft = None
        self._loaded: dict[str, _Loaded] = {}  # task -> the adapter loaded in memory for it
        self._mixed: MixedLoRA | None = None
        self._mixed_key: tuple = ()
        self._layers: tuple[tuple, list] = ((), [])  # (adapter names, the model's PEFT layers) for base_only
        self.fast_mixed = True  # batched multi-adapter LoRA (mixed.py); False: PEFT's adapter_names path

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def base(self):
        """The bare base model (adapters, when loaded, are injected into it: see `base_only`)."""
        if self._model is None:
            self._model, self._tokenizer = load_base_model(self.reference, self.device, self.dtype)
            self._check(self._model)
        return self._model

    @property
    def model(self):
        """The generating model: the PEFT wrapper once adapters exist, else the base model."""
        return self._peft if self._peft is not None else self.base

    @property
    def tokenizer(self):
        self.base  # noqa: B018 - loads it
        return self._tokenizer

    @contextmanager
    def base_only(self) -> Iterator[object]:
        """The model with every adapter switched off, for as long as the block runs."""
        if self._peft is None:
            yield self.model
            return
        key = tuple(self._peft.peft_config)
        if self._layers[0] != key:
            self._layers = key, tuner_layers(self._peft)
        with adapters_off(self._layers[1]):
            yield self.model

    def sync(self, wanted: dict[str, Path], load_missing: bool) -> None:
        """Bring the loaded adapters in line with `wanted` (task -> folder) in one step: new and changed ones load
        first, beside the versions they replace, and only then do replaced and unwanted ones go. Should a load
        fail, what this call loaded goes again and the pool stays as it was. Missing adapters load if asked (or
        if adapters are already in use: generation needs them all)."""
        loading = load_missing or self._loaded or self._peft is not None
        changed = {t: str(p) for t, p in wanted.items() if loading and getattr(self._loaded.get(t), "path", None)
                   != str(p)}
        fresh: dict[str, _Loaded] = {}
        try:
            for task, path in changed.items():
                fresh[task] = self._load(task, path)
        except BaseException:
            for adapter in fresh.values():
                self._remove(adapter.name)
            raise
        stale = [a.name for t, a in self._loaded.items() if t not in wanted or t in fresh]
        self._loaded = {**{t: a for t, a in self._loaded.items() if t in wanted}, **fresh}
        for name in stale:
            self._remove(name)

    def _load(self, task: str, path: str) -> _Loaded:
        """Load one adapter under a PEFT name not in use (the task's own unless its old version still holds it).
        A failed load leaves nothing behind."""
        from peft import PeftModel
        from peft.utils import load_peft_weights

        name, n = task, 1
        while self._peft is not None and name in self._peft.peft_config:
            n += 1
            name = f"{task}-V{n}"  # upper case: never a task name
        try:
            if self._peft is None:
                load_peft_weights(path, device="cpu")  # readable, before PEFT changes the base model in place
                self._peft = PeftModel.from_pretrained(self.base, path, adapter_name=name)
            else:
                self._peft.load_adapter(path, adapter_name=name)
        except BaseException:
            if self._peft is not None and name in self._peft.peft_config:
                self._remove(name)
            raise
        self._peft.eval()
        return _Loaded(path, name)

    def _remove(self, name: str) -> None:
        """Delete one adapter (by PEFT name) from memory; the last one going returns the bare base model."""
        self._mixed, self._mixed_key = None, ()  # its stacked weights include this adapter's
        if len(self._peft.peft_config) == 1:
            self._model = self._peft.unload()
            self._peft = None
            return
        with warnings.catch_warnings():  # PEFT warns when the active adapter goes; another is set below
            warnings.simplefilter("ignore")
            self._peft.delete_adapter(name)
        self._activate(next(iter(self._peft.peft_config)))

    def _activate(self, name: str) -> None:
        """Make one adapter the active one, for inference (PEFT's set_adapter makes it trainable)."""
        self._peft.set_adapter(name)
        self._peft.requires_grad_(False)

    @contextmanager
    def training(self, lora: LoraConfig) -> Iterator[object]:
        """A fresh adapter named TRAINING on the base model for the block; it is removed afterwards."""
        from peft import get_peft_model

        if getattr(self.base, "is_loaded_in_4bit", False) and self._peft is None:  # QLoRA: norms in float32
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(self.base, use_gradient_checkpointing=False)
        try:
            if self._peft is None:
                self._peft = get_peft_model(self.base, lora, adapter_name=TRAINING)
            else:
                self._peft.add_adapter(TRAINING, lora)
        except ValueError as exc:  # PEFT's word for target modules the model does not have
            raise SwitchcitError(f"LoRA cannot wrap this model: {str(exc).splitlines()[0]}; fix --target-modules "
                                 "(e.g. q_proj,v_proj, or all-linear)") from None
        try:
            yield self._peft
        finally:
            if TRAINING in self._peft.peft_config:
                self._remove(TRAINING)

    @contextmanager
    def rows(self, tasks: list[str]) -> Iterator[dict]:
        """Make row i of the next forward passes use tasks[i]'s adapter: the batched path when the adapters
        allow it (`fast_mixed`, one adapter or many), else PEFT's own; yields extra `generate` kwargs.
        A task whose adapter is not loaded raises AdapterMissing: its rows never get the base model instead."""
        missing = sorted({t for t in tasks if t != BASE and t not in self._loaded})
        if missing:
            raise AdapterMissing(f"the adapter of task(s) {', '.join(missing)} is not loaded (loaded: "
                                 f"{', '.join(self._loaded) or 'none'})")
        names = [NO_ADAPTER if t == BASE else self._loaded[t].name for t in tasks]
        if self._peft is None or set(names) == {NO_ADAPTER}:
            with self.base_only():
                yield {}
            return
        mixed = self._mixed_lora() if self.fast_mixed else None
        if mixed is not None:
            with mixed.rows(names):
                yield {}
        elif len(set(names)) == 1:  # PEFT's single-adapter path
            self._activate(names[0])
            yield {}
        else:
            yield {"adapter_names": names}

    def grouped(self, tasks: list[str]) -> list[int]:
        """Row indices that put rows of the same adapter next to each other, in the order the adapters are
        stacked, base-model rows last: a batch in this order is applied without moving rows (mixed.py)."""
        place = {task: i for i, task in enumerate(self._loaded)}
        return sorted(range(len(tasks)), key=lambda i: place.get(tasks[i], len(place)))

    def _mixed_lora(self) -> MixedLoRA | None:
        """The stacked weights of the loaded adapters, rebuilt whenever one is added, replaced or removed;
        None when some adapter is not plain LoRA."""
        key = tuple(self._loaded.items())
        if self._mixed_key != key:
            loaded = [a.name for a in self._loaded.values()]
            self._mixed = MixedLoRA(self._peft, loaded) if MixedLoRA.supports(self._peft, loaded) else None
            self._mixed_key = key
        return self._mixed
