"""Uncertainty of the bench's figures: a t-interval over seeds, a bootstrap interval over evaluation prompts.

Seeds vary everything a run draws (data order, LoRA initialisation, memory sample, evaluation sample),
so the spread over seeds is the run's own noise; with three seeds the t quantile (4.30) is what keeps the
interval honest. Within one seed, resampling the evaluation prompts says how much the figure owes to
which prompts were drawn; a prompt is resampled with all its scores, so BWT compares the same prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BOOTSTRAP_RESAMPLES = 1000
LEVEL = 0.95


def t_interval(values: Sequence[float]) -> list[float] | None:
    """The 95% t-interval of the mean of `values` (None below two values)."""
    from scipy.stats import t  # scipy comes with sentence-transformers, a dependency of the library

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def figure(values: Sequence[float | None], intervals: Sequence[list[float] | None] | None = None) -> dict:
    """One figure over seeds: mean, t-interval, the per-seed values and (where known) their bootstrap intervals.
    A seed without the figure makes mean and interval None."""
    known = [v for v in values if v is not None]
    complete = len(known) == len(values) and known
    found = {"mean": sum(known) / len(known) if complete else None, "ci95": t_interval(known) if complete else None,
             "per_seed": list(values)}
    if intervals is not None:
        found["per_seed_ci95"] = list(intervals)
    return found


def bootstrap(final: dict[str, list[float]], learned: dict[str, list[float]], last: str,
              seed: int = 0) -> dict:
    """Percentile intervals of AP, BWT and each task's final score, over prompts resampled per task.

    `final[task]`: per-prompt scores after the last stage; `learned[task]`: the same prompts' scores right after
    learning the task; `last`: the last task, which has no BWT term."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = {}
    for task, scores in final.items():
        pairs = np.array([scores, learned.get(task, scores)], dtype=float)  # [2, prompts]
        picks = rng.integers(0, pairs.shape[1], size=(BOOTSTRAP_RESAMPLES, pairs.shape[1]))
        means[task] = pairs[:, picks].mean(axis=2)  # [2, resamples]
    ap = np.mean([m[0] for m in means.values()], axis=0)
    changes = [m[0] - m[1] for task, m in means.items() if task != last]

    def percentiles(samples) -> list[float]:
        low, high = np.percentile(samples, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
        return [float(low), float(high)]

    return {"ap": percentiles(ap), "bwt": percentiles(np.mean(changes, axis=0)) if changes else None,
            "final": {task: percentiles(m[0]) for task, m in means.items()}}
