"""`learn` on the Trainer: resuming a killed run, eval loss, logs, LoRA and memory options."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, snapshot, task_rows, write_jsonl
from safetensors.torch import load_file

from switchcit import Store
from switchcit.training import complete, last_checkpoint


@pytest.fixture
def words(tmp_path, stream) -> Path:
    return write_jsonl(tmp_path / "words.jsonl", task_rows(stream[0][0])[:40])


def _learn(store: Path, data: Path, model: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("learn", "--store", store, "--task", "words", "--data", data, "--model", model, "--lr", "1e-2",
                   "--batch-size", "4", "-q", *extra, check=check)


def _adapter(store: Path) -> dict:
    manifest = Store(store).read()
    return load_file(str(store / manifest.tasks[0].adapter / "adapter_model.safetensors"))


def _close(one: dict, other: dict, tolerance: float = 1e-4) -> bool:
    return one.keys() == other.keys() and all((one[k] - other[k]).abs().max() < tolerance for k in one)


def test_a_checkpoint_cut_short_while_written_is_never_resumed_from(tmp_path):
    """A run killed while the Trainer writes a checkpoint's last file leaves it empty or cut short: the newest
    checkpoint that parses is the one to resume from."""
    for step, state in ((5, {"global_step": 5}), (10, None), (15, '{"global_st')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    assert [complete(tmp_path / f"checkpoint-{s}") for s in (5, 10, 15)] == [True, False, False]
    assert last_checkpoint(tmp_path) == (tmp_path / "checkpoint-5", 5)


def test_killed_learn_resumes_to_the_same_adapter(tmp_path, words, tiny_model):
    budget = ("--max-steps", "300", "--epochs", "100", "--save-steps", "5")
    _learn(tmp_path / "whole", words, tiny_model, *budget)
    store = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "switchcit", "learn", "--store", str(store), "--task", "words",
                             "--data", str(words), "--model", str(tiny_model), "--lr", "1e-2", "--batch-size", "4",
                             "-q", *budget], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(complete(c) for c in store.glob(".checkpoints/words/*/checkpoint-*")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Store(store).exists()  # killed before its commit: nothing learned, a checkpoint kept
    resumed = _learn(store, words, tiny_model, *budget, "--resume")
    step = int(resumed.stderr.split("resuming from step ")[1].split()[0])
    assert 5 <= step < 300
    assert _close(_adapter(tmp_path / "whole"), _adapter(store))
    assert not (store / ".checkpoints").exists()


def test_resume_needs_a_matching_checkpoint(store_copy, words, tiny_model):
    before = snapshot(store_copy)
    proc = _learn(store_copy, words, tiny_model, "--resume", "--max-steps", "3", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "no checkpoint of this task for this data and configuration" in proc.stderr
    assert snapshot(store_copy) == before


def test_eval_loss_from_a_held_out_fraction_or_a_file(tmp_path, words, tiny_model, stream):
    proc = _learn(tmp_path / "fraction", words, tiny_model, "--max-steps", "4", "--eval-fraction", "0.2")
    assert "eval loss" in proc.stdout
    listed = json.loads(run_cli("tasks", "--store", tmp_path / "fraction", "--json", check=True).stdout)
    assert listed[0]["eval_loss"] > 0 and listed[0]["examples"] == 40

    held_out = write_jsonl(tmp_path / "held.jsonl", task_rows(stream[0][1])[:10])
    _learn(tmp_path / "file", words, tiny_model, "--max-steps", "4", "--eval-data", held_out, "--eval-steps", "2")
    assert Store(tmp_path / "file").read().tasks[0].eval_loss > 0

    both = _learn(tmp_path / "both", words, tiny_model, "--eval-data", held_out, "--eval-fraction", "0.1", check=False)
    assert both.returncode == 1 and "not both" in both.stderr and not (tmp_path / "both").exists()


def test_without_eval_data_no_eval_loss_is_recorded(trained_store):
    assert all(t.eval_loss is None for t in Store(trained_store).read().tasks)


@pytest.mark.parametrize("reporter", ["jsonl", "tensorboard"])
def test_training_logs(tmp_path, words, tiny_model, reporter):
    logs = tmp_path / "logs"
    _learn(tmp_path / "store", words, tiny_model, "--max-steps", "4", "--logging-steps", "2", "--report-to",
           reporter, "--log-dir", logs)
    if reporter == "jsonl":
        rows = [json.loads(line) for line in (logs / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [2, 4]
        assert all(r["loss"] > 0 and "learning_rate" in r for r in rows if "loss" in r)
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(logs))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [2, 4]


def test_logs_go_to_the_store_by_default(tmp_path, words, tiny_model):
    _learn(tmp_path / "store", words, tiny_model, "--max-steps", "2", "--report-to", "jsonl")
    assert (tmp_path / "store" / "logs" / "words" / "log.jsonl").is_file()


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, words, tiny_model):
    _learn(tmp_path / "plain", words, tiny_model, "--max-steps", "4")
    _learn(tmp_path / "checkpointed", words, tiny_model, "--max-steps", "4", "--gradient-checkpointing")
    assert _close(_adapter(tmp_path / "plain"), _adapter(tmp_path / "checkpointed"))


def test_lora_options_reach_the_adapter(tmp_path, words, tiny_model):
    _learn(tmp_path / "store", words, tiny_model, "--max-steps", "2", "--rank", "4", "--lora-alpha", "16",
           "--lora-dropout", "0.1", "--target-modules", "q_proj,v_proj", "--max-length", "64")
    entry = Store(tmp_path / "store").read().tasks[0]
    config = json.loads((tmp_path / "store" / entry.adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16, 0.1)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert {k.split(".")[-3] for k in _adapter(tmp_path / "store")} == {"q_proj", "v_proj"}
    assert entry.lora["max_length"] == 64


def test_unknown_target_module_is_one_line(store_copy, words, tiny_model):
    before = snapshot(store_copy)
    proc = _learn(store_copy, words, tiny_model, "--target-modules", "no_such_proj", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "--target-modules" in proc.stderr
    assert snapshot(store_copy) == before


def test_learn_help_shows_every_training_option_with_its_default():
    text = " ".join(run_cli("learn", "--help", check=True).stdout.split())
    for option in ("--grad-accum GRAD_ACCUM forward passes per optimizer step", "(default: 1)",
                   "--gradient-checkpointing", "(default: off)", "--lora-alpha", "default: 2 x rank",
                   "--lora-dropout", "--target-modules", "(default: all-linear)", "--max-length", "(default: 512)",
                   "--eval-data", "--eval-fraction", "--eval-steps", "--report-to {none,jsonl,tensorboard,wandb}",
                   "--log-dir", "--resume", "--save-steps"):
        assert option in text, option


def test_a_four_bit_base_without_a_gpu_is_one_line(tmp_path, words, tiny_model):
    proc = _learn(tmp_path / "store", words, tiny_model, "--dtype", "nf4", "--device", "cpu", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "needs a CUDA GPU and the bitsandbytes package" in proc.stderr


def test_the_import_arrow_runs_one_way():
    """experts.py (the expert's knobs, training it) -> training.py (the Trainer) -> supervision.py (rows, batches,
    the answer-only loss); nothing imports back but the config's name, for annotations."""
    import ast

    from switchcit import experts, supervision, training

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level and n.module
                and id(n) not in typing_only}

    assert "training" in imported(experts) and "supervision" in imported(training)
    assert not {"experts", "training"} & imported(supervision) and "experts" not in imported(training)
