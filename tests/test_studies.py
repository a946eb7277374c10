"""Routers (MLP switch, nearest centroid, kNN) as classifiers, and the memory-budget and Arrow studies, on tiny real
models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_bench import bench

from switchcit import ContinualModel, SwitchcitError
from switchcit.bench.cli import DEFAULTS, PRESETS
from switchcit.bench.streams import load_stream
from switchcit.encoders import DEFAULT_ENCODER, slug
from switchcit.memory import build_switch
from switchcit.routers import fit_router


def clusters(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Three tasks whose features sit around three random directions: (train, test) per task."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=g) * 3
    make = {t: (lambda n, c=c: c + torch.randn(n, 16, generator=g)) for t, c in zip("abc", centres)}
    return {t: f(40) for t, f in make.items()}, {t: f(20) for t, f in make.items()}


@pytest.mark.parametrize("kind", ["mlp", "centroid", "knn"])
def test_each_router_separates_clustered_tasks(kind):
    train, test = clusters()
    router = fit_router(kind, train)
    for task, features in test.items():
        routed = router.route(features)
        assert sum(r == task for r in routed) >= 19, (kind, task, routed)


def test_centroid_router_uses_given_centroids_and_knn_votes_by_neighbours():
    train, test = clusters()
    swapped = {"a": train["b"].mean(0), "b": train["a"].mean(0), "c": train["c"].mean(0)}
    assert set(fit_router("centroid", train, centroids=swapped).route(test["a"])) == {"b"}
    one_each = {t: f[:1] for t, f in train.items()}
    assert fit_router("knn", one_each, k=1).route(train["c"][:1]) == ["c"]
    with pytest.raises(SwitchcitError, match="unknown router 'svm'"):
        fit_router("svm", train)
    with pytest.raises(SwitchcitError, match="k of at least 1"):
        fit_router("knn", train, k=0)


def test_memory_and_arrow_studies_on_a_smoke_run(tmp_path, other_tiny_model):
    out = tmp_path / "run"
    args = ("--preset", "smoke", "--out", out, "--methods", "switchcit", "--memory-percents", "1,50",
            "--study-encoders", f"{DEFAULT_ENCODER},base,{other_tiny_model}")
    results = bench(*args)
    tasks = results["tasks"]
    assert set(results["studies"]) == {"memory", "arrow"}
    arrow = results["studies"]["arrow"]
    assert arrow["top_k"] == 3 and set(arrow["final"]) == set(tasks)
    assert arrow["ap"] == pytest.approx(sum(arrow["final"].values()) / len(tasks))

    # the store's switch, rebuilt from its memories, routes as the store does
    smoke = {**DEFAULTS, **PRESETS["smoke"]}
    stream = load_stream("demo", None, smoke["train_examples"], smoke["eval_examples"], smoke["seed"])
    prompts = [e.prompt for t in stream.tasks for e in t.seen]
    cm = ContinualModel(out / "switchcit" / "store", fallback=False)
    store_routes = [r.task for r in cm.route(prompts)]
    [cached] = (out / "studies").glob(f"features-{slug(DEFAULT_ENCODER)}-*.safetensors")  # keyed by prompts too
    features = load_file(str(cached))
    seen = torch.cat([features[f"seen/{t}"] for t in tasks])
    rebuilt = build_switch({t.name: cm.store.memory(t) for t in cm.tasks}, cm.switch_config)
    assert rebuilt.predict(seen)[0] == cm.switch.predict(seen)[0] == store_routes

    rows = results["studies"]["memory"]["rows"]
    assert [(r["encoder"], r["percent"]) for r in rows] == [
        (e, p) for e in (DEFAULT_ENCODER, "base", str(other_tiny_model)) for p in (1.0, 50.0)]
    assert [r["kept_per_earlier_task"] for r in rows[:2]] == [[1] * (len(tasks) - 1), [12] * (len(tasks) - 1)]
    assert rows[0]["dim"] == 384 and rows[2]["dim"] != 384 and rows[4]["dim"] != 384
    assert all(len(r["accuracy"]) == len(tasks) and r["ap"] is not None for r in rows)
    report = (out / "report.md").read_text()
    assert "## Arrow" in report and "## Memory budget" in report and "## Router comparison" not in report
    assert (out / "memory.png").stat().st_size > 1000 and not (out / "routers.png").exists()

    generated = (out / "generations.jsonl").read_text()
    again = bench(*args)
    assert again["studies"] == results["studies"]
    assert (out / "generations.jsonl").read_text() == generated  # a rerun generates nothing anew
    added = bench("--preset", "smoke", "--out", out, "--methods", "oracle")  # a method added to the run
    assert list(added["methods"]) == ["switchcit", "oracle"] and added["studies"] == results["studies"]  # kept


def test_study_options_are_checked(tmp_path):
    with pytest.raises(SwitchcitError, match="not a list of numbers"):
        bench("--preset", "smoke", "--out", tmp_path / "b", "--memory-percents", "1%,2")
    with pytest.raises(SwitchcitError, match="outside"):
        bench("--preset", "smoke", "--out", tmp_path / "c", "--memory-percents", "0,1")
