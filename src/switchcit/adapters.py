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
from typing import TYPE_CHECKING

from .errors import SwitchcitError
from .mixed import MixedLoRA, adapters_off, tuner_layers
from .models import load_base_model

if TYPE_CHECKING:
    from peft import LoraConfig

BASE = "base"  # the task name of "no adapter"
_PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches
TRAINING = "_training"


class AdapterPool:
    def __init__(self, reference: str, device: str, dtype: str | None, check: Callable[[object], None]):
        self.reference, self.device, self.dtype = reference, device, dtype
        self._check = check  # called once with the loaded base model (the store's fingerprint check)
        self._model = self._tokenizer = self._peft = None
        self._loaded: dict[str, str] = {}  # task -> adapter path loaded in memory
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
        """Drop adapters not wanted, reload those whose path changed, and load the missing ones if asked
        (or if adapters are already in use: generation needs them all)."""
        for task in [t for t in self._loaded if t not in wanted]:
            self._remove(task)
        if load_missing or self._loaded or self._peft is not None:
            for task, path in wanted.items():
                if self._loaded.get(task) != str(path):
                    self._load(task, path)

    def _load(self, task: str, path: Path) -> None:
        from peft import PeftModel

        if task in self._loaded:
            self._remove(task)
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=task)
        else:
            self._peft.load_adapter(str(path), adapter_name=task)
        self._peft.eval()
        self._loaded[task] = str(path)

    def _remove(self, name: str) -> None:
        """Delete one adapter from memory; the last one going returns the bare base model."""
        self._loaded.pop(name, None)
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
        allow it (`fast_mixed`, one adapter or many), else PEFT's own; yields extra `generate` kwargs."""
        names = [_PEFT_BASE if t == BASE else t for t in tasks]
        if self._peft is None or set(names) == {_PEFT_BASE}:
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

    def _mixed_lora(self) -> MixedLoRA | None:
        """The stacked weights of the loaded adapters, rebuilt whenever one is added, replaced or removed;
        None when some adapter is not plain LoRA."""
        key = tuple(self._loaded.items())
        if self._mixed_key != key:
            loaded = list(self._loaded)
            self._mixed = MixedLoRA(self._peft, loaded) if MixedLoRA.supports(self._peft, loaded) else None
            self._mixed_key = key
        return self._mixed
