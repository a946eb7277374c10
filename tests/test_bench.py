"""`switchcit bench`: streams and their prompts, the generation cache, and smoke runs of every method."""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import task_rows, write_jsonl

import switchcit
from switchcit import SwitchcitError
from switchcit.bench import add_parser, cmd_bench
from switchcit.bench.cache import GenerationCache
from switchcit.bench.hub import dialogue_records
from switchcit.bench.intervals import bootstrap, t_interval
from switchcit.bench.methods import METHODS, Setup, SwitchCIT
from switchcit.bench.protocol import switch_confusion
from switchcit.bench.report import render_seeds
from switchcit.bench.seeds import aggregate
from switchcit.bench.streams import (
    BenchTask,
    EvalExample,
    cit,
    cit_prompt,
    cit_references,
    headline_constraint,
    load_stream,
    user,
)

CIT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cit"
needs_cit = pytest.mark.skipif(not (CIT_DIR / "templates.json").is_file(), reason=f"no CIT data at {CIT_DIR}")
BIGBENCH_DIR = CIT_DIR.parent / "bigbench"


def parse(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "-q", *map(str, args)])


def bench(*args: str) -> dict:
    parsed = parse(*args)
    cmd_bench(parsed)
    return json.loads((Path(parsed.out) / "results.json").read_text())


def template_pattern(template: str) -> re.Pattern:
    """A filled template: its fixed text around anything in place of each {field}."""
    return re.compile(".*".join(map(re.escape, re.split(r"\{\w+\}", template))), re.DOTALL)


def fits(prompt: str, templates: list[str] | dict) -> bool:
    pool = [t for group in templates.values() for t in group] if isinstance(templates, dict) else templates
    return any(template_pattern(t).fullmatch(prompt) for t in pool)


# -- streams -----------------------------------------------------------------------------------------

@needs_cit
def test_cit_prompts_use_train_seen_and_unseen_wordings():
    templates = json.loads((CIT_DIR / "templates.json").read_text())
    stream = cit(CIT_DIR, 30, 10, seed=0)
    assert [t.name for t in stream.tasks] == ["simp", "emdg", "inqqg", "exp", "hgen"]
    for task in stream.tasks:
        assert len(task.train.examples) == 30 and len(task.seen) == 10
        assert all(fits(e.prompt, templates[task.name]["train"]) for e in task.train.examples)
        assert all(fits(e.prompt, templates[task.name]["eval_seen"]) for e in task.seen)
        assert all(fits(e.prompt, templates[task.name]["eval_unseen"]) for e in task.unseen)
        # each prompt records the template it was worded with
        assert all(fits(e.prompt, [e.wording]) for e in task.train.examples)
        assert all(fits(e.prompt, [e.wording]) for e in [*task.seen, *task.unseen])
        assert len(task.unseen) == (10 if task.name in ("simp", "inqqg", "hgen") else 0)
    simp = stream.tasks[0]
    assert len({e.prompt for e in simp.train.examples} & {e.prompt for e in simp.seen}) == 0
    assert all(e.source and e.source in e.prompt and len(e.references) == 10 for e in simp.seen)
    assert stream.tasks[1].lowercase and stream.tasks[4].lowercase and not stream.tasks[0].lowercase
    assert stream.tasks[4].secondary == ("constraint", "bleu")
    again, other = cit(CIT_DIR, 30, 10, seed=0), cit(CIT_DIR, 30, 10, seed=1)
    assert [e.prompt for e in again.tasks[0].train.examples] == [e.prompt for e in simp.train.examples]
    assert [e.prompt for e in other.tasks[0].train.examples] != [e.prompt for e in simp.train.examples]


@needs_cit
def test_cit_record_formatting():
    templates = json.loads((CIT_DIR / "templates.json").read_text())
    emdg = next(r for r in map(json.loads, (CIT_DIR / "emdg" / "train.jsonl").open()) if len(r["context"]) > 2)
    prompt, wording = cit_prompt("emdg", emdg, templates, "train", random.Random(0))
    assert wording == templates["emdg"]["train"][0]
    assert prompt.startswith(f'The associated emotion is "{emdg["emotion"]}"')
    assert prompt.endswith("\n".join(emdg["context"]))
    exp = json.loads((CIT_DIR / "exp" / "test.jsonl").open().readline())
    assert templates["exp"]["label_phrase"][exp["label"]] in cit_prompt("exp", exp, templates, "eval_seen",
                                                                        random.Random(0))[0]
    assert cit_references("exp", exp) == tuple(exp["explanations"]) and len(exp["explanations"]) == 3
    rng = random.Random(0)
    constraints = {headline_constraint("nec UNK in computer sales tie-up", rng) for _ in range(60)}
    assert ("start", "nec") in constraints and ("end", "tie-up") in constraints
    assert {w for k, w in constraints if k == "contain"} == {"nec", "in", "computer", "sales", "tie-up"}
    assert {w for k, w in (headline_constraint("## dead in <unk>", rng) for _ in range(30))} <= {"dead", "in"}
    hgen = cit(CIT_DIR, 5, 8, seed=0).tasks[4]
    for seen, unseen in zip(hgen.seen, hgen.unseen):
        assert seen.constraint == unseen.constraint and f'"{seen.constraint[1]}"' in unseen.prompt


