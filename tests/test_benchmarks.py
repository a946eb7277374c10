"""The benchmark scripts run end to end on tiny shapes and print the JSON their READMEs promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_routed_generation_json(tiny_model):
    out = json.loads(_run("routed_generation.py", "--json", "--model", tiny_model, "--adapters", "2", "--batch", "4",
                          "--new-tokens", "3", "--repeats", "1").splitlines()[-1])
    assert set(out["tokens_per_s"]) >= {"base", "single_adapter", "mixed", "naive"}
    assert all(v > 0 for v in out["tokens_per_s"].values())
    assert 0 < out["switch_overhead"] < 1
    assert out["mixed_vs_naive"] == out["tokens_per_s"]["mixed"] / out["tokens_per_s"]["naive"]


def test_routed_generation_sweep_writes_a_table_json_and_plot(tmp_path):
    out = _run("routed_generation.py", "--sweep", "--model", "random:tiny", "--points", "3x2,1x2", "--new-tokens", "2",
               "--repeats", "1", "--out", tmp_path)
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["config"]["adapters"], r["config"]["batch"]) for r in rows] == [(1, 2), (3, 2)]
    assert set(rows[1]["tokens_per_s"]) == {"base", "single_adapter", "mixed", "mixed_dense", "mixed_gather",
                                            "peft_mixed"}
    assert rows[1]["adapters_in_batch"] == 2 and rows[1]["stacked_mb"] > rows[0]["stacked_mb"] > 0
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert out.splitlines()[-1].split()[:3] == ["3", "2", "dense"]  # the table's last row


def test_learn_scaling_json(tiny_model):
    out = json.loads(_run("learn_scaling.py", "--json", "--model", tiny_model, "--tasks", "2", "--steps", "1",
                          "--examples", "16").splitlines()[-1])
    assert len(out["learn_time_s"]) == len(out["switch_train_s"]) == len(out["store_bytes_per_task"]) == 2
    assert out["learn_time_ratio"] == out["learn_time_s"][-1] / out["learn_time_s"][0]
    assert all(b > 0 for b in out["store_bytes_per_task"])


def test_gpu_script_runs_on_cpu_with_a_tiny_shape(tmp_path):
    out = tmp_path / "gpu.jsonl"
    _run("gpu_routed_generation.py", "--out", out, "--shapes", "tiny", "--batches", "4", "--adapters", "2",
         "--device", "cpu", "--dtype", "float32", "--new-tokens", "3", "--prompt-len", "8", "--repeats", "1")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["config"]["shape"] == "tiny"
    assert set(rows[0]["tokens_per_s"]) == {"base", "single_adapter", "peft_mixed", "mixed", "naive"}


def test_data_loading_compares_the_old_reader_and_measures_parquet(tmp_path):
    out = json.loads(_run("data_loading.py", "--json", "--rows", "300", "--repeats", "1").splitlines()[-1])
    assert out["rows"] == 300 and set(out["seconds"]) == {"old", "new"}
    path = tmp_path / "rows.parquet"
    written = json.loads(_run("data_loading.py", "--json", "--write-parquet", path, "--mb", "0.5"))
    loaded = json.loads(_run("data_loading.py", "--json", "--load", path))
    assert loaded["rows"] == written["rows"] == 100_000 and loaded["examples_mb"] > 0 and loaded["peak_rss_mb"] > 0
