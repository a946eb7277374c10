"""The Gaussian switch: each task a Gaussian over features, all sharing one covariance (LDA).

Why not the paper's MLP: an MLP retrained on a tiny retained memory forgets earlier tasks a little at
every stage, and its accuracy drops on wordings that training never used. Linear discriminant analysis
needs only per-task sufficient statistics (count, mean, scatter), which add up exactly, so the switch
after stage k is the switch a joint fit on all k tasks' data would give: nothing is forgotten and no
per-example memory is needed. The shared covariance also carries what one task teaches about wording
(simp's eleven instructions vary along directions that another task's new wording varies along too),
which is what keeps new wordings of a one-wording task on their task (streaming LDA, Hayes & Kanan 2020).
Each task's statistics also count the variants of its prompts (`task_stats`), so even a task of one
wording shows the metric how a wording moves its prompts.

A request is of no known task when it lies outside every task's region: its squared Mahalanobis
distance to each task's mean exceeds that task's threshold. Regions use the covariance shrunk all the way
to the identity by default (`unknown_shrinkage` 1.0), so each region is a ball: a threshold is calibrated
on held-out rows, but the shared covariance counts those same rows, so under it they lie nearer their mean
than new prompts do. With many tasks one task's share of the covariance is small; with one task it is all
of it: a store of one CIT task sent 22% of its held-out rows and variants to base at 0.8, one of a
BIG-bench task of 100 rows every test prompt; at 1.0, 3.2%, and a whole store's figures stayed
(benchmarks/routing_cv.py). Each threshold is calibrated on the task's held-out rows and their variants
(variants.py) and kept as moments that any later metric can measure exactly (`Calibration`), so it
follows the covariance as later tasks change it and depends on no other task: the switch after stage k,
fallback included, is exactly the switch fitted on all k tasks at once.

A task learned from a handful of rows has a mean that is itself off by about its spread over the count, so
its new prompts lie farther from it than from a mean of many rows, and most went to other tasks (a CIT task
of 2 rows reached 36% of its own held-out rows). The classifier divides each task's squared distance by
1 + `MEAN_UNCERTAINTY` / count; the fallback does not, so no task catches more unknown requests.

A new wording drops or changes what made a prompt its task's, so it moves toward what people ask any
assistant, and the task whose mean lies nearest everyday requests (a hub, Radovanovic et al. 2010) became
the nearest task to many new wordings of the others: on BIG-bench one task took 55 of the 692 rewordings of
five others. The classifier takes `HUB_CORRECTION` times each task mean's squared distance to the background
mean (background.py) off that task's distance, so a task must be nearer to win the more generic its mean is;
the fallback reads the plain distances.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .generation import NEARER_EVERYDAY, OUTSIDE_REGIONS
from .variants import rows_and_variants

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TaskStats:
    """Sufficient statistics of one task's features: count, mean and scatter (sum of centred outer products)."""

    count: int
    mean: torch.Tensor  # [dim], float64
    scatter: torch.Tensor  # [dim, dim], float64

    @classmethod
    def of(cls, features: torch.Tensor, weights: torch.Tensor | None = None) -> TaskStats:
        """The statistics of these features, each counted `weights` times (once where not given)."""
        x = features.double()
        if weights is None:
            mean = x.mean(dim=0)
            centred = x - mean
            return cls(len(x), mean, centred.T @ centred)
        w = weights.double()[:, None]
        mean = (w * x).sum(dim=0) / w.sum()
        centred = x - mean
        return cls(round(w.sum().item()), mean, (w * centred).T @ centred)


VARIANT_WEIGHT = 0.25  # a variant counts as a quarter of a row: chosen by benchmarks/routing_cv.py


def task_stats(features: torch.Tensor, variants: tuple[torch.Tensor, torch.Tensor] | None = None,
               keep: torch.Tensor | None = None, weight: float = VARIANT_WEIGHT) -> TaskStats:
    """A task's statistics over its rows and their variants (variants.py), each variant weighing `weight` of
    a row; only the rows where the boolean `keep` is set, and their variants, where given.

    With its rows alone, a task of one wording has no spread along the directions a new wording moves,
    so the shared metric weighs its wording as heavily as its input, and 1 new wording in 3 of CIT's emdg
    went to another task; with its variants, 94% stay (issue 18).
    """
    import torch

    rows = features if keep is None else features[keep]
    if variants is None:
        return TaskStats.of(rows)
    view_features, owner = variants
    extra = view_features if keep is None else view_features[keep[owner]]
    return TaskStats.of(torch.cat([rows.double(), extra.double()]),
                        torch.cat([torch.ones(len(rows)), torch.full((len(extra),), weight)]))


