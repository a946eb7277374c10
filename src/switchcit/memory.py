"""What the store keeps of each task for routing, and the switch rebuilt from it after every change.

Per task, one safetensors file holds feature vectors and statistics, never raw text:
- `features`: a seeded sample of the task's features (the paper's retained memory; the MLP switch
  trains on it, and the benchmark's memory study reads it);
- `centroid`, `radius`: the task's cosine region, the MLP switch's unknown-request fallback;
- `count`, `mean`, `scatter`: the Gaussian switch's sufficient statistics, and `heldout_factor`,
  `heldout_moments`, `heldout_count`: its fallback's calibration (gaussian.Calibration). Stores written
  before the Gaussian switch have none of them and keep routing with the MLP; stores written before the
  calibration keep a `ratio` over the in-sample spread, read as the calibration it amounts to.

`remember` and `build_switch` are the one path from features to a switch: `ContinualModel` calls them
when it learns or forgets, and the routing benchmark calls them stage by stage, so the benchmark
measures exactly what `switchcit learn` stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SwitchcitError
from .gaussian import Calibration, GaussianSwitch, TaskStats, calibrate, task_stats
from .settings import check_ranges, knob
from .switch import Switch, SwitchConfig, cosine_distance, train_switch
from .variants import rows_and_variants

if TYPE_CHECKING:
    import torch


@dataclass
class MemoryConfig:
    """How much of each task stays in the feature memory: a fraction, but never fewer than a minimum."""

    fraction: float = knob(0.01, "--memory-fraction", "share of each task's features kept", low=0, high=1)
    min_per_task: int = knob(16, "--memory-min", "fewest features kept per task", low=1)
    seed: int = 0  # the CLI passes --seed

    def __post_init__(self) -> None:
        check_ranges(self)

    def size_for(self, n: int) -> int:
        return min(n, max(self.min_per_task, math.ceil(self.fraction * n)))


@dataclass(frozen=True)
class TaskMemory:
    features: torch.Tensor
    centroid: torch.Tensor
    radius: float
    stats: TaskStats | None = None
    calibration: Calibration | None = None

    def save(self, path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        tensors = {"features": self.features, "centroid": self.centroid, "radius": torch.tensor([self.radius])}
        if self.stats is not None and self.calibration is not None:
            tensors.update(count=torch.tensor([self.stats.count]), mean=self.stats.mean.float(),
                           scatter=self.stats.scatter.float(), heldout_factor=torch.tensor([self.calibration.factor]),
                           heldout_moments=self.calibration.moments.float(),
                           heldout_count=torch.tensor([self.calibration.count]))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: Path) -> TaskMemory:
        from safetensors.torch import load_file

        t = load_file(str(path))
        stats = TaskStats(int(t["count"].item()), t["mean"].double(), t["scatter"].double()) if "count" in t else None
        calibration = None
        if "heldout_moments" in t:
            calibration = Calibration(t["heldout_factor"].item(), t["heldout_moments"].double(),
                                      int(t["heldout_count"].item()))
        elif stats is not None:  # the ratio over the in-sample spread stores wrote before the calibration
            calibration = Calibration(t["ratio"].item(), stats.scatter, stats.count)
        return cls(t["features"], t["centroid"], t["radius"].item(), stats, calibration)


def select_memory(features: torch.Tensor, config: MemoryConfig) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    keep = torch.randperm(len(features), generator=generator)[: config.size_for(len(features))]
    return features[keep.sort().values].clone()


def fit_region(features: torch.Tensor, false_rejection: float, seed: int = 0,
               variants: tuple[torch.Tensor, torch.Tensor] | None = None, folds: int = 5) -> tuple[torch.Tensor, float]:
    """A task's cosine region for the MLP switch's fallback: centroid and radius.

    Every feature is held out once (k-fold) with the variants of its prompt (variants.py): their distance
    is taken to the centroid of the other folds. The radius is the (1 - false_rejection) quantile of those
    held-out distances.
    """
    import torch

    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    held_out = []
    for fold in order.tensor_split(min(folds, len(features))):
        rest = features[order[~torch.isin(order, fold)]] if len(features) > 1 else features
        test = rows_and_variants(features, fold, variants)
        held_out.append(cosine_distance(test, rest.float().mean(dim=0, keepdim=True))[:, 0])
    radius = torch.quantile(torch.cat(held_out), 1.0 - false_rejection).item()
    return features.float().mean(dim=0), radius


def remember(features: torch.Tensor, memory: MemoryConfig, switch: SwitchConfig,
             wordings: list[str | None] | None = None,
             variants: tuple[torch.Tensor, torch.Tensor] | None = None, views: int = 1) -> TaskMemory:
    """What the store keeps of a new task: it depends on that task alone. `wordings` (each row's
    instruction, where known) and `variants` (variants.encode_variants of its prompts) let the fallback
    calibrate on held-out wordings and on the variants of held-out rows; the variants also count in the
    task's statistics (gaussian.task_stats). `views`: how many the features hold (encoders.views)."""
    centroid, radius = fit_region(features, switch.false_rejection, memory.seed, variants)
    retained = select_memory(features, memory)
    if switch.kind != "gaussian":
        return TaskMemory(retained, centroid, radius)
    calibration = calibrate(features, switch.unknown_shrinkage, switch.false_rejection, memory.seed, wordings,
                            variants, views=views)
    return TaskMemory(retained, centroid, radius, task_stats(features, variants), calibration)


def build_switch(memories: dict[str, TaskMemory], config: SwitchConfig,
                 full_features: dict[str, torch.Tensor] | None = None,
                 background: torch.Tensor | None = None, views: int = 1) -> Switch | GaussianSwitch:
    """The switch over these tasks. The MLP trains on the retained memory (all features where given);
    the Gaussian switch needs only the statistics, so `full_features` changes nothing for it, takes the
    background class's mean (background.py) where given, and classifies by the first of the features'
    `views` (encoders.views; the MLP reads them all)."""
    if config.kind == "gaussian":
        missing = [t for t, m in memories.items() if m.stats is None]
        if missing:
            raise SwitchcitError(f"tasks {missing} were stored without the statistics the gaussian router needs: "
                                 "use router 'mlp' for this store, or learn its tasks again into a new store")
        return GaussianSwitch.fit({t: m.stats for t, m in memories.items()},
                                  {t: m.calibration for t, m in memories.items()}, config.shrinkage,
                                  config.unknown_shrinkage, background, config.background_margin, views)
    full_features = full_features or {}
    by_task = {t: full_features.get(t, m.features) for t, m in memories.items()}
    return train_switch(by_task, config, {t: (m.centroid, m.radius) for t, m in memories.items()})


def load_switch(folder: Path) -> Switch | GaussianSwitch:
    import json

    meta = json.loads((folder / "switch.json").read_text())
    return GaussianSwitch.load(folder, meta) if meta.get("kind") == GaussianSwitch.kind else Switch.load(folder)