@pytest.mark.skipif(not (BIGBENCH_DIR / "tasks.json").is_file(), reason=f"no BIG-bench data at {BIGBENCH_DIR}")
def test_bigbench_task_selection_and_metrics():
    stream = load_stream("bigbench", BIGBENCH_DIR, 5, 5, 0, tasks=["word_sorting", "winowhy"])
    assert [t.name for t in stream.tasks] == ["winowhy", "word_sorting"]  # stream order, whatever the order given
    assert [t.metric for t in stream.tasks] == ["choice", "exact_match"]  # by the task's kind
    winowhy = [json.loads(line) for line in (BIGBENCH_DIR / "winowhy" / "test.jsonl").open()]
    assert {e.references[0] for e in stream.tasks[0].seen} <= {c for r in winowhy for c in r["choices"]}
    with pytest.raises(SwitchcitError, match="--tasks \\['word_sort'\\]: the bigbench stream has winowhy"):
        load_stream("bigbench", BIGBENCH_DIR, 5, 5, 0, tasks=["word_sort"])


HUB_ROWS = {
    "GEM/wiki_auto_asset_turk": {"source": "A long sentence .", "target": "A short one."},
    "facebook/asset": {"original": "A long sentence.", "simplifications": ["Short.", "Brief."]},
    "Estwld/empathetic_dialogues_llm": {"emotion": "proud", "situation": "", "conversations": [
        {"role": "user", "content": "i won ."}, {"role": "assistant", "content": "great !"}]},
    "sentence-transformers/eli5": {"question": "Why is the sky blue?", "answer": "Scattering."},
    "esnli": {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": 2, "explanation_1": "No.",
              "explanation_2": "Asleep.", "explanation_3": "Not awake."},
    "Harvard/gigaword": {"document": "the un said on monday ...", "summary": "un says ###"},
}


class FakeStream(list):
    def skip(self, n):
        return FakeStream(self[n:])


def test_cit_stream_from_the_hub_without_network(monkeypatch):
    import sys
    import types

    def load_dataset(name, config=None, split=None, streaming=False):
        assert streaming
        return FakeStream([HUB_ROWS[name]] * 400)

    if not (CIT_DIR / "templates.json").is_file():
        pytest.skip("the CIT data folder is not here")
    monkeypatch.setenv("SWITCHCIT_CIT_TEMPLATES", str(CIT_DIR / "templates.json"))
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    stream = cit(None, 5, 3, seed=0)
    assert [len(t.train.examples) for t in stream.tasks] == [5] * 5
    exp = stream.tasks[3]
    assert "contradict each other" in exp.seen[0].prompt and exp.seen[0].references == ("No.", "Asleep.", "Not awake.")
    assert exp.train.examples[0].output == "No."
    assert stream.tasks[0].seen[0].references == ("Short.", "Brief.")
    assert stream.tasks[4].seen[0].constraint[1] in ("un", "says")


@needs_cit
def test_hub_dialogues_become_local_records():
    row = {"emotion": "proud", "situation": "s", "conversations": [
        {"role": "user", "content": "i won ."}, {"role": "assistant", "content": "great !"},
        {"role": "user", "content": "thanks ."}, {"role": "assistant", "content": "how ?"}]}
    records = list(dialogue_records(row))
    assert [r["context"] for r in records] == [["i won ."], ["i won .", "great !", "thanks ."]]
    assert [r["response"] for r in records] == ["great !", "how ?"]
    templates = json.loads((CIT_DIR / "templates.json").read_text())
    prompt, _ = cit_prompt("emdg", records[1], templates, "train", random.Random(0))
    assert prompt.endswith("i won .\ngreat !\nthanks .")


