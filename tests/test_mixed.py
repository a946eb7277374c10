"""Mixed-adapter batches (mixed.py) with few and many adapters equal PEFT's own, row by row (float32)."""

from __future__ import annotations

import pytest
import torch

from switchcit.adapters import AdapterPool
from switchcit.batching import Batcher, Sequence
from switchcit.data import encode_prompt
from switchcit.detokenize import IncrementalText
from switchcit.generation import Route, generate_routed
from switchcit.mixed import DENSE_UP_TO, NO_ADAPTER, MixedLoRA, padded_places

MANY = DENSE_UP_TO + 4


@pytest.fixture(scope="module")
def pool(tiny_model, tmp_path_factory) -> AdapterPool:
    """A pool of MANY random adapters (ranks 4 and 8 in turn, all linear layers), loaded from their folders."""
    from peft import LoraConfig, get_peft_model

    from switchcit.models import load_base_model

    folder = tmp_path_factory.mktemp("adapters")
    base, _ = load_base_model(str(tiny_model), "cpu", None)
    torch.manual_seed(0)
    configs = [LoraConfig(r=4 + 4 * (k % 2), lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
               for k in range(MANY)]
    peft = get_peft_model(base, configs[0], adapter_name="t0")
    for k in range(1, MANY):
        peft.add_adapter(f"t{k}", configs[k])
    peft.save_pretrained(folder)
    pool = AdapterPool(str(tiny_model), "cpu", None, lambda model: None)
    pool.sync({f"t{k}": folder / f"t{k}" for k in range(MANY)}, load_missing=True)
    return pool


def names_of(adapters: int, rows: int, in_order: bool = False) -> list[str]:
    """Rows out of adapter order, adapters repeated and skipped, and base-model rows among them; or rows already in
    adapter order, base-model rows last (the grouped layout then moves no rows)."""
    if in_order:
        return [f"t{k * adapters // rows}" for k in range(rows - 2)] + [NO_ADAPTER] * 2
    return [NO_ADAPTER if i % 5 == 3 else f"t{(7 * i) % adapters}" for i in range(rows)]


@pytest.mark.parametrize("adapters", [3, MANY])
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("in_order", [False, True])
def test_both_layouts_give_peft_logits(pool, stream, adapters, dense, in_order):
    names = names_of(adapters, 12, in_order)
    prompts = [stream[i % 3][1].prompts[i] for i in range(len(names))]  # of different lengths: padded
    batch = pool.tokenizer(prompts, return_tensors="pt", padding=True)
    mixed = MixedLoRA(pool.model, [f"t{k}" for k in range(adapters)], dense=dense)
    with torch.no_grad():
        reference = pool.model(**batch, adapter_names=names).logits
        with mixed.rows(names):
            fast = pool.model(**batch).logits
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dense", [True, False])
def test_a_batch_of_one_adapter_gives_peft_logits(pool, stream, dense):
    """Every row on one adapter: its own slice of the stack, in both layouts, prefill and a decoding step."""
    names = ["t5"] * 6
    prompts = [stream[i % 3][1].prompts[i] for i in range(len(names))]
    batch = pool.tokenizer(prompts, return_tensors="pt", padding=True)
    mixed = MixedLoRA(pool.model, [f"t{k}" for k in range(MANY)], dense=dense)
    with torch.no_grad():
        pool.model.set_adapter("t5")
        reference = pool.model(**batch).logits, pool.model(input_ids=batch["input_ids"][:, :1]).logits
        with mixed.rows(names):
            fast = pool.model(**batch).logits, pool.model(input_ids=batch["input_ids"][:, :1]).logits
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("names", [
    [f"t{k}" for k in range(MANY)],  # one row per adapter, in order: the padded view copies nothing
    [f"t{(3 * i) % MANY}" for i in range(MANY - 2)] + [NO_ADAPTER] * 2,  # some adapters absent, rows out of order
    ["t1"] * 12 + ["t5", "t2"],  # padding would more than double the rows: grouped products
])
def test_a_decoding_step_with_many_adapters_gives_peft_logits(pool, names):
    """One token per row (a decoding step) takes the padded batched products where they fit."""
    ids = torch.arange(len(names))[:, None] % 50 + 5
    counts = torch.bincount(torch.tensor(sorted(int(n[1:]) for n in names if n != NO_ADAPTER)), minlength=MANY)
    mixed = MixedLoRA(pool.model, [f"t{k}" for k in range(MANY)], dense=False)
    assert (padded_places(torch.tensor(sorted(int(n[1:]) for n in names if n != NO_ADAPTER)), counts) is None) \
        == (names[0] == "t1")
    with torch.no_grad():
        reference = pool.model(input_ids=ids, adapter_names=names).logits
        with mixed.rows(names):
            fast = pool.model(input_ids=ids).logits
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("names", [
    ["t6", "t2", "t6", NO_ADAPTER, "t2", "t6"],  # two of the stacked adapters, rows out of order
    ["t2", "t2", "t5", "t5", "t7", NO_ADAPTER],  # in order, base rows last
])
def test_a_batch_on_few_of_many_adapters_gives_peft_logits(pool, stream, names):
    """At most half the stacked adapters in the batch: their weights apart, prefill and a decoding step."""
    prompts = [stream[i % 3][1].prompts[i] for i in range(len(names))]
    batch = pool.tokenizer(prompts, return_tensors="pt", padding=True)
    mixed = MixedLoRA(pool.model, [f"t{k}" for k in range(MANY)], dense=False)
    with torch.no_grad():
        reference = [pool.model(**batch, adapter_names=names).logits,
                     pool.model(input_ids=batch["input_ids"][:, :1], adapter_names=names).logits]
        for _ in range(2):  # the second batch on the same adapters reuses their weights
            with mixed.rows(names):
                fast = [pool.model(**batch).logits, pool.model(input_ids=batch["input_ids"][:, :1]).logits]
            torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)
    assert mixed._present[0] == tuple(sorted({int(n[1:]) for n in names if n != NO_ADAPTER}))


