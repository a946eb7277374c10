"""Cross-validation of the Gaussian switch's defaults on training rows only (issue 18).

    python benchmarks/routing_cv.py --stream cit --data-dir ../shared/data/cit [--shape as_built] [--encoder E]
        [--out docs/results/cit-routing-shapes] [--weights 0,0.25,0.5] [--margins 0,5,10,20]
        [--studies kinds,hub,margin,few_rows] [--mean-uncertainties 0,0.25,0.5,0.75,1]
        [--hub-corrections 0,0.2,0.3,0.4,0.5,0.6]

Why: the scored sets of `bench --routing-only` (rewordings, everyday requests) stand for wordings and
requests that no one sees in advance, so no default may be tuned on them. This script chooses on what a
store has: each task's training rows, their variants (variants.py) and the shipped background requests.

- `kinds`: which kinds of variant count in a task's statistics, and at what weight (gaussian.task_stats),
  with the classifier alone: each kind held out in turn (the task refitted without a fifth of its rows
  and without that kind everywhere, tested on the held-out rows' variants of that kind), and each
  training wording held out where a task has several (`held_out_kind`, `left_out_wording`, % routed right).
- `hub`: the classifier's hub correction (gaussian.HUB_CORRECTION), with all kinds of variant at their weight:
  the `kinds` figures and `held_out_rows` (each task refitted without a fifth of its rows, % of them routed right;
  `worst_task_held_out_rows` for the task that keeps fewest: a correction can cost one task what the others gain).
- `margin`: the background margin (and the regions' `unknown_shrinkage`) with the full switch: the
  background requests in 5 folds by kind (the mean of 4, the 5th scored: `background_caught`), each task
  refitted without a fifth of its rows and scored on them and their variants, beside the other tasks
  (`held_out_to_base`) and alone, a store's first task (`held_out_to_base_alone`), and each task left out
  as the unknown (`task_left_out_caught`).
- `template`: the variants of one-sentence prompts cut by their task's wording (variants.template_variants), in
  the tasks that have them: each such kind held out in turn (the task refitted without a fifth of its rows and
  without that kind, or `before` without any of them), the held-out rows' variants of that kind sent to base by
  the full switch (`kind_to_base`) and routed right by it (`kind_routed`), per kind; and the `margin` figures
  with and without those variants everywhere.
- `one_sentence` (needs no stream): four tasks written for this study whose rows are one sentence with the input
  inside, five wordings each ("How much is 12 added to 40?"); each task learned from one of its wordings (or
  from three, or four), the full switch scored on its other wordings (`routed`, `to_base`) and on the background
  requests (`background_caught`; the class's mean is theirs, so the figure is for comparing the two rows only),
  with and without the variants of variants.template_variants.
- `encoder`: the encoders of `--encoders` side by side (encoders.PromptAndSegments against the whole prompt
  alone), with every default as shipped: the `hub` figures at its correction and the `margin` figures at its
  margin, each encoder with its own background requests' vectors.
- `few_rows`: the classifier's allowance for a task's mean estimated from few rows (gaussian.MEAN_UNCERTAINTY):
  every task in turn learned from its first 2, 5 or 10 rows beside the others, each of those learned from half of
  its rows; % of the few-row task's other rows that reach it (`own`), of the other tasks' held-out halves that it
  takes (`others_taken`), and of the background requests it takes past the fallback (`background_taken`).

Features come from the routing benchmark's cache under OUT/routing-cache (so point --out at a routing
run to encode nothing); one JSON line per setting is printed and all of them written to OUT/routing-cv.json.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from switchcit.background import background_requests
from switchcit.bench.routing import Features, RoutingConfig, encode_stream, kept_variants
from switchcit.bench.streams import load_stream
from switchcit.encoders import DEFAULT_ENCODER, EMBEDDED_ENCODER, load_encoder, views
from switchcit.gaussian import (
    HUB_CORRECTION,
    VARIANT_WEIGHT,
    TaskStats,
    hub_offsets,
    pooled_precision,
    squared_distances,
    task_stats,
)
from switchcit.memory import MemoryConfig, build_switch, remember
from switchcit.switch import SwitchConfig
from switchcit.variants import named_variants, prompt_variants, rows_and_variants, template_words

TEMPLATE_KINDS = ("wording_dropped", "own_dropped", "own_first", "wording_half_worded")  # variants.template_variants

FOLDS = 5


def held_out_fold(n: int) -> torch.Tensor:
    """A boolean mask of one fifth of a task's rows, seeded."""
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(1)).tensor_split(FOLDS)[0]] = True
    return held


