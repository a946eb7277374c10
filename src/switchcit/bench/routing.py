"""`switchcit bench --routing-only`: how well requests reach their task, stage by stage, without generating.

SwitchCIT's adapters never change, so every point it loses comes from routing. The switch does not
depend on the adapters, so routing is measured on features alone: no LoRA training, no LLM, minutes
instead of an hour. The library rows ('gaussian', 'mlp') go through the library's own path
(`memory.remember` and `memory.build_switch`, the fallback included), exactly what `switchcit learn`
stores; 'centroid' and 'knn' are training-free classifiers over the same memory, without a fallback.

At every stage k (tasks 1..k learned) each router is scored, on 0-100, fallback on (a known-task
prompt sent to base is a miss):
- seen / unseen / reworded: test prompts of the learned tasks in training wordings / in the stream's unseen
  wordings / in switchcit's own rewordings (`data/rewordings.json`; nothing is fitted on them);
- seen_learned_wordings: the `seen` prompts in a wording the task's training rows use, no wording counting as
  one (None where no prompt is: `inline` rows say nothing of their wording): with one wording per task
  (`one_wording`) most of CIT's training wordings are new to the store;
- leave_one_wording_out: for each learned task with several training wordings, the task relearned
  without one wording, tested on that wording's training prompts;
- unknown_caught: prompts of the stream's later tasks sent to base (the demo stream's prompts for
  unknown_caught_demo, everyday requests of `data/general_requests.txt` for unknown_caught_general), and
  the AUROC of the unknown score separating them from known prompts;
- false_rejection_seen / _unseen / _reworded / _lowo: known-task prompts sent to base (training wordings,
  unseen wordings, rewordings, left-out wordings);
- joint_seen / joint_unseen: the same router fitted at stage k on all data of tasks 1..k at once (the
  MLP on every feature instead of the retained memory; the Gaussian switch is the same by construction);
  the gap to `seen` / `unseen` is the switch's own forgetting.
After the last stage, `general_taken`: the share of the everyday requests each task keeps past the fallback;
`small_task`: the last task learned from only 2, 5 or 10 rows beside the others, against
the store without it (everyday and other-stream requests caught, the other tasks' prompts routed right).

Every figure is measured for each shape of the training rows (`streams.SHAPES`): as the stream builds them,
the whole prompt as one instruction, one wording per task; each stage row names its `shape`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..background import background_mean
from ..continual import BASE
from ..encoders import (
    BASE_ENCODER,
    DEFAULT_ENCODER,
    INSTRUCTION_VIEW,
    SEGMENTS,
    Encoder,
    InstructionViews,
    PromptAndSegments,
    slug,
    views,
    with_instruction_view,
    with_segments,
)
from ..errors import SwitchcitError
from ..memory import MemoryConfig, TaskMemory, build_switch, remember
from ..routers import fit_router
from ..switch import ROUTERS, SwitchConfig
from ..variants import prompt_variants
from .streams import Stream

if TYPE_CHECKING:
    import torch

ROUTING_ROUTERS = (*ROUTERS, "centroid", "knn")
GENERAL_REQUESTS = Path(__file__).parent / "data" / "general_requests.txt"
# multiples of each router's own fallback threshold, for the trade-off curve (1.0 is the router as configured)
CURVE = (0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0)


@dataclass
class RoutingConfig:
    routers: list[str] = field(default_factory=lambda: list(ROUTING_ROUTERS))
    encoder: str = DEFAULT_ENCODER
    model: str | None = None  # the base model, whose hidden state encoder 'base' is
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def check(self) -> None:
        unknown = [r for r in self.routers if r not in ROUTING_ROUTERS]
        if unknown or not self.routers:
            raise SwitchcitError(f"routers {unknown or '(none)'}: choose from {', '.join(ROUTING_ROUTERS)}")

    def features_folder(self) -> str:
        """Where under OUT/routing-cache this encoder's features are cached: one folder per encoder (for 'base',
        per base model), so a run with another encoder into the same --out never reads this one's."""
        import hashlib

        inner = self.encoder  # the segments and the second view are cached beside the whole prompt
        while inner.endswith((INSTRUCTION_VIEW, SEGMENTS)):
            inner = inner.removesuffix(INSTRUCTION_VIEW).removesuffix(SEGMENTS)
        identity = inner + (f"@{self.model}" if inner == BASE_ENCODER else "")
        return f"{slug(identity)[:60]}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


