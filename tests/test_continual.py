"""The real paths on a tiny random Llama: learn several tasks, reload, route, generate (mixed batches)."""

import json

import pytest
import torch
from conftest import TINY_EXPERT, run_cli, snapshot, task_rows, write_jsonl

from switchcit import BASE, ContinualModel, MemoryConfig, SwitchcitError, Task
from switchcit.gaussian import VARIANT_WEIGHT


def test_switch_routes_held_out_prompts(trained_store, stream):
    cm = ContinualModel(trained_store, progress=False, fallback=False)  # the classifier alone; fallback: test_beyond
    assert cm.task_names == [train.name for train, _ in stream]
    prompts = [p for _, test in stream for p in test.prompts]
    truth = [test.name for _, test in stream for _ in test.examples]
    routes = cm.route(prompts)
    accuracy = sum(r.task == t for r, t in zip(routes, truth)) / len(truth)
    assert accuracy >= 0.95
    assert all(0.0 <= r.confidence <= 1.0 for r in routes)


def test_store_layout_is_plain_peft(trained_store, stream):
    from peft import PeftConfig

    manifest = json.loads((trained_store / "manifest.json").read_text())
    assert manifest["format"] == 1 and len(manifest["tasks"]) == len(stream)
    for entry in manifest["tasks"]:
        folder = trained_store / entry["adapter"]
        assert (folder / "adapter_model.safetensors").is_file()
        assert PeftConfig.from_pretrained(str(folder)).r == TINY_EXPERT.r
        assert entry["memory_size"] == MemoryConfig().size_for(entry["examples"])
    # the current switch, and the previous one until the next commit (readers that opened it still find it)
    assert sorted(p.name for p in (trained_store / "switch").iterdir()) == [f"v{len(stream) - 1}", f"v{len(stream)}"]


def test_memory_keeps_features_only(trained_store):
    from safetensors.torch import load_file

    manifest = json.loads((trained_store / "manifest.json").read_text())
    for entry in manifest["tasks"]:
        tensors = load_file(str(trained_store / entry["memory"]))
        # vectors, the fallback region and the Gaussian switch's statistics: no text
        assert sorted(tensors) == ["centroid", "count", "features", "heldout_count", "heldout_factor",
                                   "heldout_moments", "mean", "radius", "scatter"]
        dim = manifest["encoder"]["dim"]
        assert tensors["features"].shape == (entry["memory_size"], dim)
        assert tensors["scatter"].shape == (dim, dim)
        # the rows, and up to five variants of each at VARIANT_WEIGHT (gaussian.task_stats)
        assert entry["examples"] < tensors["count"].item() <= entry["examples"] * (1 + 5 * VARIANT_WEIGHT)
        assert tensors["heldout_moments"].shape == (dim, dim)
        assert tensors["heldout_count"].item() > entry["examples"]  # held-out rows and their variants


def test_mixed_batch_equals_each_task_alone(trained_store, stream):
    cm = ContinualModel(trained_store, progress=False)
    prompts = [test.prompts[i] for i in range(4) for _, test in stream]
    tasks = [test.name for i in range(4) for _, test in stream]
    prompts, tasks = prompts + prompts[:3], tasks + [BASE] * 3
    mixed = [a.output for a in cm.generate(prompts, tasks, max_new_tokens=12, batch_size=len(prompts))]
    for task in {*tasks}:
        rows = [i for i, t in enumerate(tasks) if t == task]
        alone = [a.output for a in cm.generate([prompts[i] for i in rows], [task] * len(rows), max_new_tokens=12)]
        assert [mixed[i] for i in rows] == alone
    # the adapters really differ: the same prompt gives different outputs (or logits) per task
    ids = torch.tensor([cm.tokenizer(prompts[0])["input_ids"]])
    logits = []
    with torch.no_grad():
        for task in [test.name for _, test in stream]:
            logits.append(cm.model(input_ids=ids, adapter_names=[task]).logits)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    assert not torch.allclose(logits[1], logits[2], atol=1e-3)
    with pytest.raises(SwitchcitError, match="one task per prompt"):
        cm.generate(prompts, tasks[:-1])


