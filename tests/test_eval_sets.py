"""The routing benchmark's own evaluation sets: rewordings, data shapes, BIG-bench, everyday requests."""

import json
from pathlib import Path

import pytest

from switchcit.bench.routing import general_requests, other_prompts
from switchcit.bench.streams import SHAPES, bigbench, cit, load_stream, rewordings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_cit = pytest.mark.skipif(not (SHARED / "cit" / "templates.json").is_file(),
                               reason="no CIT data beside the checkout")
needs_bigbench = pytest.mark.skipif(not (SHARED / "bigbench" / "tasks.json").is_file(),
                                    reason="no BIG-bench data beside the checkout")


def test_rewordings_are_new_and_varied():
    cit_rewordings = rewordings()["cit"]
    for task, wordings in cit_rewordings.items():
        flat = [w for ws in wordings.values() for w in ws] if isinstance(wordings, dict) else wordings
        assert len(set(flat)) >= 10, task
    assert sum(len(spec["templates"]) >= 3 for spec in rewordings()["bigbench"].values()) >= 12


@needs_cit
def test_cit_rewordings_are_none_of_the_streams_wordings():
    templates = json.loads((SHARED / "cit" / "templates.json").read_text())
    stream = cit(SHARED / "cit", 20, 10, seed=0)
    for t in stream.tasks:
        known = json.dumps(templates[t.name])
        assert len(t.reworded) == len(t.seen) == 10
        assert all(e.wording not in known for e in t.reworded)
        assert [e.references for e in t.reworded] == [e.references for e in t.seen]  # the same test rows


@needs_cit
def test_shapes_of_the_training_rows():
    as_built, inline, one = (cit(SHARED / "cit", 40, 5, 0, shape) for shape in SHAPES)
    simp = [s.tasks[0].train for s in (as_built, inline, one)]
    assert simp[0].prompts == simp[1].prompts and len(set(simp[0].wordings)) > 1
    assert set(simp[1].wordings) == {None}  # the whole prompt is the instruction: no wording to hold out
    assert len(set(simp[2].wordings)) == 1 and simp[2].prompts != simp[0].prompts
    assert [e.prompt for e in as_built.tasks[0].seen] == [e.prompt for e in one.tasks[0].seen]


@needs_bigbench
def test_bigbench_stream_read_in_place():
    stream = load_stream("bigbench", SHARED / "bigbench", 10, 5, 0)
    order = [t["name"] for t in json.loads((SHARED / "bigbench" / "tasks.json").read_text())["tasks"]]
    assert [t.name for t in stream.tasks] == order and len(order) == 48
    sorting = stream.tasks[order.index("word_sorting")]
    assert sorting.train.prompts[0].startswith("Sort the following words alphabetically:\n\n")
    assert sorting.train.wordings[0] == "Sort the following words alphabetically:"
    assert len([t for t in stream.tasks if t.reworded]) >= 12
    assert all(e.prompt != s.prompt for t in stream.tasks for e, s in zip(t.reworded, t.seen))
    assert bigbench(SHARED / "bigbench", 10, 5, 0).tasks[0].seen == stream.tasks[0].seen  # seeded


def test_general_requests_are_everyday_and_of_no_stream():
    requests = general_requests()
    assert len(requests) >= 200 and len(set(requests)) == len(requests)
    assert not set(requests) & set(other_prompts(load_stream("demo", None, 20, 5, 0)))
