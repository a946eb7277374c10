"""Shared fixtures: a tiny random Llama with a real BPE tokenizer, a 3-task stream, and a store trained on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchcit import ContinualModel, ExpertConfig, Task
from switchcit.demo import demo_stream
from switchcit.testing import build_tiny_model

# Tiny models gain nothing from threads, and spinning OpenMP threads of parallel processes on 2 cores slow
# everything down many times over: one thread here and in every subprocess the tests start.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

TINY_EXPERT = ExpertConfig(learning_rate=1e-2, max_steps=25, epochs=100, batch_size=8)


@pytest.fixture(scope="session")
def stream() -> list[tuple[Task, Task]]:
    """Three interfering word-list tasks (train, test), 80 training and 30 held-out examples each."""
    return demo_stream(n_train=80, n_test=30, seed=0)[:3]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, stream) -> Path:
    corpus = [e.prompt + " " + e.output for train, test in stream for e in train.examples + test.examples]
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", corpus, seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory, stream) -> Path:
    corpus = [e.prompt + " " + e.output for train, _ in stream for e in train.examples]
    return build_tiny_model(tmp_path_factory.mktemp("models") / "other", corpus, seed=1)


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory, tiny_model, stream) -> Path:
    """A store that learned the 3-task stream; copy it (see `store_copy`) before changing it."""
    root = tmp_path_factory.mktemp("stores") / "trained"
    cm = ContinualModel(root, base_model=str(tiny_model), expert_config=TINY_EXPERT, progress=False)
    for train, _ in stream:
        cm.learn(train)
    return root


@pytest.fixture
def store_copy(trained_store, tmp_path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(trained_store, target)
    return target


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows as the file or folder `path` names: .jsonl, .json (an array), .csv, .tsv, .parquet, or a save_to_disk
    folder (no suffix)."""
    import csv

    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix in (".csv", ".tsv"):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, list(rows[0]), delimiter="," if path.suffix == ".csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def task_rows(task: Task) -> list[dict]:
    return [{"instruction": e.prompt.split("\n\n")[0], "input": e.prompt.split("\n\n")[1], "output": e.output}
            for e in task.examples]


def run_cli(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "switchcit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"switchcit {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a store except the lock, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}