def test_learned_adapter_lowers_loss_on_its_task(trained_store, stream):
    from switchcit.supervision import collate, tokenize_example

    cm = ContinualModel(trained_store, progress=False)
    cm.load_adapters()
    train, _ = stream[0]
    rows = [tokenize_example(cm.tokenizer, e, 512) for e in train.examples[:16]]
    batch = collate(rows, cm.tokenizer.pad_token_id)
    with torch.no_grad():
        own = cm.model(**batch, adapter_names=[train.name] * 16).loss
        base = cm.model(**batch, adapter_names=["__base__"] * 16).loss
    assert own < base


def test_reload_in_new_process_routes_and_generates(trained_store, stream):
    prompts = [test.prompts[0] for _, test in stream]
    proc = run_cli("generate", "--store", trained_store, "--json", "--max-new-tokens", "6", "-q", "--no-fallback",
                   *prompts, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["output"], str) and 0 <= r["confidence"] <= 1 for r in rows)
    here = ContinualModel(trained_store, progress=False, fallback=False).generate(prompts, max_new_tokens=6)
    assert [(r["task"], r["output"]) for r in rows] == [(g.task, g.output) for g in here]
    assert {g.task for g in here} <= {test.name for _, test in stream}


def test_route_and_tasks_commands(trained_store, stream, tmp_path):
    _, test = stream[1]
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", [{k: v for k, v in row.items() if k != "output"}
                                                           for row in task_rows(test)[:5]])
    proc = run_cli("route", "--store", trained_store, "--json", "--no-fallback", "--file", prompt_file, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == test.prompts[:5]
    assert [r["task"] for r in rows].count(test.name) >= 4
    tasks = json.loads(run_cli("tasks", "--store", trained_store, "--json", check=True).stdout)
    assert [t["name"] for t in tasks] == [train.name for train, _ in stream]


def test_replace_retrains_one_task_atomically(store_copy, stream, tiny_model):
    before = json.loads((store_copy / "manifest.json").read_text())
    cm = ContinualModel(store_copy, progress=False, expert_config=TINY_EXPERT)
    train, _ = stream[0]
    with pytest.raises(SwitchcitError, match="already in store"):
        cm.learn(train)
    cm.learn(Task(train.name, train.examples[:40]), replace=True)
    after = json.loads((store_copy / "manifest.json").read_text())
    assert [t["name"] for t in after["tasks"]] == [t.name for t, _ in stream[1:]] + [train.name]
    assert after["tasks"][-1]["examples"] == 40
    old_adapter = before["tasks"][0]["adapter"]
    assert (store_copy / old_adapter).exists()  # kept until the next commit: readers that opened it find it
    cm.forget(stream[1][0].name)
    assert not (store_copy / old_adapter).exists()
    assert not (store_copy / before["switch"]).exists()


def test_base_model_encoder(tmp_path, tiny_model, stream):
    """The paper's encoder style: the base model's own last-token state, adapters switched off."""
    cm = ContinualModel(tmp_path / "s", base_model=str(tiny_model), encoder="base", progress=False,
                        expert_config=TINY_EXPERT)
    before = cm.encoder.encode(stream[0][1].prompts[:4])
    for train, _ in stream[:2]:
        cm.learn(train)
    after = cm.encoder.encode(stream[0][1].prompts[:4])
    torch.testing.assert_close(before, after)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["encoder"]["reference"] == "base"
    assert snapshot(tmp_path / "s")


@pytest.mark.parametrize("dense", [True, False])
def test_fast_mixed_path_matches_peft(trained_store, stream, dense):
    """Both batched layouts (masked dense products, grouped products) give PEFT's logits and PEFT's generations."""
    from switchcit.mixed import MixedLoRA

    cm = ContinualModel(trained_store, progress=False)
    cm.load_adapters()
    names = [test.name for _, test in stream] * 2 + ["__base__", stream[0][0].name]
    prompts = [test.prompts[i] for i in range(2) for _, test in stream] + [stream[1][1].prompts[5]] * 2
    batch = cm.tokenizer(prompts, return_tensors="pt", padding=True)
    assert MixedLoRA.supports(cm.model, cm.task_names)
    mixed = MixedLoRA(cm.model, cm.task_names, dense=dense)
    with torch.no_grad():
        reference = cm.model(**batch, adapter_names=names).logits
        with mixed.rows(names):
            fast = cm.model(**batch).logits
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)
    tasks = [n if n != "__base__" else BASE for n in names]
    fast_out = cm.generate(prompts, tasks, max_new_tokens=10)
    cm.adapters.fast_mixed = False
    assert cm.generate(prompts, tasks, max_new_tokens=10) == fast_out