@dataclass
class Features:
    """One encoder pass over everything the benchmark routes."""

    train: dict[str, torch.Tensor]
    wordings: dict[str, list[str | None]]
    variants: dict[str, tuple[torch.Tensor, torch.Tensor] | None]  # variants.encode_variants of each train set
    seen: dict[str, torch.Tensor]
    seen_learned: dict[str, torch.Tensor]  # per seen prompt: is it in a wording the task's training rows use?
    unseen: dict[str, torch.Tensor]
    reworded: dict[str, torch.Tensor]
    others: torch.Tensor  # the demo stream's prompts (or, for the demo stream itself, its unknown prompts)
    general: torch.Tensor  # everyday requests of no benchmark task
    background: torch.Tensor  # the switch's background class: the mean of the shipped requests (background.py)


def other_prompts(stream: Stream) -> list[str]:
    from ..demo import unseen_prompts
    from .streams import demo

    if stream.name == "demo":
        return unseen_prompts()
    return [e.prompt for t in demo(200, 30, 0).tasks for e in t.seen]


def general_requests() -> list[str]:
    """Everyday requests of no task (one per line; a literal \\n stands for a line break)."""
    lines = GENERAL_REQUESTS.read_text(encoding="utf-8").splitlines()
    return [line.replace("\\n", "\n") for line in lines if line.strip() and not line.startswith("#")]