def pooled_precision(stats: list[TaskStats], shrinkage: float, views: int = 1) -> torch.Tensor:
    """Inverse of the shared covariance, shrunk toward a scaled identity (Ledoit-Wolf style, fixed weight).

    With `views` (encoders.InstructionViews: features of equal blocks side by side) each view's block is
    shrunk on its own and the views share no terms: a view that repeats the first (a prompt that is its own
    instruction) then only doubles every distance and every threshold, where a joint covariance lowered the
    identity's share along it and tightened the regions (a third of the new wordings of tasks whose rows
    carry their input went to base, tests/test_routing.py)."""
    import torch

    scatter = sum(s.scatter for s in stats)
    dof = max(sum(s.count for s in stats) - len(stats), 1)
    covariance = scatter / dof
    if covariance.shape[0] % views:
        raise ValueError(f"{covariance.shape[0]} feature dims do not split into {views} equal views")
    precision = torch.zeros_like(covariance)
    size = covariance.shape[0] // views
    for start in range(0, size * views, size):
        block = covariance[start:start + size, start:start + size]
        scale = torch.trace(block) / size
        shrunk = (1 - shrinkage) * block + shrinkage * scale.clamp_min(1e-12) * torch.eye(size, dtype=torch.float64)
        precision[start:start + size, start:start + size] = torch.linalg.inv(shrunk)
    return precision


def squared_distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """[n, k] squared Mahalanobis distances of each feature to each task mean."""
    x = features.double()
    projected_x = x @ precision  # [n, d]
    cross = projected_x @ means.T  # [n, k]
    return ((projected_x * x).sum(dim=1, keepdim=True) - 2 * cross
            + ((means @ precision) * means).sum(dim=1)[None]).clamp_min(0)


def hub_offsets(stats: list[TaskStats], precision: torch.Tensor, background: torch.Tensor | None,
                correction: float) -> torch.Tensor:
    """What the classifier takes off each task's squared distance: `correction` times its mean's squared distance
    to the background mean, in the leading dims that `precision` covers (none without a background).

    A mean of n rows lies farther from any point than the task's true mean, by its spread over n on average, so
    that part is taken off first: else a task of 2 rows, its mean far from everything, took 3% of the other
    tasks' prompts in their training wordings (the routing benchmark's small task)."""
    import torch

    offsets = torch.zeros(len(stats), dtype=torch.float64)
    if background is None or correction == 0:
        return offsets
    d = precision.shape[0]
    for i, s in enumerate(stats):
        if s.count < 2:
            continue
        distance = squared_distances(background[None, :d], s.mean[None, :d], precision)[0, 0]
        noise = (precision * s.scatter[:d, :d]).sum() / (s.count * (s.count - 1))
        offsets[i] = correction * (distance - noise).clamp_min(0)
    return offsets


def wording_folds(wordings: list[str | None] | None) -> list[list[int]] | None:
    """Row indices per distinct wording, where the rows say how they were worded and repeat their wordings
    (at least two wordings, each used twice on average); else None."""
    if not wordings or any(w is None for w in wordings):
        return None
    groups: dict[str, list[int]] = {}
    for i, w in enumerate(wordings):
        groups.setdefault(w, []).append(i)
    return list(groups.values()) if 2 <= len(groups) <= len(wordings) / 2 else None


# a quarter of the predictive correction (1 + 1/n): cross-validated on training rows (every task in turn learned
# from 2, 5 or 10 rows beside the others), the largest that takes at most 0.05% of the other tasks' rows on CIT and
# BIG-bench: 0.5 before the hub correction (below), which also favours a few-row task (its mean lies far from
# everything), then 0.25 (0.5 took 0.08-0.2% on CIT); benchmarks/routing_cv.py few_rows_cv
MEAN_UNCERTAINTY = 0.25
# cross-validated on training rows (a held-out kind of variant, a left-out wording, held-out rows; CIT, its one-
# wording shape, BIG-bench, the demo): 0.4 routed 2.5-3.8 points more of the held-out kinds right, 0.5 and more
# lost held-out rows in their training wordings; benchmarks/routing_cv.py hub study. Its price falls on the hub
# itself: BIG-bench's most everyday-like task kept 24 of its 50 test prompts (44 without it; README, seventh step)
HUB_CORRECTION = 0.4
CALIBRATION_ROWS = 16  # fewest rows whose folds each leave a covariance with some spread
FEW_ROWS_FACTOR = 2.0  # the factor of a task with fewer rows (CIT's and the demo's tasks at the default: 1.2-2.3)