def variant_kinds(prompts: list[str]) -> list[str]:
    """The kind of each variant, in the order `prompt_variants` makes them."""
    _, owner = prompt_variants(prompts)
    template = template_words(prompts)
    return [kind for i in sorted(set(owner)) for kind in named_variants(prompts[i], template)]


def without_kinds(features: Features, kinds: dict[str, list[str]], drop: set[str]) -> Features:
    """The features with every variant of the `drop` kinds left out, as if variants.py never made them."""
    kept = {}
    for task, found in features.variants.items():
        mask = torch.tensor([k not in drop for k in kinds[task]], dtype=torch.bool)
        kept[task] = None if found is None or not mask.any() else (found[0][mask], found[1][mask])
    return replace(features, variants=kept)


def template_cv(features: Features, kinds: dict[str, list[str]], views: int) -> list[dict]:
    """One row per template kind: see the module's docstring."""
    switch, memory = SwitchConfig(), MemoryConfig()
    order = list(features.train)
    before = without_kinds(features, kinds, set(TEMPLATE_KINDS))
    full = {t: remember(features.train[t], memory, switch, features.wordings[t], features.variants[t], views)
            for t in order}
    rows = []
    for kind in TEMPLATE_KINDS:
        tally = {"before": [0, 0, 0], "after": [0, 0, 0]}  # to base, routed right, total
        sources = (("before", before), ("after", without_kinds(features, kinds, {kind})))
        for task in order:
            found = features.variants[task]
            if found is None or kind not in kinds[task]:
                continue
            held = held_out_fold(len(features.train[task]))
            of_kind = torch.tensor([k == kind for k in kinds[task]], dtype=torch.bool) & held[found[1]]
            if not of_kind.any():
                continue
            for name, source in sources:
                wordings = [w for w, h in zip(features.wordings[task], held.tolist()) if not h]
                refit = remember(features.train[task][~held], memory, switch,
                                 wordings if features.wordings[task] else None, kept_variants(source, task, held),
                                 views)
                fitted = build_switch({**full, task: refit}, switch, background=features.background, views=views)
                labels, _ = fitted.predict(found[0][of_kind])
                known = fitted.known(found[0][of_kind], labels)
                t = tally[name]
                t[0] += sum(not k for k in known)
                t[1] += sum(k and label == task for label, k in zip(labels, known))
                t[2] += len(labels)
        for name, (to_base, right, total) in tally.items():
            if total:
                rows.append({"study": "template", "kind": kind, "variants": name, "prompts": total,
                             "kind_to_base": round(100 * to_base / total, 1),
                             "kind_routed": round(100 * right / total, 1)})
    return rows