def encode_stream(stream: Stream, encoder: Encoder, cache: Path | None, seed: int = 0) -> Features:
    """Features of every prompt and of the training prompts' variants (as `learn` makes them), cached in `cache`
    (one folder per encoder: `RoutingConfig.features_folder`) per set and per view (encoders.InstructionViews)
    by the texts' content so a rerun encodes nothing; the background mean as `learn` takes it."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    groups = {f"train/{t.name}": t.train.prompts for t in stream.tasks}
    owners = {}
    for t in stream.tasks:
        texts, owners[t.name] = prompt_variants(t.train.prompts, seed)
        if texts:
            groups[f"variants/{t.name}"] = texts
    groups.update({f"seen/{t.name}": [e.prompt for e in t.seen] for t in stream.tasks})
    groups.update({f"unseen/{t.name}": [e.prompt for e in t.unseen] for t in stream.tasks if t.unseen})
    groups.update({f"reworded/{t.name}": [e.prompt for e in t.reworded] for t in stream.tasks if t.reworded})
    groups["others"] = other_prompts(stream)
    groups["general"] = general_requests()
    inner = encoder
    while isinstance(inner, (InstructionViews, PromptAndSegments)):
        inner = inner.inner

    def cached(name: str, texts: list[str]) -> torch.Tensor:  # one file per set: a changed set encodes only itself
        key = hashlib.sha256(json.dumps([name, texts]).encode()).hexdigest()[:16]
        path = cache / f"features-{key}.safetensors" if cache else None
        if path and path.exists():
            return load_file(str(path))["features"]
        found = inner.encode(texts)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"features": found.contiguous()}, str(path))
        return found

    def encoded(layer: Encoder, name: str, texts: list[str]) -> torch.Tensor:  # as layer.encode, each part cached
        if isinstance(layer, InstructionViews):
            return with_instruction_view(texts, encoded(layer.inner, name, texts),
                                         partial(encoded, layer.inner, f"{name}/instruction"))
        if isinstance(layer, PromptAndSegments):
            return with_segments(texts, encoded(layer.inner, name, texts), partial(encoded, layer.inner,
                                                                                   f"{name}/segments"))
        return cached(name, texts)

    tensors = {name: encoded(encoder, name, prompts) for name, prompts in groups.items()}
    empty = torch.zeros(0, tensors["others"].shape[1])
    variants = {t.name: (tensors[f"variants/{t.name}"], torch.tensor(owners[t.name], dtype=torch.long))
                if f"variants/{t.name}" in tensors else None for t in stream.tasks}
    learned = {t.name: set(t.train.wordings) for t in stream.tasks}  # None: rows and prompts say nothing
    return Features({t.name: tensors[f"train/{t.name}"] for t in stream.tasks},
                    {t.name: t.train.wordings for t in stream.tasks}, variants,
                    {t.name: tensors[f"seen/{t.name}"] for t in stream.tasks},
                    {t.name: torch.tensor([e.wording in learned[t.name] for e in t.seen], dtype=torch.bool)
                     for t in stream.tasks},
                    {t.name: tensors.get(f"unseen/{t.name}", empty) for t in stream.tasks},
                    {t.name: tensors.get(f"reworded/{t.name}", empty) for t in stream.tasks},
                    tensors["others"], tensors["general"],
                    background_mean(encoder.reference, partial(encoded, encoder, "background")))


class Fitted:
    """One router fitted on some tasks: routes features to a task or base, and scores how unknown they look."""

    def __init__(self, kind: str, memories: dict[str, TaskMemory], full: dict[str, torch.Tensor],
                 config: RoutingConfig, background: torch.Tensor):
        if kind in ROUTERS:
            self.switch = build_switch(memories, replace(config.switch, router=kind), full, background,
                                       views(config.encoder))
            self.router = None
        else:
            features = {t: full.get(t, m.features) for t, m in memories.items()}
            centroids = {t: m.centroid for t, m in memories.items()}
            self.switch, self.router = None, fit_router(kind, features, centroids=centroids)

    def route(self, features: torch.Tensor, multiplier: float = 1.0) -> list[str]:
        if len(features) == 0:
            return []
        if self.router is not None:
            return self.router.route(features)
        labels, _ = self.switch.predict(features)
        score = self.switch.unknown_score(features)
        return [BASE if s > multiplier else t for t, s in zip(labels, score.tolist())]

    def score(self, features: torch.Tensor) -> torch.Tensor | None:
        return None if self.router is not None else self.switch.unknown_score(features)


def memories_for(kind: str, features: Features, learned: list[str], config: RoutingConfig) -> dict[str, TaskMemory]:
    """What the store keeps of each learned task (each task's memory depends on that task alone)."""
    switch = replace(config.switch, router=kind if kind in ROUTERS else "mlp")
    return {t: remember(features.train[t], config.memory, switch, features.wordings[t], features.variants[t],
                        views(config.encoder)) for t in learned}


def _share(hits: int, total: int) -> float | None:
    return None if total == 0 else round(100.0 * hits / total, 2)


def _sent_to_base(fitted: Fitted, features: torch.Tensor) -> float | None:
    """Percent of these prompts the router sends to the base model."""
    return _share(sum(r == BASE for r in fitted.route(features)), len(features))


def _accuracy(fitted: Fitted, by_task: dict[str, torch.Tensor]) -> tuple[float | None, float | None]:
    """(routed to their task, sent to base) in percent, over all prompts of these tasks."""
    right = rejected = total = 0
    for task, x in by_task.items():
        routes = fitted.route(x)
        right += sum(r == task for r in routes)
        rejected += sum(r == BASE for r in routes)
        total += len(routes)
    return _share(right, total), _share(rejected, total)


def auroc(unknown: torch.Tensor, known: torch.Tensor) -> float | None:
    """Probability that an unknown prompt scores above a known one (ties count half)."""
    if len(unknown) == 0 or len(known) == 0:
        return None
    greater = (unknown[:, None] > known[None]).double().mean()
    ties = (unknown[:, None] == known[None]).double().mean()
    return round((greater + 0.5 * ties).item(), 4)


def kept_variants(features: Features, task: str, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The task's variants of the rows not `held` out, their owners renumbered to the kept rows."""
    import torch

    if features.variants[task] is None:
        return None
    view_features, owner = features.variants[task]
    keep = ~held[owner]
    renumber = torch.cumsum(~held, 0) - 1
    return view_features[keep], renumber[owner[keep]]


def leave_one_wording_out(kind: str, features: Features, learned: list[str], config: RoutingConfig,
                          memories: dict[str, TaskMemory]) -> tuple[float | None, float | None, torch.Tensor | None]:
    """Each learned task with several training wordings relearned without one, tested on that wording:
    (routed to their task, sent to base, unknown scores), or Nones where no task has several wordings."""
    import torch

    right = rejected = total = 0
    scores = []
    newest = learned[-1]
    for task in learned:
        wordings = features.wordings[task]
        distinct = sorted({w for w in wordings if w is not None})
        if len(distinct) < 2:
            continue
        switch = replace(config.switch, router=kind if kind in ROUTERS else "mlp")
        for wording in distinct:
            held = torch.tensor([w == wording for w in wordings])
            rest = features.train[task][~held]
            kept = [w for w in wordings if w != wording]
            variants = kept_variants(features, task, held)
            trimmed = {**memories, task: remember(rest, config.memory, switch, kept, variants, views(config.encoder))}
            full = {newest: rest if newest == task else features.train[newest]}
            fitted = Fitted(kind, trimmed, full, config, features.background)
            routes = fitted.route(features.train[task][held])
            right += sum(r == task for r in routes)
            rejected += sum(r == BASE for r in routes)
            total += len(routes)
            score = fitted.score(features.train[task][held])
            if score is not None:
                scores.append(score)
    return _share(right, total), _share(rejected, total), torch.cat(scores) if scores else None


def score_stage(kind: str, features: Features, order: list[str], k: int, config: RoutingConfig,
                memories: dict[str, TaskMemory], shape: str = "as_built") -> tuple[dict, dict]:
    """Stage k's row for one router, and the raw unknown scores for the trade-off curve."""
    import torch

    learned, later = order[:k], order[k:]
    fitted = Fitted(kind, memories, {learned[-1]: features.train[learned[-1]]}, config, features.background)
    seen = {t: features.seen[t] for t in learned}
    unseen = {t: features.unseen[t] for t in learned if len(features.unseen[t])}
    reworded = {t: features.reworded[t] for t in learned if len(features.reworded[t])}
    seen_right, seen_rejected = _accuracy(fitted, seen)
    in_learned = {t: seen[t][features.seen_learned[t]] for t in learned if features.seen_learned[t].any()}
    unseen_right, unseen_rejected = _accuracy(fitted, unseen)
    reworded_right, reworded_rejected = _accuracy(fitted, reworded)
    unknown = torch.cat([features.seen[t] for t in later]) if later else features.others[:0]
    lowo, lowo_rejected, lowo_scores = leave_one_wording_out(kind, features, learned, config, memories)
    joint = Fitted(kind, memories, {t: features.train[t] for t in learned}, config, features.background)
    row = {"shape": shape, "seen": seen_right, "seen_learned_wordings": _accuracy(fitted, in_learned)[0],
           "unseen": unseen_right, "reworded": reworded_right,
           "reworded_by_task": {t: _accuracy(fitted, {t: x})[0] for t, x in reworded.items()},
           "leave_one_wording_out": lowo, "false_rejection_lowo": lowo_rejected, "unknown_caught": None,
           "unknown_caught_demo": None, "unknown_caught_general": None, "false_rejection_seen": None,
           "false_rejection_unseen": None, "false_rejection_reworded": None, "auroc": None, "auroc_general": None,
           "joint_seen": _accuracy(joint, seen)[0], "joint_unseen": _accuracy(joint, unseen)[0]}
    if fitted.router is not None:  # a training-free router has no fallback: nothing is ever sent to base
        return row, {}
    scores = {"seen": fitted.score(torch.cat(list(seen.values()))), "others": fitted.score(features.others),
              "general": fitted.score(features.general),
              "unseen": fitted.score(torch.cat(list(unseen.values()))) if unseen else None,
              "reworded": fitted.score(torch.cat(list(reworded.values()))) if reworded else None,
              "unknown": fitted.score(unknown) if len(unknown) else None, "lowo": lowo_scores}
    known = torch.cat([s for s in (scores["seen"], scores["unseen"], scores["reworded"]) if s is not None])
    caught = {name: _sent_to_base(fitted, x)
              for name, x in (("demo", features.others), ("general", features.general))}
    row.update(false_rejection_seen=seen_rejected, false_rejection_unseen=unseen_rejected,
               false_rejection_reworded=reworded_rejected, unknown_caught_demo=caught["demo"],
               unknown_caught_general=caught["general"], auroc_general=auroc(scores["general"], known))
    if len(unknown):
        row.update(unknown_caught=_sent_to_base(fitted, unknown),
                   auroc=auroc(scores["unknown"], known))
    return row, scores


def tradeoff(raws: list[dict]) -> list[dict]:
    """Unknown prompts caught against known prompts rejected, for multiples of the configured threshold,
    averaged over the stages that have unknown prompts (all but the last)."""
    def above(part: str, m: float) -> float | None:
        values = [100.0 * (r[part] > m).float().mean().item() for r in raws if r.get(part) is not None]
        return round(sum(values) / len(values), 2) if values else None

    return [{"multiplier": m, "unknown_caught": above("unknown", m), "unknown_caught_demo": above("others", m),
             "unknown_caught_general": above("general", m), "false_rejection_seen": above("seen", m),
             "false_rejection_unseen": above("unseen", m), "false_rejection_reworded": above("reworded", m),
             "false_rejection_lowo": above("lowo", m)} for m in CURVE]


def general_taken(kind: str, features: Features, order: list[str], config: RoutingConfig,
                  memories: dict[str, TaskMemory]) -> dict[str, float]:
    """Percent of the everyday requests each task keeps past the fallback after the last stage, most first (tasks
    that keep none left out): where the unknowns that are not caught go. A task whose prompts are plain questions
    or everyday goals (BIG-bench's strategyqa, goal_step_wikihow) keeps the requests that read like its inputs."""
    from collections import Counter

    routes = Fitted(kind, memories, {}, config, features.background).route(features.general)
    kept = Counter(r for r in routes if r != BASE)
    return {task: _share(n, len(routes)) for task, n in kept.most_common()}


SMALL_TASK_ROWS = (2, 5, 10)  # users start tasks from a handful of examples


def small_task(kind: str, features: Features, order: list[str], config: RoutingConfig,
               memories: dict[str, TaskMemory]) -> dict | None:
    """The stream's last task learned from only its first 2, 5 or 10 rows beside the others, against the store
    without it: a task of a few rows must neither widen any region nor swallow unknown requests (its threshold
    has no spread to calibrate on: gaussian.FEW_ROWS_FACTOR)."""
    import torch

    *rest, last = order
    if not rest:
        return None
    switch = replace(config.switch, router=kind)

    def figures(mems: dict[str, TaskMemory]) -> dict:
        fitted = Fitted(kind, mems, {}, config, features.background)
        reworded = {t: features.reworded[t] for t in rest if len(features.reworded[t])}
        return {"general_caught": _sent_to_base(fitted, features.general),
                "others_caught": _sent_to_base(fitted, features.others),
                "seen": _accuracy(fitted, {t: features.seen[t] for t in rest})[0],
                "reworded": _accuracy(fitted, reworded)[0],
                "own_seen": _accuracy(fitted, {last: features.seen[last]})[0] if last in mems else None}

    found = {"task": last, "without": figures({t: memories[t] for t in rest}), "with": []}
    for n in SMALL_TASK_ROWS:
        if n >= len(features.train[last]):
            break
        held = torch.arange(len(features.train[last])) >= n  # every row but the first n
        wordings = features.wordings[last][:n] if features.wordings[last] else None
        small = remember(features.train[last][:n], config.memory, switch, wordings,
                         kept_variants(features, last, held), views(config.encoder))
        found["with"].append({"rows": n, **figures({**{t: memories[t] for t in rest}, last: small})})
    return found


def score_routers(stream: Stream, shape: str, encoder: Encoder, config: RoutingConfig, cache: Path,
                  progress: bool) -> tuple[Features, dict]:
    """Every router at every stage of `stream`, its training rows in `shape`."""
    from tqdm.auto import tqdm

    features = encode_stream(stream, encoder, cache, config.memory.seed)
    order = [t.name for t in stream.tasks]
    results = {}
    for kind in tqdm(config.routers, desc=f"routing ({shape})", unit="router", disable=not progress):
        rows, raws = [], []
        memories = memories_for(kind, features, order, config)  # each task's memory depends on that task alone
        last = None
        for k in range(1, len(order) + 1):
            row, raw = score_stage(kind, features, order, k, config, {t: memories[t] for t in order[:k]}, shape)
            rows.append(row)
            if raw and k < len(order):
                raws.append(raw)
            last = raw
        curves = {"tradeoff": tradeoff(raws)} if raws else {}
        if last:  # the targets hold after the last stage: rewordings kept against everyday requests caught
            curves["tradeoff_last_stage"] = tradeoff([last])
        results[kind] = {"stages": rows, **curves}
        if kind in ROUTERS:
            results[kind]["general_taken"] = general_taken(kind, features, order, config, memories)
            results[kind]["small_task"] = small_task(kind, features, order, config, memories)
    return features, results


def run_routing(streams: dict[str, Stream], encoder: Encoder, config: RoutingConfig, out: Path,
                progress: bool = True, command: str | None = None) -> dict:
    """Score every router at every stage of the stream in each shape of its rows (`streams`: shape -> stream, the
    first one the headline); writes OUT/routing.json, OUT/report.md, OUT/routing.png."""
    config.check()
    started = time.time()
    cache = out / "routing-cache" / config.features_folder()
    shapes = {shape: score_routers(stream, shape, encoder, config, cache, progress)
              for shape, stream in streams.items()}
    stream, (features, results) = next(iter(streams.values())), next(iter(shapes.values()))
    order = [t.name for t in stream.tasks]
    report = {"config": {"stream": stream.name, "tasks": order, "encoder": config.encoder,
                         "switch": asdict(config.switch), "memory": asdict(config.memory),
                         "train_examples": {t: len(features.train[t]) for t in order},
                         "test_examples": {t: len(features.seen[t]) for t in order},
                         "unseen_examples": {t: len(features.unseen[t]) for t in order},
                         "reworded_examples": {t: len(features.reworded[t]) for t in order},
                         "other_prompts": len(features.others), "general_requests": len(features.general),
                         "shapes": list(streams), "seconds": round(time.time() - started, 1), "command": command},
              "default": config.switch.kind if config.switch.kind in results else config.routers[0],
              "routers": results, "shapes": {shape: {"routers": r} for shape, (_, r) in shapes.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(report, indent=2))
    from .report import write_routing_report

    write_routing_report(report, out)
    return report
