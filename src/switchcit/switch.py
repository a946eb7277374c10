"""The paper's switch: an MLP task classifier over features, and the routing knobs.

A small MLP (the paper: one hidden layer of 200, ReLU) maps features to a task. After each new task
it is retrained from scratch on the new task's features plus a small retained sample of every earlier
task's features (never raw text). It stays as the 'mlp' router and the benchmark's baseline; new
stores route with the Gaussian switch (gaussian.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .generation import OUTSIDE_REGIONS
from .settings import check_ranges, knob

if TYPE_CHECKING:
    import torch

def cosine_distance(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[n, k] distances 1 - cos between rows of features and rows of centroids."""
    import torch.nn.functional as F

    return 1.0 - F.normalize(features.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T


ROUTERS = ("gaussian", "mlp")
DEFAULT_ROUTER = "gaussian"


@dataclass
class SwitchConfig:
    """How requests are routed. `router`: 'gaussian' (shared-covariance LDA from exact task statistics, see
    gaussian.py) or 'mlp' (the paper's switch over a retained feature memory; hidden..weight_decay are its)."""

    router: str | None = knob(None, "--router", "switch of a new store: 'gaussian' (task statistics, forgets "
                              "nothing) or 'mlp' (the paper's MLP over a retained memory) (default: the store's; "
                              f"{DEFAULT_ROUTER} for a new store)", choices=ROUTERS)
    shrinkage: float = knob(0.2, low=0, high=1)  # gaussian: weight of the identity in the classifier's covariance
    # gaussian: the same for the fallback's task regions; at 1 (the identity) a region is a ball, measured alike
    # for held-out and new prompts (gaussian.py: below 1, a store of one task sent 22% of its held-out rows to base)
    unknown_shrinkage: float = knob(1.0, low=0, high=1)
    false_rejection: float = knob(0.05, "--false-rejection", "share of a task's held-out prompts, and of their "
                                  "variants (instruction dropped, cut, moved, unlabelled or half-worded), outside its "
                                  "region; the unknown-request fallback sends fewer of its real new prompts to the "
                                  "base model (about 3%% on CIT)", low=0, high=1, open_low=True)
    background_margin: float = knob(10.0, "--background-margin", "gaussian: how much nearer (in squared distance, "
                                    "per view of the encoder) a request must be to everyday requests than to its "
                                    "nearest task to go to the base model; larger keeps more requests on the tasks",
                                    low=0)
    hidden: int = knob(200, low=1)
    steps: int = knob(400, low=1)
    batch_size: int = knob(256, low=1)
    learning_rate: float = knob(1e-3, low=0, open_low=True)
    weight_decay: float = knob(1e-4, low=0)
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self)

    @property
    def kind(self) -> str:
        """The router in force: the one asked for, else the default (a store's own is filled in on opening)."""
        return self.router or DEFAULT_ROUTER


class Switch:
    """Features -> (task, confidence). Inputs are standardised with statistics of the training features."""

    kind = "mlp"

    def __init__(self, labels: list[str], dim: int, hidden: int = 200):
        import torch
        from torch import nn

        self.labels = list(labels)
        self.dim = dim
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, len(labels)))
        self.mean = torch.zeros(dim)
        self.std = torch.ones(dim)
        self.centroids = torch.zeros(len(labels), dim)
        self.radii = torch.full((len(labels),), float("inf"))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)

    def predict(self, features: torch.Tensor) -> tuple[list[str], list[float]]:
        import torch

        with torch.no_grad():
            probs = torch.softmax(self.logits(features.float()), dim=-1)
        confidence, index = probs.max(dim=-1)
        return [self.labels[i] for i in index.tolist()], confidence.tolist()

    def rejections(self, features: torch.Tensor, labels: list[str]) -> list[str | None]:
        """Why the fallback sends each request to the base model (outside the region of the task it was routed
        to), None for a known one."""
        import torch

        index = torch.tensor([self.labels.index(t) for t in labels], dtype=torch.long)
        distance = cosine_distance(features, self.centroids).gather(1, index[:, None])[:, 0]  # n x tasks, not n x n
        return [None if inside else OUTSIDE_REGIONS for inside in (distance <= self.radii[index]).tolist()]

    def known(self, features: torch.Tensor, labels: list[str]) -> list[bool]:
        """Whether each feature lies inside the region of the task it was routed to."""
        return [why is None for why in self.rejections(features, labels)]

    def unknown_score(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine distance to the routed task's centroid over its radius: above 1 is outside its region."""
        import torch

        index = torch.tensor([self.labels.index(t) for t in self.predict(features)[0]], dtype=torch.long)
        distance = cosine_distance(features, self.centroids).gather(1, index[:, None])[:, 0]
        return distance / self.radii[index]

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}
        tensors.update(mean=self.mean.contiguous(), std=self.std.contiguous(), centroids=self.centroids.contiguous(),
                       radii=self.radii.contiguous())
        save_file(tensors, str(folder / "switch.safetensors"))
        meta = {"kind": self.kind, "labels": self.labels, "dim": self.dim, "hidden": self.hidden}
        (folder / "switch.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Switch:
        from safetensors.torch import load_file

        meta = json.loads((folder / "switch.json").read_text())
        switch = cls(meta["labels"], meta["dim"], meta["hidden"])
        tensors = load_file(str(folder / "switch.safetensors"))
        switch.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        switch.mean, switch.std = tensors["mean"], tensors["std"]
        switch.centroids, switch.radii = tensors["centroids"], tensors["radii"]
        return switch


def train_switch(features_by_task: dict[str, torch.Tensor], config: SwitchConfig | None = None,
                 regions: dict[str, tuple[torch.Tensor, float]] | None = None) -> Switch:
    """Fit a fresh switch; classes are weighted by inverse frequency, since memory is tiny next to a new task.

    `regions` gives each task's (centroid, radius) from `fit_region`, fitted once on all its features, for
    the unknown-request fallback; without them every prompt counts as known.
    """
    import torch

    config = config or SwitchConfig()
    labels = list(features_by_task)
    x = torch.cat([features_by_task[t].float() for t in labels])
    y = torch.cat([torch.full((len(features_by_task[t]),), i, dtype=torch.long) for i, t in enumerate(labels)])
    torch.manual_seed(config.seed)
    switch = Switch(labels, x.shape[1], config.hidden)
    switch.mean, switch.std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-6)
    if regions:
        switch.centroids = torch.stack([regions[t][0].float() for t in labels])
        switch.radii = torch.tensor([float(regions[t][1]) for t in labels])
    counts = torch.bincount(y, minlength=len(labels)).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (len(labels) * counts))
    optimizer = torch.optim.AdamW(switch.net.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    switch.net.train()
    for _ in range(config.steps):
        idx = torch.randint(len(x), (min(config.batch_size, len(x)),), generator=generator)
        loss = loss_fn(switch.logits(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    switch.net.eval()
    return switch
