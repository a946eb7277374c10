"""Data-parallel training: `accelerate launch --num_processes 2 -m switchcit learn` on CPU (gloo)."""

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


def test_two_processes_match_one(tmp_path, stream, tiny_model):
    data = write_jsonl(tmp_path / "words.jsonl", task_rows(stream[0][0])[:40])
    args = ["learn", "--task", "words", "--data", str(data), "--model", str(tiny_model), "--max-steps", "6",
            "--batch-size", "8", "--lr", "1e-2", "-q"]
    run_cli(*args, "--store", tmp_path / "one", check=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "switchcit", *args,
              "--store", str(tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("learned task 'words'") == 1
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max() < 1e-4, key
    assert any(one[k].abs().sum() > 0 for k in one if "lora_B" in k)