def make_user_stream(folder: Path, stream) -> Path:
    folder.mkdir()
    tasks = []
    for (train, _), metric in zip(stream[:2], ["exact_match", "rouge1"]):
        write_jsonl(folder / f"{train.name}.jsonl", task_rows(train)[:30])
        tasks.append({"name": train.name, "metric": metric, "test": 0.2})
    tasks[1].update(secondary=["bleu"], lowercase=True)
    (folder / "stream.json").write_text(json.dumps({"tasks": tasks}))
    return folder


def test_user_stream_folder(tmp_path, stream):
    folder = make_user_stream(tmp_path / "mine", stream)
    loaded = user(folder, n_train=100, n_eval=100, seed=0)
    first, second = loaded.tasks
    assert (first.name, first.metric, second.metric, second.secondary) == (stream[0][0].name, "exact_match",
                                                                          "rouge1", ("bleu",))
    assert len(first.train.examples) == 24 and len(first.seen) == 6 and second.lowercase
    assert not {e.prompt for e in first.train.examples} & {e.prompt for e in first.seen}
    spec = json.loads((folder / "stream.json").read_text())
    spec["tasks"][0]["metric"] = "accuracy"
    (folder / "stream.json").write_text(json.dumps(spec))
    with pytest.raises(SwitchcitError, match="unknown metric 'accuracy'"):
        user(folder, 10, 10, 0)


def test_switch_confusion_counts_prompts_sent_to_a_task_without_prompts_of_that_split(tmp_path, trained_store,
                                                                                     tiny_model, stream):
    from conftest import TINY_EXPERT

    shutil.copytree(trained_store, tmp_path / "switchcit" / "store")
    setup = Setup(tmp_path, str(tiny_model), TINY_EXPERT, GenerationCache(tmp_path / "g.jsonl"), 4, progress=False)
    method = SwitchCIT(setup)
    learned = [BenchTask(train.name, train, [], "exact_match") for train, _ in stream]
    for task in learned:
        method.learn(task.train)  # learned before: only marks the stream so far
    first, second = stream[0][1], stream[1][1]
    # the first task's "unseen" split holds the second task's prompts, which the switch sends to the second task
    odd = BenchTask(first.name, stream[0][0], [], "exact_match",
                    unseen=[EvalExample(e.prompt, (e.output,)) for e in second.examples])
    found = switch_confusion(method, [odd], learned, "unseen")
    assert found["labels"] == [first.name] and found["columns"] == [t.name for t in learned] + ["base"]
    assert sum(found["confusion"][0]) == len(second.examples)
    assert found["confusion"][0][1] > len(second.examples) / 2 and found["accuracy"] < 50


def test_cache_generates_each_request_once_and_survives_a_cut_line(tmp_path):
    calls = []

    def fake(batch):
        calls.append(batch)
        return [f"{k}:{p}" for k, p in batch]

    cache = GenerationCache(tmp_path / "g.jsonl", batch_size=2, progress=False)
    assert cache.generate([("a", "x"), ("a", "y"), ("b", "x"), ("a", "x")], fake) == ["a:x", "a:y", "b:x", "a:x"]
    assert sum(map(len, calls)) == 3
    with (tmp_path / "g.jsonl").open("a") as handle:
        handle.write('{"key": "a", "pro')  # a kill in the middle of a write
    again = GenerationCache(tmp_path / "g.jsonl", progress=False)
    assert again.generate([("a", "y"), ("c", "z")], fake) == ["a:y", "c:z"]
    assert calls[-1] == [("c", "z")]
    assert GenerationCache(tmp_path / "g.jsonl", progress=False).outputs[("c", "z")] == "c:z"


# -- smoke runs ----------------------------------------------------------------------------------------