@dataclass(frozen=True)
class Calibration:
    """How far a task's new prompts lie from its mean, kept so that any later metric can measure it exactly.

    `moments` is the sum of (x - m)(x - m)^T over held-out features x (rows and their variants, see
    variants.py), each about the mean m of the rows it was held out from, and `count` their number: in any
    metric P their mean squared distance is tr(P moments) / count. `factor` is the (1 - false_rejection)
    quantile of those distances over their mean, which depends little on the metric. A task's threshold
    is factor * tr(P moments) / count in the switch's final metric P, so it follows the covariance as later
    tasks change it, and the switch after stage k is exactly the one fitted on all k tasks at once.
    """

    factor: float
    moments: torch.Tensor  # [dim, dim], float64
    count: int

    def threshold(self, precision: torch.Tensor) -> float:
        # a floor, so that a task of identical prompts (no spread) still holds its own prompt, not 0/0
        return max(self.factor * float((precision * self.moments).sum()) / max(self.count, 1), 1e-6)


def calibrate(features: torch.Tensor, shrinkage: float, false_rejection: float, seed: int = 0,
              wordings: list[str | None] | None = None, variants: tuple[torch.Tensor, torch.Tensor] | None = None,
              folds: int = 5, views: int = 1) -> Calibration:
    """Hold out each wording of the task (or, where the rows do not say, each of `folds` random folds) with
    the variants of its rows, and measure them against the task refitted without them.

    Held-out rows alone stand for prompts worded like the training rows; with a single wording, or the
    input inside the instruction, no fold holds out a new wording, so the region was fitted as tight as the
    training wordings and sent half of the new wordings of such tasks to the base model (issue 18). The
    variants (instruction dropped, cut or moved) are the new wordings we can make for any data shape.
    A task of fewer than `CALIBRATION_ROWS` rows cannot give a stable quantile (a covariance of one or two
    rows has no spread): it gets `FEW_ROWS_FACTOR`, and still its own moments. `views`: as pooled_precision.
    """
    import torch

    n = len(features)
    by_wording = wording_folds(wordings)
    if by_wording is not None:
        splits = [torch.tensor(g) for g in by_wording]
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        splits = list(order.tensor_split(min(folds, n)))
    held_rows, held_variants, moments, count = [], [], 0, 0
    for fold in splits:
        keep = torch.ones(n, dtype=torch.bool)
        keep[fold] = False
        # measured against the kept rows alone: against their variants too, a held-out variant is a kind of
        # change the task has already seen, and the regions came out so tight that a third of the new
        # wordings of tasks whose rows carry their input went to base (tests/test_routing.py)
        rest = TaskStats.of(features[keep] if keep.any() else features)
        test = rows_and_variants(features, fold, variants).double()
        centred = test - rest.mean
        moments = moments + centred.T @ centred
        count += len(test)
        distances = squared_distances(test, rest.mean[None], pooled_precision([rest], shrinkage, views))[:, 0]
        held_rows.append(distances[: len(fold)])
        held_variants.append(distances[len(fold):])
    if n < CALIBRATION_ROWS:
        return Calibration(FEW_ROWS_FACTOR, moments, count)
    # rows and variants each keep their false-rejection budget: the variants outnumber the rows up to 5 to
    # 1, so a quantile over both together could leave out many more than that share of a task's new rows
    mean = torch.cat(held_rows + held_variants).mean().clamp_min(1e-12)
    quantiles = [torch.quantile(torch.cat(d), 1.0 - false_rejection) for d in (held_rows, held_variants)
                 if sum(len(x) for x in d)]
    return Calibration((max(quantiles) / mean).item(), moments, count)


