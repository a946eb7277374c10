"""Two studies on top of SwitchCIT's benchmark run: how much memory the paper's switch needs, and Arrow.

Both reuse what the `switchcit` method left in RUN_DIR: its experts and its retained feature memory.
No expert is trained again, and every answer goes through the run's generation cache, so only prompts
that a switch sends somewhere new cost a generation. Routers are compared in one place, the routing
study (`bench --routing-only`, routing.py); what it cannot measure without answers is here.

- Memory budget: the paper's MLP switch retrained stage by stage as the library does, keeping p% of each
  earlier task's features (at least one) for several p and several encoders; its accuracy and the AP it
  yields. Judged as a classifier: the unknown-request fallback is off, so every prompt gets a task.
- Arrow: PEFT's per-token routing from the adapters' own weights drives the same experts after the last
  stage (no features, so no routing accuracy): its AP beside SwitchCIT's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..continual import ContinualModel
from ..encoders import Encoder, load_encoder, slug
from ..errors import SwitchcitError
from ..memory import MemoryConfig, select_memory
from ..routers import fit_router
from .streams import Stream

if TYPE_CHECKING:
    import torch

    from .methods import SwitchCIT

MEMORY_PERCENTS = (0.01, 0.1, 1.0, 10.0)  # the paper keeps 0.01% or 1%


@dataclass
class StudyConfig:
    memory_percents: list[float] = field(default_factory=lambda: list(MEMORY_PERCENTS))
    encoders: list[str] = field(default_factory=list)  # empty: the store's encoder and the base model's
    arrow: bool = True
    arrow_top_k: int = 3

    def check(self) -> None:
        bad = [p for p in self.memory_percents if not 0 < p <= 100]
        if bad:
            raise SwitchcitError(f"memory percentages {bad} are outside (0, 100]: give values like 0.01,1,10")
        if self.arrow:  # checked now, not after an hour of benchmark
            try:
                from peft import ArrowConfig, create_arrow_model  # noqa: F401
            except ImportError:
                raise SwitchcitError("the Arrow study needs a PEFT with Arrow routing: pip install -U peft, or "
                                     "give --no-arrow") from None


Features = dict[str, dict[str, "torch.Tensor"]]  # split ('train', 'seen', 'unseen') -> task -> [n, dim]


def stream_features(reference: str, make_encoder: Callable[[], Encoder], stream: Stream, folder: Path) -> Features:
    """Features of every training and evaluation prompt, cached on disk per encoder and prompts (a changed
    stream or model encodes anew): a rerun reuses them without loading the encoder at all."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    texts = [[t.name, t.train.prompts, [e.prompt for e in t.seen], [e.prompt for e in t.unseen]] for t in stream.tasks]
    key = hashlib.sha256(json.dumps([reference, texts]).encode()).hexdigest()[:12]
    path = folder / f"features-{slug(reference)}-{key}.safetensors"
    if path.exists():
        flat = load_file(str(path))
    else:
        encoder = make_encoder()
        flat = {}
        for task in stream.tasks:
            flat[f"train/{task.name}"] = encoder.encode(task.train.prompts)
            flat[f"seen/{task.name}"] = encoder.encode([e.prompt for e in task.seen])
            if task.unseen:
                flat[f"unseen/{task.name}"] = encoder.encode([e.prompt for e in task.unseen])
        folder.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in flat.items()}, str(staging))
        staging.replace(path)
    features: Features = {"train": {}, "seen": {}, "unseen": {}}
    for key, value in flat.items():
        split, task = key.split("/", 1)
        features[split][task] = value
    return features


def _accuracy(router, features: dict[str, torch.Tensor], tasks: list[str]) -> float:
    import torch

    routed = router.route(torch.cat([features[t] for t in tasks]))
    truth = [t for t in tasks for _ in range(len(features[t]))]
    return 100.0 * sum(a == b for a, b in zip(routed, truth)) / max(1, len(truth))


