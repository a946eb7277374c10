"""Bad input is refused with one clear line, a non-zero exit, and a store left byte-for-byte as it was."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli, snapshot, task_rows, write_jsonl

from switchcit import ContinualModel, Store, SwitchcitError


@pytest.fixture
def good_data(stream, tmp_path):
    _, test = stream[0]
    return write_jsonl(tmp_path / "good.jsonl", task_rows(test)[:10])


def _assert_refused(proc, pattern):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("switchcit: error: "), proc.stderr
    assert pattern in lines[0]


@pytest.mark.parametrize("case, pattern", [
    ("missing_file", "data file not found"),
    ("malformed_json", "bad.jsonl:2: malformed JSON"),
    ("empty_task", "no examples"),
    ("missing_output", "bad.jsonl:1: Alpaca rows need"),
    ("duplicate_name", "already in store"),
    ("reserved_name", "reserved"),
    ("malformed_name", "invalid task name"),
])
def test_bad_learn_input_leaves_store_unchanged(case, pattern, store_copy, tmp_path, good_data, stream, tiny_model):
    bad = tmp_path / "bad.jsonl"
    task, data = "fresh", good_data
    if case == "missing_file":
        data = tmp_path / "nope.jsonl"
    elif case == "malformed_json":
        data = write_jsonl(bad, [{"instruction": "a", "output": "b"}, '{"instruction": '])
    elif case == "empty_task":
        data = write_jsonl(bad, ["", "  "])
    elif case == "missing_output":
        data = write_jsonl(bad, [{"instruction": "a"}])
    elif case == "duplicate_name":
        task = stream[0][0].name
    elif case == "reserved_name":
        task = "base"
    else:
        task = "Bad Name"
    before = snapshot(store_copy)
    proc = run_cli("learn", "--store", store_copy, "--task", task, "--data", data, "--model", tiny_model, "-q")
    _assert_refused(proc, pattern)
    assert snapshot(store_copy) == before


def test_store_of_another_base_model_is_refused(store_copy, good_data, other_tiny_model):
    before = snapshot(store_copy)
    proc = run_cli("learn", "--store", store_copy, "--task", "fresh", "--data", good_data,
                   "--model", other_tiny_model, "-q")
    _assert_refused(proc, "different model")
    assert snapshot(store_copy) == before


def test_corrupt_manifest_is_refused(store_copy, good_data, tiny_model):
    manifest = store_copy / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    before = snapshot(store_copy)
    for args in (["learn", "--task", "fresh", "--data", good_data, "--model", tiny_model], ["route", "hello"],
                 ["tasks"]):
        proc = run_cli(args[0], "--store", store_copy, *args[1:])
        _assert_refused(proc, "manifest.json is corrupt")
    assert snapshot(store_copy) == before


def test_missing_store_and_foreign_folder(tmp_path, good_data, tiny_model):
    _assert_refused(run_cli("route", "--store", tmp_path / "none", "hi"), "no switchcit store")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_cli("learn", "--store", foreign, "--task", "t", "--data", good_data, "--model", tiny_model)
    _assert_refused(proc, "not a switchcit store")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_sigkill_during_learn_keeps_previous_store(store_copy, stream, tiny_model, tmp_path):
    train, test = stream[1]
    data = write_jsonl(tmp_path / "big.jsonl", task_rows(train) * 5)
    before = snapshot(store_copy)
    proc = subprocess.Popen([sys.executable, "-m", "switchcit", "learn", "--store", str(store_copy), "--task", "late",
                             "--data", str(data), "--model", str(tiny_model), "--max-steps", "100000",
                             "--epochs", "10000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "learn late" not in proc.stderr.read(200) and time.time() < deadline:
        pass
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = snapshot(store_copy)  # all the same, but for the trainer checkpoints that --resume continues from
    assert {k: v for k, v in after.items() if not k.startswith(".checkpoints/")} == before
    routed = run_cli("route", "--store", store_copy, "--json", "--no-fallback", *test.prompts[:5], check=True).stdout
    assert [json.loads(line)["task"] for line in routed.splitlines()].count(test.name) >= 4
    run_cli("learn", "--store", store_copy, "--task", "late", "--data", data, "--model", tiny_model,
            "--max-steps", "3", "-q", check=True)
    assert Store(store_copy).read().task_names[-1] == "late"
    assert not (store_copy / ".checkpoints").exists()  # a finished learn leaves no checkpoints


def test_orphans_from_a_crash_are_swept_on_next_commit(store_copy, stream, tiny_model):
    orphan = store_copy / "adapters" / "ghost" / "deadbeef"
    orphan.mkdir(parents=True)
    (orphan / "adapter_model.safetensors").write_bytes(b"half")
    cm = ContinualModel(store_copy, progress=False)
    cm.expert_config.max_steps = 2
    train, _ = stream[0]
    cm.learn(train.__class__("extra", train.examples[:8]))
    assert not (store_copy / "adapters" / "ghost").exists()


def test_lock_serialises_writers(store_copy):
    import fcntl

    store = Store(store_copy)
    with open(store_copy / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        code = ("import sys; from switchcit import Store\n"
                "with Store(sys.argv[1]).lock(): print('got it')")
        proc = subprocess.Popen([sys.executable, "-c", code, str(store_copy)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None  # still waiting for the lock
        fcntl.flock(handle, fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=30)
    assert out.strip() == "got it" and "waiting for another writer" in err
    assert store.read().tasks


def test_newer_format_is_refused(store_copy):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    (store_copy / "manifest.json").write_text(json.dumps(dict(manifest, format=99)))
    with pytest.raises(SwitchcitError, match="upgrade switchcit"):
        Store(store_copy).read()


def test_help_is_fast():
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "switchcit", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - started < 2.0