class GaussianSwitch:
    """Features -> (task, confidence) by the nearest task mean in the shared-covariance metric.

    `distance_scale` divides each task's squared distance when classifying (1 + MEAN_UNCERTAINTY / count; ones
    for switches saved before it existed, which then route as they did), and `hub_offsets` are then taken off
    it (see hub_offsets; zeros for switches saved before).

    `background` is the mean of everyday requests of no task (background.py), a class that is never routed
    to: a request nearer to it than to its nearest task by more than `background_margin` per view (in squared
    distance, the log-odds of the two classes times 2) goes to the base model.

    With several views (encoders.InstructionViews) the classifier reads the first, its leading `routed_dims`
    (the precision is block-diagonal by view, so its leading block is the first view's own), and the fallback
    reads them all: a new wording changes the instruction's vector, so the second view would route a new
    kind of wording worse (held out: 89.4% against 91.5%), but a request whose instruction is like no task's
    is what the fallback must catch.
    """

    kind = "gaussian"

    def __init__(self, labels: list[str], means: torch.Tensor, precision: torch.Tensor,
                 region_precision: torch.Tensor, thresholds: torch.Tensor, background: torch.Tensor | None = None,
                 background_margin: float = 0.0, routed_dims: int | None = None,
                 distance_scale: torch.Tensor | None = None, hub_offsets: torch.Tensor | None = None):
        import torch

        self.labels = list(labels)
        self.means = means.double()
        self.precision = precision.double()
        self.region_precision = region_precision.double()
        self.thresholds = thresholds.double()
        self.background = None if background is None else background.double()
        self.background_margin = background_margin
        self.routed_dims = routed_dims or self.means.shape[1]
        self.distance_scale = (torch.ones(len(self.labels), dtype=torch.float64) if distance_scale is None
                               else distance_scale.double())
        self.hub_offsets = (torch.zeros(len(self.labels), dtype=torch.float64) if hub_offsets is None
                            else hub_offsets.double())

    @classmethod
    def fit(cls, stats: dict[str, TaskStats], calibrations: dict[str, Calibration], shrinkage: float,
            unknown_shrinkage: float, background: torch.Tensor | None = None,
            background_margin: float = 0.0, views: int = 1) -> GaussianSwitch:
        """`background_margin` is per view: a distance over two views sums two about equal parts, and the
        margin of 10 that cross-validation chose for one view (benchmarks/routing_cv.py) is, over two, one
        that sends no more held-out rows and variants to base than one view did (CIT 1.1% against 2.0%,
        BIG-bench 0.8% against 0.8%) while it catches more (a task left out 37% against 22%, BIG-bench 31%
        against 25%)."""
        import torch

        labels = list(stats)
        precision = pooled_precision([stats[t] for t in labels], shrinkage, views)
        region = pooled_precision([stats[t] for t in labels], unknown_shrinkage, views)
        thresholds = torch.tensor([calibrations[t].threshold(region) for t in labels], dtype=torch.float64)
        counts = torch.tensor([max(stats[t].count, 1) for t in labels], dtype=torch.float64)
        routed = precision.shape[0] // views
        offsets = hub_offsets([stats[t] for t in labels], precision[:routed, :routed], background, HUB_CORRECTION)
        return cls(labels, torch.stack([stats[t].mean for t in labels]), precision, region, thresholds, background,
                   background_margin, routed, 1 + MEAN_UNCERTAINTY / counts, offsets)

    def predict(self, features: torch.Tensor) -> tuple[list[str], list[float]]:
        import torch

        d = self.routed_dims
        distances = squared_distances(features[:, :d], self.means[:, :d], self.precision[:d, :d]) / self.distance_scale
        distances = distances - self.hub_offsets
        confidence, index = torch.softmax(-0.5 * distances, dim=-1).max(dim=-1)
        return [self.labels[i] for i in index.tolist()], confidence.float().tolist()

    def unknown_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fallback's two tests, each above 1 when it fails: the smallest distance-over-threshold to any task's
        region, and the nearest task's distance over the background's plus the margin (None without background)."""
        distances = squared_distances(features, self.means, self.region_precision)
        region = (distances / self.thresholds[None]).min(dim=1).values.float()
        if self.background is None:
            return region, None
        nearest = squared_distances(features, self.means, self.precision).min(dim=1).values
        to_background = squared_distances(features, self.background[None], self.precision)[:, 0]
        margin = self.background_margin * (self.means.shape[1] // self.routed_dims)  # per view
        return region, (nearest / (to_background + margin).clamp_min(1e-12)).float()

    def unknown_score(self, features: torch.Tensor) -> torch.Tensor:
        """Above 1 when the request is of no known task: outside every task's region, or nearer the background
        than its nearest task by the margin."""
        region, background = self.unknown_scores(features)
        return region if background is None else region.maximum(background)

    def rejections(self, features: torch.Tensor, labels: list[str]) -> list[str | None]:
        """Why the fallback sends each request to the base model, None for a known one (`labels` are the routes;
        any region counts)."""
        region, background = self.unknown_scores(features)
        background = background if background is not None else region.new_zeros(region.shape)
        return [OUTSIDE_REGIONS if r > 1.0 else NEARER_EVERYDAY if b > 1.0 else None
                for r, b in zip(region.tolist(), background.tolist())]

    def known(self, features: torch.Tensor, labels: list[str]) -> list[bool]:
        """Whether each feature lies inside some task's region and not nearer the background."""
        return [why is None for why in self.rejections(features, labels)]

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"means": self.means, "precision": self.precision, "region_precision": self.region_precision,
                   "thresholds": self.thresholds, "distance_scale": self.distance_scale,
                   "hub_offsets": self.hub_offsets}
        if self.background is not None:
            tensors["background"] = self.background
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "switch.safetensors"))
        meta = {"kind": self.kind, "labels": self.labels, "dim": int(self.means.shape[1]),
                "routed_dims": self.routed_dims, "background_margin": self.background_margin}
        (folder / "switch.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path, meta: dict) -> GaussianSwitch:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "switch.safetensors"))
        return cls(meta["labels"], tensors["means"], tensors["precision"], tensors["region_precision"],
                   tensors["thresholds"], tensors.get("background"), meta.get("background_margin", 0.0),
                   meta.get("routed_dims"), tensors.get("distance_scale"), tensors.get("hub_offsets"))
