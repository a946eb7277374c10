"""Data parallelism and gradient accumulation through the Trainer: every way of making a batch of 8 trains
the same adapter. Two processes run under `torchrun` on CPU (gloo): `accelerate launch --cpu` starts one."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import run_cli, task_rows, write_jsonl
from safetensors.torch import load_file

from switchcit import Store


def _adapter(store: Path) -> dict:
    manifest = Store(store).read()
    assert len(manifest.tasks) == 1 and len(list((store / "adapters" / "words").iterdir())) == 1
    return load_file(str(store / manifest.tasks[0].adapter / "adapter_model.safetensors"))


def _assert_same(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for key in one:
        assert (one[key] - other[key]).abs().max() < 1e-4, key
    assert any(one[k].abs().sum() > 0 for k in one if "lora_B" in k)


def _learn_args(tmp_path, stream, tiny_model) -> list[str]:
    data = write_jsonl(tmp_path / "words.jsonl", task_rows(stream[0][0])[:40])
    return ["learn", "--task", "words", "--data", str(data), "--model", str(tiny_model), "--max-steps", "6",
            "--lr", "1e-2", "-q"]


def test_two_processes_match_one(tmp_path, stream, tiny_model):
    args = _learn_args(tmp_path, stream, tiny_model)
    run_cli(*args, "--batch-size", "8", "--store", tmp_path / "one", check=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "switchcit", *args,
              "--batch-size", "4", "--store", str(tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("learned task 'words'") == 1  # only the first process writes the store
    _assert_same(_adapter(tmp_path / "one"), _adapter(tmp_path / "two"))


def test_gradient_accumulation_matches_one_batch(tmp_path, stream, tiny_model):
    args = _learn_args(tmp_path, stream, tiny_model)
    run_cli(*args, "--batch-size", "8", "--store", tmp_path / "one", check=True)
    run_cli(*args, "--batch-size", "4", "--grad-accum", "2", "--store", tmp_path / "accumulated", check=True)
    _assert_same(_adapter(tmp_path / "one"), _adapter(tmp_path / "accumulated"))