def kinds_cv(features: Features, kinds: dict[str, list[str]], use: set[str], weight: float, routed: int,
             hub: float = HUB_CORRECTION) -> dict:
    """The classifier alone, as the switch runs it: on the features' first `routed` dims (its first view), each
    task's distance less `hub` times its mean's distance to the background."""
    order = list(features.train)
    shrinkage = SwitchConfig().shrinkage

    def stats(task: str, keep: torch.Tensor | None = None, without: str | None = None):
        found = features.variants[task]
        if found is None:
            return task_stats(features.train[task], None, keep)
        mask = torch.tensor([k in use and k != without for k in kinds[task]], dtype=torch.bool)
        return task_stats(features.train[task], (found[0][mask], found[1][mask]), keep, weight)

    def share_right(by_task: dict, task: str, x: torch.Tensor) -> tuple[int, int]:
        labels = list(by_task)
        first = [TaskStats(s.count, s.mean[:routed], s.scatter[:routed, :routed]) for s in by_task.values()]
        means, precision = torch.stack([s.mean for s in first]), pooled_precision(first, shrinkage)
        distances = squared_distances(x[:, :routed], means, precision)
        nearest = (distances - hub_offsets(first, precision, features.background, hub)).argmin(dim=1)
        return sum(labels[i] == task for i in nearest.tolist()), len(x)

    full = {t: stats(t) for t in order}
    by_task = {}
    for task in order:
        held = held_out_fold(len(features.train[task]))
        by_task[task] = share_right({**full, task: stats(task, ~held)}, task, features.train[task][held])
    held_out_rows = round(100 * sum(h for h, _ in by_task.values()) / sum(n for _, n in by_task.values()), 2)
    worst = min(by_task, key=lambda t: by_task[t][0] / by_task[t][1])  # a change may cost one task what others gain
    right = total = 0
    for task in order:
        wordings = features.wordings[task]
        distinct = sorted({w for w in wordings if w is not None})
        for wording in distinct if len(distinct) >= 2 else []:
            held = torch.tensor([w == wording for w in wordings])
            hits, n = share_right({**full, task: stats(task, ~held)}, task, features.train[task][held])
            right, total = right + hits, total + n
    left_out_wording = round(100 * right / total, 1) if total else None
    per_kind = []
    for kind in sorted({k for ks in kinds.values() for k in ks}):
        without = {t: stats(t, without=kind) for t in order}
        right = total = 0
        for task in order:
            found = features.variants[task]
            if found is None:
                continue
            held = held_out_fold(len(features.train[task]))
            of_kind = torch.tensor([k == kind for k in kinds[task]], dtype=torch.bool) & held[found[1]]
            hits, n = share_right({**without, task: stats(task, ~held, kind)}, task, found[0][of_kind])
            right, total = right + hits, total + n
        if total:
            per_kind.append(100 * right / total)
    return {"held_out_kind": round(sum(per_kind) / len(per_kind), 1), "left_out_wording": left_out_wording,
            "held_out_rows": held_out_rows, "worst_task": worst,
            "worst_task_held_out_rows": round(100 * by_task[worst][0] / by_task[worst][1], 1)}


ONE_SENTENCE_TASKS = {  # wordings: none of them in the benchmarks' data or rewordings
    "add": ["How much is {} added to {}?", "Tell me the total of {} and {}.", "Find {} plus {} for me.",
            "I need {} and {} summed up.", "Sum {} with {}, please."],
    "capital": ["Which city is the capital of {}?", "Name the capital city of {}.", "Tell me the capital of {}.",
                "{} has which capital?", "What's the seat of government in {}?"],
    "antonym": ["Give the opposite of the word {}.", "Which word means the opposite of {}?", "Name an antonym for {}.",
                "Tell me the antonym of {} please.", "Provide a word opposite in meaning to {}."],
    "plural": ["Write the plural form of {}.", "How do you make {} plural?", "Give the plural of the noun {}.",
               "Turn {} into its plural.", "What do you call more than one {}?"],
}