def test_padded_places_put_each_row_in_its_adapters_group():
    adapters = torch.tensor([0, 0, 2, 3, 3, 3])  # in adapter order; adapter 1 has no row
    places, per_group = padded_places(adapters, torch.bincount(adapters, minlength=4))
    assert per_group == 3 and places.tolist() == [0, 1, 6, 9, 10, 11]
    assert padded_places(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1])) == (None, 1)
    assert padded_places(torch.tensor([0, 0, 0, 1]), torch.tensor([3, 1, 0])) is None  # 9 places for 4 rows


def test_generate_and_the_batcher_with_many_adapters_answer_as_peft(pool, stream):
    names = names_of(MANY, 24)
    tasks = ["base" if n == NO_ADAPTER else n for n in names]
    prompts = [stream[i % 3][1].prompts[i] for i in range(len(names))]
    routes = [Route(t, None) for t in tasks]
    assert not pool._mixed_lora().dense  # the many-adapter layout
    fast = generate_routed(pool, prompts, routes, max_new_tokens=8, batch_size=len(prompts), progress=False)
    batcher = Batcher(pool, max_batch_size=len(prompts))
    seqs = [Sequence(encode_prompt(pool.tokenizer, p), t, 8, IncrementalText(pool.tokenizer, ()),
                     pool.tokenizer.eos_token_id) for p, t in zip(prompts, tasks)]
    for seq in seqs:
        batcher.submit(seq)
    batcher.drain()
    pool.fast_mixed = False
    try:
        reference = generate_routed(pool, prompts, routes, max_new_tokens=8, batch_size=len(prompts), progress=False)
    finally:
        pool.fast_mixed = True
    assert fast == reference
    assert [s.output for s in seqs] == [g.output for g in reference]
