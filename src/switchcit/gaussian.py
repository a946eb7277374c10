"""The Gaussian switch: each task a Gaussian over features, all sharing one covariance (LDA).

Why not the paper's MLP: an MLP retrained on a tiny retained memory forgets earlier tasks a little at
every stage, and its accuracy drops on wordings that training never used. Linear discriminant analysis
needs only per-task sufficient statistics (count, mean, scatter), which add up exactly, so the switch
after stage k is the switch a joint fit on all k tasks' data would give: nothing is forgotten and no
per-example memory is needed. The shared covariance also carries what one task teaches about wording
(simp's eleven instructions vary along directions that another task's new wording varies along too),
which is what keeps new wordings of a one-wording task on their task (streaming LDA, Hayes & Kanan 2020).

A request is of no known task when it lies outside every task's region: its squared Mahalanobis
distance to each task's mean exceeds that task's threshold. Regions use a covariance shrunk harder
toward the identity than the classifier's (`unknown_shrinkage`): a new wording of a known task moves
along directions its task never varied in, which a lightly shrunk metric punishes as much as a new task.
The threshold is a ratio times the task's mean in-sample distance; the ratio is fitted once, when the
task is learned, from its own held-out wordings or folds, so it follows the covariance as later tasks
change it, and depends on no other task: the switch after stage k, fallback included, is exactly the
switch fitted on all k tasks at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TaskStats:
    """Sufficient statistics of one task's features: count, mean and scatter (sum of centred outer products)."""

    count: int
    mean: torch.Tensor  # [dim], float64
    scatter: torch.Tensor  # [dim, dim], float64

    @classmethod
    def of(cls, features: torch.Tensor) -> TaskStats:
        x = features.double()
        mean = x.mean(dim=0)
        centred = x - mean
        return cls(len(x), mean, centred.T @ centred)


def pooled_precision(stats: list[TaskStats], shrinkage: float) -> torch.Tensor:
    """Inverse of the shared covariance, shrunk toward a scaled identity (Ledoit-Wolf style, fixed weight)."""
    import torch

    scatter = sum(s.scatter for s in stats)
    dof = max(sum(s.count for s in stats) - len(stats), 1)
    covariance = scatter / dof
    dim = covariance.shape[0]
    scale = torch.trace(covariance) / dim
    shrunk = (1 - shrinkage) * covariance + shrinkage * scale.clamp_min(1e-12) * torch.eye(dim, dtype=torch.float64)
    return torch.linalg.inv(shrunk)


def squared_distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """[n, k] squared Mahalanobis distances of each feature to each task mean."""
    x = features.double()
    projected_x = x @ precision  # [n, d]
    cross = projected_x @ means.T  # [n, k]
    return ((projected_x * x).sum(dim=1, keepdim=True) - 2 * cross
            + ((means @ precision) * means).sum(dim=1)[None]).clamp_min(0)


def mean_in_sample_distance(stats: TaskStats, precision: torch.Tensor) -> float:
    """The mean squared distance of a task's own training features to its mean: tr(P S) / n, exactly."""
    return float((precision * stats.scatter).sum() / max(stats.count, 1))


def wording_folds(wordings: list[str | None] | None) -> list[list[int]] | None:
    """Row indices per distinct wording, where the rows say how they were worded and repeat their wordings
    (at least two wordings, each used twice on average); else None."""
    if not wordings or any(w is None for w in wordings):
        return None
    groups: dict[str, list[int]] = {}
    for i, w in enumerate(wordings):
        groups.setdefault(w, []).append(i)
    return list(groups.values()) if 2 <= len(groups) <= len(wordings) / 2 else None


CALIBRATION_ROWS = 16  # fewest rows whose folds each leave a covariance with some spread
FEW_ROWS_RATIO = 12.0  # the ratio of a task with fewer rows