def one_sentence_cv(encoder, background: torch.Tensor) -> list[dict]:
    """One row per (training wordings, variants): see the module's docstring."""
    from switchcit.background import background_mean
    from switchcit.variants import encode_variants

    rng = random.Random(0)
    inputs = {"add": [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(80)],
              "capital": [(c,) for c in ["France", "Peru", "Kenya", "Japan", "Chile", "Norway", "Egypt", "Canada",
                                         "Spain", "Ghana", "Nepal", "Cuba", "Iran", "Italy", "Mali", "Oman", "Laos",
                                         "Fiji", "Chad", "Togo"] * 4],
              "antonym": [(w,) for w in ["happy", "tall", "early", "cold", "light", "open", "strong", "quiet",
                                         "rich", "soft", "fast", "full", "clean", "brave", "young", "heavy", "sharp",
                                         "wide", "bright", "deep"] * 4],
              "plural": [(n,) for n in ["child", "mouse", "city", "leaf", "box", "tooth", "knife", "baby", "wolf",
                                        "cactus", "goose", "hero", "story", "potato", "church", "wife", "man",
                                        "foot", "person", "bus"] * 4]}
    switch, mean = SwitchConfig(), background_mean(DEFAULT_ENCODER, encoder.encode)

    def prompts(task: str, wordings: list[int]) -> list[str]:
        return [ONE_SENTENCE_TASKS[task][wordings[i % len(wordings)]].format(*x) for i, x in enumerate(inputs[task])]

    rows, wordings = [], len(ONE_SENTENCE_TASKS["add"])
    for trained in (1, 3, wordings - 1):
        for with_variants in (False, True):
            right = to_base = total = caught = 0
            for held in range(wordings):  # the first wording learned, or the first `trained` after it
                train = [(held + i) % wordings for i in range(trained)]
                memories, tests = {}, {}
                for task in ONE_SENTENCE_TASKS:
                    texts = prompts(task, train)
                    found = encode_variants(encoder.encode, texts) if with_variants else None
                    memories[task] = remember(encoder.encode(texts), MemoryConfig(), switch, None, found)
                    tests[task] = encoder.encode([p for w in range(wordings) if w not in train
                                                  for p in prompts(task, [w])])
                fitted = build_switch(memories, switch, background=mean)
                for task, x in tests.items():
                    labels, _ = fitted.predict(x)
                    known = fitted.known(x, labels)
                    right += sum(label == task and k for label, k in zip(labels, known))
                    to_base, total = to_base + sum(not k for k in known), total + len(x)
                missed = sum(fitted.known(background, fitted.predict(background)[0])) / len(background)
                caught += (1 - missed) / wordings
            rows.append({"study": "one_sentence", "wordings_learned": trained, "variants": with_variants,
                         "routed": round(100 * right / total, 1), "to_base": round(100 * to_base / total, 1),
                         "background_caught": round(100 * caught, 1)})
    return rows


def margin_cv(features: Features, background: torch.Tensor, categories: list[str], margin: float,
              views: int, unknown_shrinkage: float) -> dict:
    order = list(features.train)
    switch = replace(SwitchConfig(), background_margin=margin, unknown_shrinkage=unknown_shrinkage)
    memory = MemoryConfig()
    memories = {t: remember(features.train[t], memory, switch, features.wordings[t], features.variants[t], views)
                for t in order}

    def to_base(mems: dict, x: torch.Tensor, mean: torch.Tensor) -> list[bool]:
        return (build_switch(mems, switch, background=mean, views=views).unknown_score(x) > 1).tolist()

    kinds = sorted(set(categories))
    random.Random(0).shuffle(kinds)
    fold_of = torch.tensor([kinds.index(c) % FOLDS for c in categories])
    caught = [sum(to_base(memories, background[fold_of == k], background[fold_of != k].mean(dim=0))) /
              int((fold_of == k).sum()) for k in range(FOLDS)]
    full_mean = background.mean(dim=0)
    rejected = total = rejected_alone = 0
    for task in order:
        held = held_out_fold(len(features.train[task]))
        wordings = [w for w, h in zip(features.wordings[task], held.tolist()) if not h]
        kept = kept_variants(features, task, held)
        refit = {**memories, task: remember(features.train[task][~held], memory, switch,
                                            wordings if features.wordings[task] else None, kept, views)}
        x = rows_and_variants(features.train[task], held.nonzero()[:, 0], features.variants[task])
        found = to_base(refit, x, full_mean)
        rejected, total = rejected + sum(found), total + len(found)
        rejected_alone += sum(to_base({task: refit[task]}, x, full_mean))  # a store of this task alone
    left_out = [sum(to_base({u: m for u, m in memories.items() if u != t}, features.train[t], full_mean)) /
                len(features.train[t]) for t in order] if len(order) > 1 else []
    return {"background_caught": round(100 * sum(caught) / FOLDS, 1),
            "held_out_to_base": round(100 * rejected / total, 1),
            "held_out_to_base_alone": round(100 * rejected_alone / total, 1),
            "task_left_out_caught": round(100 * sum(left_out) / len(left_out), 1) if left_out else None}