class Studies:
    """Runs the memory study and Arrow for one finished SwitchCIT run."""

    def __init__(self, config: StudyConfig, stream: Stream, method: SwitchCIT, scorer, out: Path, seed: int):
        self.config = config
        self.stream = stream
        self.method = method
        self.cm: ContinualModel = method.cm
        self.scorer = scorer
        self.folder = out / "studies"
        self.seed = seed
        self.names = [t.name for t in stream.tasks]
        if self.cm.task_names != self.names:
            raise SwitchcitError(f"the SwitchCIT store holds {self.cm.task_names}, not the stream {self.names}: "
                                 "run the switchcit method to the end first")

    # -- shared pieces ---------------------------------------------------------------------------------

    def features(self, reference: str) -> Features:
        def make_encoder() -> Encoder:
            if reference == self.cm.encoder_reference:
                return self.cm.encoder
            return load_encoder(reference, self.cm.adapters, device=self.cm.device)

        return stream_features(reference, make_encoder, self.stream, self.folder)

    def end_scores(self, seen_routes: list[str], unseen_routes: list[str]) -> dict:
        """The experts driven by these routes after the last stage: per-task scores, AP, unseen scores."""
        return self._scores(lambda prompts: self.method.generate_routed(prompts, seen_routes + unseen_routes))

    def _scores(self, answer: Callable[[list[str]], list[str]]) -> dict:
        """Score `answer`'s outputs for every seen, then every unseen-wording evaluation prompt."""
        tasks = self.stream.tasks
        prompts = [e.prompt for t in tasks for e in t.seen] + [e.prompt for t in tasks for e in t.unseen]
        answers = answer(prompts)
        final, final_unseen, at = {}, {}, 0
        for task in self.stream.tasks:
            final[task.name] = self.scorer(task, task.seen, answers[at:at + len(task.seen)])[0][task.metric]
            at += len(task.seen)
        for task in [t for t in self.stream.tasks if t.unseen]:
            final_unseen[task.name] = self.scorer(task, task.unseen, answers[at:at + len(task.unseen)])[0][task.metric]
            at += len(task.unseen)
        return {"final": final, "ap": sum(final.values()) / len(final), "final_unseen": final_unseen}

    def _final_routes(self, router, features: Features) -> tuple[list[str], list[str]]:
        import torch

        unseen = [features["unseen"][t] for t in self.names if t in features["unseen"]]
        return (router.route(torch.cat([features["seen"][t] for t in self.names])),
                router.route(torch.cat(unseen)) if unseen else [])

    # -- Arrow -------------------------------------------------------------------------------------------

    def arrow(self) -> dict:
        """PEFT's Arrow over the same experts: per token and layer, the top-k adapters whose weights' main
        direction best matches the hidden state are mixed. Needs no features and no training."""
        from peft import ArrowConfig, create_arrow_model

        from ..models import load_base_model
        from .methods import generate_batch

        model = None
        key = f"arrow-top{self.config.arrow_top_k}@{len(self.names)}"

        def run(batch):
            nonlocal model
            if model is None:
                base, tokenizer = load_base_model(self.cm.base_reference, self.cm.device, self.cm.adapters.dtype)
                paths = [str(self.cm.store.path(t.adapter)) for t in self.cm.tasks]
                config = ArrowConfig(top_k=min(self.config.arrow_top_k, len(paths)), rng_seed=self.seed)
                model = (create_arrow_model(base, paths, config).eval(), tokenizer)
            return generate_batch(*model, [p for _, p in batch], self.method.setup.max_new_tokens)

        scores = self._scores(lambda prompts: self.method.setup.cache.generate([(key, p) for p in prompts], run,
                                                                               desc="generate arrow"))
        return {"top_k": self.config.arrow_top_k, **scores}

    # -- memory budget ---------------------------------------------------------------------------------

    def memory(self) -> dict:
        """Per encoder and retained percentage: switch accuracy after each stage, on unseen wordings, and AP."""
        from tqdm.auto import tqdm

        encoders = self.config.encoders or list(dict.fromkeys([self.cm.encoder_reference, "base"]))
        rows = []
        progress = self.method.setup.progress
        for reference in tqdm(encoders, desc="memory study", unit="encoder", disable=not progress):
            features = self.features(reference)
            unseen_tasks = [t for t in self.names if t in features["unseen"]]
            for percent in self.config.memory_percents:
                keep = MemoryConfig(fraction=percent / 100, min_per_task=1, seed=self.seed)
                memory = {t: select_memory(features["train"][t], keep) for t in self.names}
                accuracy, router = [], None
                for i, task in enumerate(self.names):
                    pool = {**{t: memory[t] for t in self.names[:i]}, task: features["train"][task]}
                    router = fit_router("mlp", pool, self.cm.switch_config)
                    accuracy.append(_accuracy(router, features["seen"], self.names[:i + 1]))
                dim = int(features["seen"][self.names[0]].shape[1])
                rows.append({"encoder": reference, "percent": percent, "dim": dim,
                             "kept_per_earlier_task": [len(memory[t]) for t in self.names[:-1]], "accuracy": accuracy,
                             "unseen_accuracy": _accuracy(router, features["unseen"], unseen_tasks)
                             if unseen_tasks else None,
                             **self.end_scores(*self._final_routes(router, features))})
        return {"rows": rows, "min_per_task": 1}


def run_studies(config: StudyConfig, stream: Stream, method: SwitchCIT, scorer, out: Path, seed: int) -> dict:
    """Both studies, as results.json's 'studies' entry (either part skipped when it has nothing to run)."""
    studies = Studies(config, stream, method, scorer, out, seed)
    found = {}
    if config.memory_percents:
        found["memory"] = studies.memory()
    if config.arrow:
        found["arrow"] = studies.arrow()
    return found
