"""Routers over the switch's features: the trained MLP switch and two training-free ones to compare it with.

A router is fitted on features per task and maps features to task names. Which features it gets is
the caller's choice: the switch is trained on the newest task's full features plus the retained memory
of earlier tasks; a kNN router, which needs its features at request time, can only have what the store
keeps. The training-free routers need no training step at all, which makes them the natural baseline
for the learned switch:

- nearest centroid: the task whose mean feature is closest in cosine distance;
- k nearest neighbours: a similarity-weighted vote of the k closest retained features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .errors import SwitchcitError
from .switch import SwitchConfig, cosine_distance, train_switch

if TYPE_CHECKING:
    import torch

ROUTERS = ("mlp", "centroid", "knn")


class Router(Protocol):
    def route(self, features: torch.Tensor) -> list[str]:
        ...


@dataclass
class MLPRouter:
    """The library's switch (its classifier alone, without the unknown-request fallback)."""

    switch: object

    def route(self, features: torch.Tensor) -> list[str]:
        return self.switch.predict(features)[0]


@dataclass
class NearestCentroid:
    labels: list[str]
    centroids: torch.Tensor

    def route(self, features: torch.Tensor) -> list[str]:
        return [self.labels[i] for i in cosine_distance(features, self.centroids).argmin(dim=1).tolist()]


@dataclass
class NearestNeighbours:
    labels: list[str]
    memory: torch.Tensor  # [n, dim]
    owners: torch.Tensor  # [n] index into labels
    k: int = 5

    def route(self, features: torch.Tensor) -> list[str]:
        import torch

        similarity = 1.0 - cosine_distance(features, self.memory)
        top, index = similarity.topk(min(self.k, len(self.memory)), dim=1)
        votes = torch.zeros(len(features), len(self.labels))
        votes.scatter_add_(1, self.owners[index], top.clamp_min(0) + 1e-6)  # dissimilar neighbours still count
        return [self.labels[i] for i in votes.argmax(dim=1).tolist()]


def fit_router(kind: str, features_by_task: dict[str, torch.Tensor], switch_config: SwitchConfig | None = None,
               centroids: dict[str, torch.Tensor] | None = None, k: int = 5) -> Router:
    """A router of `kind` (see ROUTERS) over these features. `centroids` overrides the centroid router's
    task means (the store keeps each task's mean over all its features, not only over the retained few)."""
    import torch

    labels = list(features_by_task)
    if kind == "mlp":
        return MLPRouter(train_switch(features_by_task, switch_config))
    if kind == "centroid":
        means = centroids or {t: f.float().mean(dim=0) for t, f in features_by_task.items()}
        return NearestCentroid(labels, torch.stack([means[t].float() for t in labels]))
    if kind == "knn":
        if k < 1:
            raise SwitchcitError(f"kNN needs k of at least 1, not {k}")
        memory = torch.cat([features_by_task[t].float() for t in labels])
        owners = torch.cat([torch.full((len(features_by_task[t]),), i) for i, t in enumerate(labels)])
        return NearestNeighbours(labels, memory, owners, k)
    raise SwitchcitError(f"unknown router '{kind}': choose from {', '.join(ROUTERS)}")