FEW_ROWS = (2, 5, 10)


def few_rows_cv(features: Features, background: torch.Tensor, uncertainties: list[float], views: int) -> list[dict]:
    """One row per (rows, mean uncertainty): see the module's docstring."""
    order = list(features.train)
    switch, memory = SwitchConfig(), MemoryConfig()
    generator = torch.Generator().manual_seed(0)
    halves = {t: torch.rand(len(features.train[t]), generator=generator) < 0.5 for t in order}  # True: held out
    half = {t: remember(features.train[t][~halves[t]], memory, switch, None, kept_variants(features, t, halves[t]),
                        views) for t in order}
    found = {(n, c): [0] * 6 for n in FEW_ROWS for c in uncertainties}  # hits and totals of the three sets
    for task in order:
        rows = features.train[task]
        others = torch.cat([features.train[u][halves[u]] for u in order if u != task])
        for n in FEW_ROWS:
            if n >= len(rows):
                continue
            later = torch.arange(len(rows)) >= n
            memories = {**half, task: remember(rows[:n], memory, switch, None, kept_variants(features, task, later),
                                               views)}
            fitted = build_switch(memories, switch, background=features.background, views=views)
            counts = torch.tensor([memories[t].stats.count for t in fitted.labels], dtype=torch.float64)
            for c in uncertainties:
                fitted.distance_scale = 1 + c / counts  # the classifier only: the fallback never reads it
                tally = found[(n, c)]
                for i, x in enumerate((rows[later], others, background)):
                    labels, _ = fitted.predict(x)
                    known = fitted.known(x, labels)
                    tally[2 * i] += sum(label == task and k for label, k in zip(labels, known))
                    tally[2 * i + 1] += len(x)
    return [{"study": "few_rows", "rows": n, "mean_uncertainty": c,
             **{key: round(100 * t[2 * i] / t[2 * i + 1], 2)
                for i, key in enumerate(("own", "others_taken", "background_taken"))}}
            for (n, c), t in found.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", default="cit")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--shape", default="as_built")
    parser.add_argument("--train-examples", type=int, default=500)
    parser.add_argument("--eval-examples", type=int, default=300, help="as the routing run whose cache is reused")
    parser.add_argument("--out", type=Path, default=Path("runs/routing-cv"))
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="as `bench --routing-only --encoder`")
    parser.add_argument("--weights", default="0,0.25,0.5")
    parser.add_argument("--margins", default="0,5,10,20")
    parser.add_argument("--unknown-shrinkages", default=str(SwitchConfig().unknown_shrinkage),
                        help="the regions' shrinkage toward the identity, comma-separated")
    parser.add_argument("--hub-corrections", default="0,0.2,0.3,0.4,0.5,0.6")
    parser.add_argument("--studies", default="kinds,hub,margin,few_rows",
                        help="which studies to run; a rerun replaces only their rows in OUT/routing-cv.json ("
                             "one_sentence alone reads no stream and writes OUT/routing-cv-one-sentence.json)")
    parser.add_argument("--mean-uncertainties", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--encoders", default=f"{EMBEDDED_ENCODER},{DEFAULT_ENCODER}",
                        help="the encoder study's encoders, comma-separated")
    args = parser.parse_args()
    studies = set(args.studies.split(","))

    encoder = load_encoder(args.encoder)
    requests = background_requests()
    background = encoder.encode([r["text"] for r in requests]).double()
    if studies == {"one_sentence"}:
        rows = one_sentence_cv(encoder, background)
        print("\n".join(json.dumps(r) for r in rows))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "routing-cv-one-sentence.json").write_text(json.dumps({"rows": rows}, indent=2))
        return
    stream = load_stream(args.stream, args.data_dir, args.train_examples, args.eval_examples, 0, args.shape)
    cache = args.out / "routing-cache" / RoutingConfig(encoder=args.encoder).features_folder()
    features = encode_stream(stream, encoder, cache)
    routed = features.others.shape[1] // views(args.encoder)
    kinds = {t.name: variant_kinds(t.train.prompts) for t in stream.tasks}
    every = sorted({k for ks in kinds.values() for k in ks})
    rows = []
    for weight in [float(w) for w in args.weights.split(",")] if "kinds" in studies else []:
        for use in ([every] if weight == 0 else [every] + [[k for k in every if k != drop] for drop in every]):
            rows.append({"study": "kinds", "weight": weight, "kinds": use if weight else [],
                         **kinds_cv(features, kinds, set(use), weight, routed)})
            print(json.dumps(rows[-1]), flush=True)
            if weight == 0:
                break
    for hub in [float(h) for h in args.hub_corrections.split(",")] if "hub" in studies else []:
        rows.append({"study": "hub", "hub_correction": hub, **kinds_cv(features, kinds, set(every), VARIANT_WEIGHT,
                                                                       routed, hub)})
        print(json.dumps(rows[-1]), flush=True)
    for margin in [float(m) for m in args.margins.split(",")] if "margin" in studies else []:
        for shrinkage in [float(u) for u in args.unknown_shrinkages.split(",")]:
            rows.append({"study": "margin", "margin": margin, "unknown_shrinkage": shrinkage,
                         **margin_cv(features, background, [r["category"] for r in requests], margin,
                                     views(args.encoder), shrinkage)})
            print(json.dumps(rows[-1]), flush=True)
    if "template" in studies:
        for row in template_cv(features, kinds, views(args.encoder)):
            rows.append(row)
            print(json.dumps(row), flush=True)
        for name, source in (("before", without_kinds(features, kinds, set(TEMPLATE_KINDS))), ("after", features)):
            rows.append({"study": "template", "variants": name, **margin_cv(
                source, background, [r["category"] for r in requests], SwitchConfig().background_margin,
                views(args.encoder), SwitchConfig().unknown_shrinkage)})
            print(json.dumps(rows[-1]), flush=True)
    for reference in args.encoders.split(",") if "encoder" in studies else []:
        same = reference == args.encoder  # the features and background requests encoded above
        other = encoder if same else load_encoder(reference)
        folder = RoutingConfig(encoder=reference).features_folder()
        found = features if same else encode_stream(stream, other, args.out / "routing-cache" / folder)
        count = views(reference)
        rows.append({"study": "encoder", "encoder": reference,
                     **kinds_cv(found, kinds, set(every), VARIANT_WEIGHT, found.others.shape[1] // count),
                     **margin_cv(found, background if same else other.encode([r["text"] for r in requests]).double(),
                                 [r["category"] for r in requests], SwitchConfig().background_margin, count,
                                 SwitchConfig().unknown_shrinkage)})
        print(json.dumps(rows[-1]), flush=True)
    if "few_rows" in studies:
        for row in few_rows_cv(features, background, [float(c) for c in args.mean_uncertainties.split(",")],
                               views(args.encoder)):
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = args.out / "routing-cv.json"
    kept = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in kept if r["study"] not in studies] + rows
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stream": args.stream, "shape": args.shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
