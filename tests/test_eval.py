"""`switchcit eval` on held-out rows, and `generate --out` writing answers in the input's format."""

import csv
import json
from collections import Counter

import pytest
from conftest import snapshot, task_rows, write_jsonl, write_rows

from switchcit import ContinualModel
from switchcit.bench.evaluate import KEEPS_EVERYDAY, everyday
from switchcit.bench.metrics import exact_match
from switchcit.bench.routing import general_requests
from switchcit.cli import main

TOKENS = "6"


def _heldout(stream, n: int = 6) -> dict[str, list[dict]]:
    return {test.name: task_rows(test)[:n] for _, test in stream}


def _run(capsys, *args: str) -> str:
    assert main([*map(str, args)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_eval_reports_routing_confusion_and_oracle_as_the_library_computes_them(trained_store, stream, tmp_path,
                                                                                 capsys):
    rows = _heldout(stream)
    rows["reverse"] += task_rows(stream[1][1])[6:9]  # initials prompts filed as reverse: the switch sends them away
    labels = [t for t, r in rows.items() for _ in r]
    prompts = [f"{r['instruction']}\n\n{r['input']}" for task_rows_ in rows.values() for r in task_rows_]
    cm = ContinualModel(trained_store, progress=False)
    routed = cm.generate(prompts, max_new_tokens=int(TOKENS))
    forced = cm.generate(prompts, labels, max_new_tokens=int(TOKENS))
    flat = [r for task_rows_ in rows.values() for r in task_rows_]
    for i in range(0, len(flat), 2):  # half the references are the oracle's answers, so scores are not all 0
        flat[i]["output"] = forced[i].output if forced[i].output.strip() else flat[i]["output"]
    folder = tmp_path / "heldout"
    folder.mkdir()
    for name, task_rows_ in rows.items():
        write_jsonl(folder / f"{name}.jsonl", task_rows_)

    out = tmp_path / "report"
    report = json.loads(_run(capsys, "eval", "--store", trained_store, "--data", folder, "--json", "--max-new-tokens",
                             TOKENS, "-q", "--out", out))
    assert report["metric"] == "exact" and list(report["tasks"]) == list(rows)
    start = 0
    for name, task_rows_ in rows.items():
        span = range(start, start + len(task_rows_))
        start += len(task_rows_)
        went = Counter(routed[i].task for i in span)
        references = [flat[i]["output"] for i in span]
        assert report["tasks"][name] == {
            "n": len(span), "routing_accuracy": 100 * went[name] / len(span), "to_base": 100 * went["base"] / len(span),
            "confusion": dict(went), "score": exact_match([routed[i].output for i in span], references),
            "oracle_score": exact_match([forced[i].output for i in span], references)}
    assert report["tasks"]["reverse"]["confusion"].get("initials", 0) >= 1  # the planted rows
    assert report["overall"]["n"] == len(prompts)
    assert report["overall"]["routing_accuracy"] == 100 * sum(a.task == t for a, t in zip(routed, labels)) / len(labels)
    assert 0 < report["overall"]["oracle_score"] <= 100
    general = cm.route(general_requests())  # everyday requests of no task: where the fallback lets them go
    kept = Counter(r.task for r in general if r.task != "base")
    to_base = 100 * (len(general) - sum(kept.values())) / len(general)
    assert report["everyday"] == {"n": len(general), "to_base": to_base, "kept_by": dict(kept.most_common())}
    assert json.loads((out / "eval.json").read_text()) == report
    assert "| `reverse` |" in (out / "report.md").read_text()
    assert "everyday requests of no task" in (out / "report.md").read_text()
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"

    table = _run(capsys, "eval", "--store", trained_store, "--data", folder, "--max-new-tokens", TOKENS, "-q")
    assert table.splitlines()[0].split() == ["task", "n", "routing", "to", "base", "score", "oracle", "misrouted", "to"]
    assert any(line.startswith("reverse") and "initials" in line for line in table.splitlines())
    assert table.splitlines()[-1].startswith(f"everyday requests of no task ({len(general)}, switchcit's own)")


def test_eval_reads_one_file_with_task_or_a_task_column(trained_store, stream, tmp_path, capsys):
    rows = _heldout(stream, 3)
    tagged = write_rows(tmp_path / "tagged.csv", [{"category": t, **r} for t, task_rows_ in rows.items()
                                                  for r in task_rows_])
    report = json.loads(_run(capsys, "eval", "--store", trained_store, "--data", tagged, "--columns", "task=category",
                             "--json", "--max-new-tokens", TOKENS, "-q", "--max-examples", "2", "--metric", "rouge"))
    assert report["metric"] == "rouge" and {t: r["n"] for t, r in report["tasks"].items()} == {t: 2 for t in rows}
    assert all(0 <= r["score"] <= 100 for r in report["tasks"].values())
    one = write_rows(tmp_path / "reverse.parquet", rows["reverse"])
    report = json.loads(_run(capsys, "eval", "--store", trained_store, "--data", one, "--task", "reverse", "--json",
                             "--max-new-tokens", TOKENS, "-q"))
    assert list(report["tasks"]) == ["reverse"] and report["tasks"]["reverse"]["n"] == 3
    report = json.loads(_run(capsys, "eval", "--store", trained_store, "--data", tagged, "--columns", "task=category",
                             "--task", "initials", "--json", "--max-new-tokens", TOKENS, "-q"))
    assert list(report["tasks"]) == ["initials"]


def test_eval_refuses_rows_without_a_learned_task_in_one_line(trained_store, stream, tmp_path, capsys):
    rows = _heldout(stream, 2)["reverse"]
    unnamed = write_rows(tmp_path / "unnamed.jsonl", rows)
    stranger = write_rows(tmp_path / "stranger.csv", [{"task": "translate", **r} for r in rows])
    before = snapshot(trained_store)
    for args, message in [(["--data", unnamed], "unnamed.jsonl:1: no task for this row: give --task NAME"),
                          (["--data", stranger], "stranger.csv row 1: task 'translate' is not in the store"),
                          (["--data", unnamed, "--task", "translate"], "task 'translate' is not in the store"),
                          (["--data", unnamed, "--task", "reverse", "--out", trained_store / "report"],
                           "is inside store"),
                          (["--data", unnamed, "--task", "reverse", "--max-examples", "0"], "at least 1")]:
        assert main(["eval", "--store", str(trained_store), *map(str, args), "-q"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert snapshot(trained_store) == before


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_generate_out_writes_the_input_rows_with_answers_in_their_format(trained_store, stream, tmp_path, capsys,
                                                                         suffix):
    rows = [{"id": str(i), **{k: v for k, v in r.items() if k != "output"}}
            for i, r in enumerate(task_rows(stream[0][1])[:5] + task_rows(stream[2][1])[:5])]
    source = write_rows(tmp_path / f"in{suffix}", rows)
    common = ["generate", "--store", trained_store, "--file", source, "--max-new-tokens", TOKENS, "--batch-size", "1",
              "-q"]
    printed = [json.loads(line) for line in _run(capsys, *common, "--json").splitlines()]
    out = tmp_path / f"out{suffix}"
    _run(capsys, *common, "--out", out)
    if suffix == ".jsonl":
        written = [json.loads(line) for line in out.read_text().splitlines()]
    elif suffix == ".csv":
        with out.open(newline="") as handle:
            written = [{**r, "confidence": float(r["confidence"])} for r in csv.DictReader(handle)]
    else:
        import pyarrow.parquet as pq

        written = pq.read_table(out).to_pylist()
        assert pq.ParquetFile(out).num_row_groups == 2  # 8 rows (8 batches of 1) at a time, written as answered
    assert [list(r) for r in written] == [[*rows[0], "task", "confidence", "output"]] * len(rows)
    assert [{k: r[k] for k in rows[0]} for r in written] == rows
    assert [(r["task"], r["output"]) for r in written] == [(p["task"], p["output"]) for p in printed]
    assert [r["confidence"] for r in written] == pytest.approx([p["confidence"] for p in printed])


def test_a_parquet_schema_holds_columns_the_first_rows_leave_empty(tmp_path):
    import pyarrow.parquet as pq

    from switchcit.formats import RowWriter

    with RowWriter(tmp_path / "out.parquet", {"confidence": "float64"}) as writer:
        writer.write([{"prompt": "a", "confidence": None, "note": None}])
        writer.write([{"prompt": "b", "confidence": 0.5, "note": "kept"}])
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == [{"prompt": "a", "confidence": None, "note": None},
                                                                  {"prompt": "b", "confidence": 0.5, "note": "kept"}]


def test_generate_out_refuses_the_store_and_the_input(trained_store, stream, tmp_path, capsys):
    source = write_rows(tmp_path / "in.jsonl", task_rows(stream[0][1])[:2])
    for out, message in [(trained_store / "answers.jsonl", "is inside store"), (source, "is the input"),
                         (tmp_path / "answers.xlsx", "cannot write '.xlsx' files")]:
        assert main(["generate", "--store", str(trained_store), "--file", str(source), "--out", str(out), "-q"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (trained_store / "answers.jsonl").exists()


@pytest.mark.slow
def test_eval_agrees_with_the_demo(tmp_path, capsys):
    """On the demo's store and held-out prompts, eval's routing and exact match are the demo's figures."""
    from switchcit.demo import demo_stream, run_demo

    store = tmp_path / "demo-store"
    demo = run_demo(store=store, progress=False, out=lambda *_: None)
    folder = tmp_path / "heldout"
    folder.mkdir()
    for _, test in demo_stream(200, 30, 0):
        write_jsonl(folder / f"{test.name}.jsonl", task_rows(test))
    report = json.loads(_run(capsys, "eval", "--store", store, "--data", folder, "--json", "--max-new-tokens", "16",
                             "-q"))
    for name, figures in demo["tasks"].items():
        assert report["tasks"][name]["routing_accuracy"] == pytest.approx(figures["routing"])
        assert report["tasks"][name]["score"] == pytest.approx(figures["final"])


def test_a_metric_whose_package_is_missing_is_one_line_naming_the_extra(trained_store, stream, tmp_path):
    """rouge-score comes with switchcit[bench]; without it, eval says so in one line (it said 'unexpected')."""
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:2])
    code = ("import sys; sys.modules['rouge_score'] = None; from switchcit.cli import main; "
            f"sys.exit(main(['eval', '--store', {str(trained_store)!r}, '--data', {str(data)!r}, "
            f"'--task', {stream[0][1].name!r}, '--metric', 'rouge', '-q', '--max-new-tokens', '2']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]  # beside the model's loading bar
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert "'rouge_score'" in errors[0] and "switchcit[bench]" in errors[0] and "unexpected" not in errors[0]


# Bare questions of the kind anyone asks an assistant, written for this test (none is in general_requests.txt): a
# task learned from rows like these keeps everyday requests, which only its owner can say it should not.
ADVICE = ["How can I fall asleep faster at night?", "What should I pack for a weekend of hiking?",
          "How do I get a red wine stain out of a carpet?", "What is a cheap dinner I can make for four people?",
          "How much water should I drink in a day?", "What are some good habits for saving money?",
          "How do I keep my houseplants alive in winter?", "What should I say in a thank-you note to my aunt?",
          "How can I stop procrastinating on my homework?", "What is the best way to learn to cook?",
          "How do I ask my boss for a day off?", "What can I do on a rainy Sunday with kids?",
          "How do I make my coffee taste less bitter?", "What exercises help with a sore lower back?",
          "How should I prepare for a job interview tomorrow?", "What is a nice gift for a friend who likes books?",
          "How do I unclog a kitchen sink?", "What are some ways to make new friends in a new city?",
          "How long should I rest between workouts?", "What can I bring to a potluck dinner?",
          "How do I write a polite complaint to my landlord?", "What is a good routine for a relaxing evening?",
          "How do I stop my glasses from fogging up?", "What should I plant in a small balcony garden?"]


def test_learn_notes_a_task_that_keeps_everyday_requests_and_says_nothing_of_one_that_does_not(
        store_copy, tiny_model, stream, tmp_path, capsys):
    def learn(name: str, rows: list[dict]) -> list[str]:
        data = write_rows(tmp_path / f"{name}.jsonl", rows)
        assert main(["learn", "--store", str(store_copy), "--task", name, "--data", str(data), "--model",
                     str(tiny_model), "--max-steps", "1", "-q"]) == 0
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]

    assert learn("again", task_rows(stream[0][0])) == []  # a word task whose rows say what they ask
    [said] = learn("advice", [{"instruction": q, "output": "Here is what I would do."} for q in ADVICE])
    kept = everyday(ContinualModel(store_copy, progress=False))["kept_by"]["advice"]
    assert 100 * kept / len(general_requests()) >= KEEPS_EVERYDAY
    assert said.startswith(f"note: task 'advice' keeps {kept} of switchcit's {len(general_requests())} everyday")
    assert said.endswith("learn it again with --replace")