def check_results(results: dict, out: Path, methods: list[str]) -> None:
    n = len(results["tasks"])
    assert list(results["methods"]) == methods
    for name, r in results["methods"].items():
        assert [len(row) for row in r["matrix"]] == [n] * n
        assert all((v is None) == (j > i) for i, row in enumerate(r["matrix"]) for j, v in enumerate(row))
        assert r["ap"] == pytest.approx(sum(r["matrix"][-1]) / n)
        assert r["bwt"] is not None and list(r["final"]) == results["tasks"]
        assert (out / f"heatmap_{name}.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert (out / "final_scores.png").exists() and "## Summary" in report
    assert results["machine"] and f"Machine: {results['machine']}" in report
    for exact in ("oracle", "zeroshot"):  # fixed weights per task: no forgetting by construction
        if exact in results["methods"]:
            assert results["methods"][exact]["bwt"] == 0
    if "switchcit" in results["methods"]:
        switch = results["methods"]["switchcit"]
        assert len(switch["switch_accuracy"]) == n and len(switch["confusion"]) == n
        assert switch["confusion_columns"] == [*results["tasks"], "base"]


def test_smoke_bench_on_the_demo_stream_resumes(tmp_path):
    out = tmp_path / "run"
    results = bench("--preset", "smoke", "--out", out, "--no-arrow", "--memory-percents", "none")
    check_results(results, out, list(METHODS))
    assert "studies" not in results  # both skipped; test_studies.py runs them
    assert results["config"]["stream"] == "demo" and results["versions"]["torch"]
    head = subprocess.run(["git", "-C", str(Path(switchcit.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:  # run from a checkout (the editable install): the results name the code that ran
        commit = results["versions"]["switchcit commit"]
        assert commit.removesuffix("+changes") == head.stdout.strip() and commit in (out / "report.md").read_text()
        assert all(r["commits"] == [commit] for r in results["methods"].values())  # each stage names its code
    else:
        assert "switchcit commit" not in results["versions"]
        assert all(r["commits"] == [] for r in results["methods"].values())

    generated = (out / "generations.jsonl").read_text()
    progress = json.loads((out / "seqlora" / "progress.json").read_text())
    earlier = [dict(progress["stages"][0], commit="0" * 40)]  # its first stage ran on other code
    (out / "seqlora" / "progress.json").write_text(json.dumps(dict(progress, stages=earlier)))
    resumed = bench("--preset", "smoke", "--out", out, "--methods", "seqlora")
    assert resumed["methods"]["seqlora"] == results["methods"]["seqlora"] | {
        "seconds": resumed["methods"]["seqlora"]["seconds"],
        "commits": ["0" * 40, *results["methods"]["seqlora"]["commits"]]}
    assert f"- seqlora: {'0' * 40}" in (out / "report.md").read_text()  # the report names both
    others = {k: v for k, v in results["methods"].items() if k != "seqlora"}  # run before, not asked for now:
    assert {k: v for k, v in resumed["methods"].items() if k != "seqlora"} == others  # kept, read from their progress
    assert list(resumed["methods"]) == list(results["methods"])
    assert (out / "generations.jsonl").read_text() == generated  # nothing generated twice

    with pytest.raises(SwitchcitError, match="other settings"):
        bench("--preset", "smoke", "--out", out, "--steps", "3")


@needs_cit
def test_smoke_bench_on_a_cit_sample(tmp_path):
    sample = tmp_path / "cit"
    for task in ("simp", "emdg", "inqqg", "exp", "hgen"):
        (sample / task).mkdir(parents=True)
        for split in ("train", "test"):
            lines = (CIT_DIR / task / f"{split}.jsonl").read_text().splitlines()[:20]
            (sample / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (sample / "templates.json").write_text((CIT_DIR / "templates.json").read_text())
    out = tmp_path / "run"
    methods = ["switchcit", "oracle", "seqlora", "zeroshot"]
    results = bench("--preset", "smoke", "--stream", "cit", "--data-dir", sample, "--out", out,
                    "--methods", ",".join(methods))
    check_results(results, out, methods)
    switch = results["methods"]["switchcit"]
    assert set(switch["final_unseen"]) == {"simp", "inqqg", "hgen"} and 0 <= switch["switch_unseen"]["accuracy"] <= 100
    assert set(switch["secondary"]["hgen"]) == {"constraint", "bleu"}
    report = (out / "report.md").read_text()
    assert "unseen instruction wordings" in report and "BERTScore F1, encoder all-MiniLM-L6-v2" in report
    assert set(results["studies"]["arrow"]["final_unseen"]) == {"simp", "inqqg", "hgen"}
    assert all(r["unseen_accuracy"] is not None for r in results["studies"]["memory"]["rows"])
    # every CIT task has rewordings: the same test rows, reworded, scored at every stage
    for r in results["methods"].values():
        assert [sum(v is not None for v in row) for row in r["matrix_reworded"]] == [1, 2, 3, 4, 5]
        assert r["ap_reworded"] == pytest.approx(sum(r["matrix_reworded"][-1]) / 5)
        assert set(r["bootstrap"]) == {"ap", "bwt", "final", "ap_reworded", "bwt_reworded", "final_reworded"}
    assert len(switch["switch_reworded_accuracy"]) == 5 and "Final score on reworded prompts" in report


def test_smoke_bench_on_a_user_stream(tmp_path, stream):
    folder = make_user_stream(tmp_path / "mine", stream)
    out = tmp_path / "run"
    with pytest.raises(SwitchcitError, match="unknown method"):
        bench("--preset", "smoke", "--stream", folder, "--out", out, "--methods", "seqlora,finetune")
    results = bench("--preset", "smoke", "--stream", folder, "--out", out, "--methods", "switchcit,replay_1,seqft",
                    "--seqft-lr", "1e-4", "--no-arrow", "--memory-percents", "none")
    check_results(results, out, ["switchcit", "replay_1", "seqft"])
    assert results["methods"]["replay_1"]["secondary"][stream[1][0].name]["bleu"] >= 0
    assert results["config"]["seqft_learning_rate"] == 1e-4
    assert "all weights at learning rate 0.0001" in (out / "report.md").read_text()


# -- seeds and intervals -------------------------------------------------------------------------------

def test_t_interval_and_paired_bootstrap():
    low, high = t_interval([50.0, 54.0])
    assert (low + high) / 2 == pytest.approx(52.0) and high - low == pytest.approx(2 * 12.7062 * 2, rel=1e-4)
    assert t_interval([50.0]) is None and t_interval([3.0, 3.0, 3.0]) == [3.0, 3.0]
    learned = {"a": [100.0, 0.0, 100.0, 0.0] * 5, "b": [50.0, 60.0] * 10}
    final = {"a": [v - 10 for v in learned["a"]], "b": learned["b"]}
    found = bootstrap(final, learned, last="b")
    assert found["bwt"] == pytest.approx([-10.0, -10.0])  # the same prompts resampled before and after
    assert found["final"]["a"][0] < 40.0 < found["final"]["a"][1]
    assert found["final"]["b"][0] < 55.0 < found["final"]["b"][1]
    assert found["ap"][0] < (40.0 + 55.0) / 2 < found["ap"][1]
    assert bootstrap(final, learned, last="b") == found  # seeded


def test_aggregate_over_seeds():
    def run(ap, bwt, boot):
        method = {"ap": ap, "bwt": bwt, "ap_reworded": ap - 5, "bwt_reworded": None, "final": {"x": ap},
                  "final_reworded": {"x": ap - 5}, "seconds": 10.0, "bootstrap": {"ap": boot, "final": {"x": boot}},
                  "commits": [f"c{ap:.0f}"]}
        oracle = {**method, "ap": ap + 1, "ap_reworded": ap + 2 if ap < 52 else None}
        config = {"stream": "s", "seed": 0, "model": "m", "train_examples": 8, "steps": 2, "batch_size": 2,
                  "learning_rate": 1e-3, "eval_examples": 4, "max_new_tokens": 8}
        memory = [{"encoder": "e", "percent": 0.01, "accuracy": [100.0, ap + 40], "ap": ap - 1}]
        return {"config": config, "tasks": ["x"], "metrics": {}, "methods": {"switchcit": method, "oracle": oracle},
                "versions": {"switchcit commit": f"c{ap:.0f}"}, "studies": {"memory": {"rows": memory}}}

    results = aggregate({0: run(50.0, -1.0, [48.0, 52.0]), 1: run(54.0, 1.0, [51.0, 57.0])})
    versus = results["methods"]["switchcit"]["minus_oracle"]  # paired by seed; a seed without a figure: none
    assert versus["ap"]["per_seed"] == [-1.0, -1.0] and versus["ap"]["ci95"] == pytest.approx([-1.0, -1.0])
    assert versus["ap_reworded"]["per_seed"] == [-7.0, None] and versus["ap_reworded"]["mean"] is None
    assert "minus_oracle" not in results["methods"]["oracle"]
    assert "| switchcit | -1.0 [-1.0, -1.0] | - |" in render_seeds(results)
    assert "switchcit commit c50" in render_seeds(results)  # the code the first seed ran on
    assert results["methods"]["switchcit"]["commits"] == ["c50", "c54"] and "- switchcit: c50, c54" in render_seeds(
        results)  # and each method's, over its seeds
    assert results["seeds"] == [0, 1] and "seed" not in results["config"]
    (memory,) = results["memory"]  # the memory study over seeds: last stage's accuracy, AP, AP minus the oracle's
    assert memory["accuracy"]["per_seed"] == [90.0, 94.0] and memory["ap"]["mean"] == 51.0
    assert memory["ap_minus_oracle"]["per_seed"] == [-2.0, -2.0]
    assert "| `e` | 0.01 | 92.0 [" in render_seeds(results)
    switch = results["methods"]["switchcit"]
    assert switch["ap"]["mean"] == 52.0 and switch["ap"]["per_seed"] == [50.0, 54.0]
    assert switch["ap"]["ci95"] == pytest.approx(t_interval([50.0, 54.0]))
    assert switch["ap"]["per_seed_ci95"] == [[48.0, 52.0], [51.0, 57.0]]
    assert switch["ap_reworded"]["mean"] == 47.0 and switch["final_reworded"]["x"]["mean"] == 47.0
    assert switch["final"]["x"]["per_seed_ci95"] == [[48.0, 52.0], [51.0, 57.0]]
    assert switch["bwt_reworded"] == {"mean": None, "ci95": None, "per_seed": [None, None],
                                      "per_seed_ci95": [None, None]}


def test_two_seed_smoke_run_aggregates_and_resumes(tmp_path):
    out = tmp_path / "run"
    selected = tmp_path / "selected.json"
    selected.write_text(json.dumps({"tasks": ["reverse", {"name": "last-word"}]}))  # names, or tasks.json's objects
    args = ("--preset", "smoke", "--out", out, "--methods", "zeroshot,seqlora", "--tasks", selected,
            "--seeds", "0,1", "--memory-percents", "none", "--no-arrow")
    results = bench(*args)
    seeds = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    assert results["seeds"] == [0, 1] and results["tasks"] == ["reverse", "last-word"]
    assert results["runs"] == {"0": "seed-0", "1": "seed-1"} and [seeds[s]["config"]["seed"] for s in (0, 1)] == [0, 1]
    for name, r in results["methods"].items():
        assert set(r) == {"ap", "bwt", "ap_reworded", "bwt_reworded", "final", "final_reworded", "seconds", "commits"}
        for key in ("ap", "bwt"):
            values = [seeds[s]["methods"][name][key] for s in (0, 1)]
            assert r[key]["per_seed"] == values and r[key]["mean"] == pytest.approx(sum(values) / 2)
            assert r[key]["ci95"] == pytest.approx(t_interval(values))
            assert r[key]["per_seed_ci95"] == [seeds[s]["methods"][name]["bootstrap"][key] for s in (0, 1)]
        assert list(r["final"]) == ["reverse", "last-word"] and r["final_reworded"] == {}  # the demo has none
    assert "seeds 0, 1" in (out / "report.md").read_text() and (out / "summary.png").stat().st_size > 1000
    generated = {s: (out / f"seed-{s}" / "generations.jsonl").read_text() for s in (0, 1)}
    assert bench(*args)["methods"] == results["methods"]  # resumed from the seeds' progress: nothing rerun
    assert {s: (out / f"seed-{s}" / "generations.jsonl").read_text() for s in (0, 1)} == generated
    with pytest.raises(SwitchcitError, match="single-seed run"):
        bench(*args[:3], out / "seed-0", *args[4:])
    with pytest.raises(SwitchcitError, match="other settings"):  # one seed into the seeds' folder
        bench(*args[:8], "--memory-percents", "none", "--no-arrow")
    with pytest.raises(SwitchcitError, match="not a list of distinct seeds"):
        bench(*args[:8], "--seeds", "0,0")


def test_task_selection_rule_tries_tasks_in_stream_order(tmp_path):
    out = tmp_path / "select"
    cmd_bench(parse("--preset", "smoke", "--out", out, "--tasks", "initials,reverse", "--select-tasks", "1",
                    "--eval-examples", "3"))
    selected = json.loads((out / "selected.json").read_text())
    tried = [c["name"] for c in selected["candidates"]]
    assert tried[0] == "reverse" and "10 points above zero-shot" in selected["rule"]
    for c in selected["candidates"]:  # each task an ordinary one-task run of the oracle and zero-shot
        methods = json.loads((out / c["name"] / "results.json").read_text())["methods"]
        assert list(methods) == ["oracle", "zeroshot"] and len(methods["oracle"]["matrix"]) == 1
        assert (c["learned"], c["zeroshot"]) == (methods["oracle"]["ap"], methods["zeroshot"]["ap"])
        assert c["kept"] == (c["learned"] - max(c["zeroshot"], c["one_answer"]) >= 10)
        assert 0 < c["one_answer"] <= 100
    assert selected["tasks"] == [c["name"] for c in selected["candidates"] if c["kept"]]
    assert tried == (["reverse"] if selected["candidates"][0]["kept"] else ["reverse", "initials"])  # stops at 1