def threshold_ratio(features: torch.Tensor, shrinkage: float, false_rejection: float, seed: int = 0,
                    wordings: list[str | None] | None = None, folds: int = 5) -> float:
    """How far a new prompt of this task may lie from its mean, as a multiple of the mean in-sample distance.

    A task of fewer than `CALIBRATION_ROWS` rows cannot be refitted without a fold: a covariance of one or two
    rows has no spread, so held-out distances over it grow without bound (a ratio of 1e11 for two rows made
    such a task's region swallow every request). It gets `FEW_ROWS_RATIO` instead, about what tasks of many
    rows get, so a task learned from a handful of examples is held no wider than any other.

    Each wording of the task (or, where the rows do not say, each of `folds` random folds) is held out in
    turn and measured against the task refitted without it; the ratio
    is the (1 - false_rejection) quantile of those held-out distances over the full fit's mean in-sample
    distance. Held-out wordings stand for the new wordings users will send; random folds see none, but on
    CIT's many-worded tasks (simp, hgen) both give the same ratio within 1%.
    """
    import torch

    if len(features) < CALIBRATION_ROWS:
        return FEW_ROWS_RATIO
    by_wording = wording_folds(wordings)
    if by_wording is not None:
        splits = [torch.tensor(g) for g in by_wording]
    else:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
        splits = list(order.tensor_split(min(folds, len(features))))
    held_out = []
    for fold in splits:
        keep = torch.ones(len(features), dtype=torch.bool)
        keep[fold] = False
        rest = TaskStats.of(features[keep] if keep.any() else features)
        precision = pooled_precision([rest], shrinkage)
        held_out.append(squared_distances(features[fold], rest.mean[None], precision)[:, 0])
    full = TaskStats.of(features)
    in_sample = mean_in_sample_distance(full, pooled_precision([full], shrinkage))
    return torch.quantile(torch.cat(held_out), 1.0 - false_rejection).item() / max(in_sample, 1e-12)


class GaussianSwitch:
    """Features -> (task, confidence) by the nearest task mean in the shared-covariance metric."""

    kind = "gaussian"

    def __init__(self, labels: list[str], means: torch.Tensor, precision: torch.Tensor,
                 region_precision: torch.Tensor, thresholds: torch.Tensor):
        self.labels = list(labels)
        self.means = means.double()
        self.precision = precision.double()
        self.region_precision = region_precision.double()
        self.thresholds = thresholds.double()

    @classmethod
    def fit(cls, stats: dict[str, TaskStats], ratios: dict[str, float], shrinkage: float,
            unknown_shrinkage: float) -> GaussianSwitch:
        import torch

        labels = list(stats)
        precision = pooled_precision([stats[t] for t in labels], shrinkage)
        region = pooled_precision([stats[t] for t in labels], unknown_shrinkage)
        # a floor, so that a task of identical prompts (no spread) still holds its own prompt, not 0/0
        thresholds = torch.tensor([max(ratios[t] * mean_in_sample_distance(stats[t], region), 1e-6) for t in labels],
                                  dtype=torch.float64)
        return cls(labels, torch.stack([stats[t].mean for t in labels]), precision, region, thresholds)

    def predict(self, features: torch.Tensor) -> tuple[list[str], list[float]]:
        import torch

        distances = squared_distances(features, self.means, self.precision)
        confidence, index = torch.softmax(-0.5 * distances, dim=-1).max(dim=-1)
        return [self.labels[i] for i in index.tolist()], confidence.float().tolist()

    def unknown_score(self, features: torch.Tensor) -> torch.Tensor:
        """The smallest distance-over-threshold across tasks: above 1 is outside every task's region."""
        distances = squared_distances(features, self.means, self.region_precision)
        return (distances / self.thresholds[None]).min(dim=1).values.float()

    def known(self, features: torch.Tensor, labels: list[str]) -> list[bool]:
        """Whether each feature lies inside some task's region (`labels` are the routes; any region counts)."""
        return (self.unknown_score(features) <= 1.0).tolist()

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"means": self.means.contiguous(), "precision": self.precision.contiguous(),
                   "region_precision": self.region_precision.contiguous(), "thresholds": self.thresholds.contiguous()},
                  str(folder / "switch.safetensors"))
        meta = {"kind": self.kind, "labels": self.labels, "dim": int(self.means.shape[1])}
        (folder / "switch.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path, meta: dict) -> GaussianSwitch:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "switch.safetensors"))
        return cls(meta["labels"], tensors["means"], tensors["precision"], tensors["region_precision"],
                   tensors["thresholds"])
