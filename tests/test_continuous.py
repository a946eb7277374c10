"""Continuous batching (batching.py) and incremental detokenization (detokenize.py) on the tiny model."""

from __future__ import annotations

import pytest

from switchcit.batching import Batcher, Sequence, chunk_length, key_cost
from switchcit.continual import ContinualModel
from switchcit.data import encode_prompt
from switchcit.detokenize import IncrementalText


@pytest.fixture(scope="module")
def cm(trained_store) -> ContinualModel:
    model = ContinualModel(trained_store, progress=False)
    model.load_adapters()
    return model


def sequence(cm: ContinualModel, prompt: str, task: str, max_tokens: int, stop: tuple[str, ...] = (),
             texts: list[str] | None = None, **fields) -> Sequence:
    on_text = (lambda seq, text: texts.append(text)) if texts is not None else None
    return Sequence(encode_prompt(cm.tokenizer, prompt), task, max_tokens, IncrementalText(cm.tokenizer, stop),
                    cm.tokenizer.eos_token_id, on_text=on_text, **fields)


def alone(cm: ContinualModel, prompt: str, task: str, max_tokens: int) -> tuple[str, list[int], bool]:
    """The request's answer on its own (the library's path), with the token ids transformers' generate made."""
    import torch

    answer = cm.generate([prompt], [task], max_tokens, batch_size=1)[0]
    ids = torch.tensor([encode_prompt(cm.tokenizer, prompt)])
    with torch.no_grad(), cm.adapters.rows([task]) as kwargs:
        out = cm.adapters.model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False,
                                         pad_token_id=cm.tokenizer.pad_token_id,
                                         eos_token_id=cm.tokenizer.eos_token_id, **kwargs)
    tokens = out[0, ids.shape[1]:].tolist()[:answer.tokens]
    return answer.output, tokens, answer.stopped


def test_rows_joining_and_leaving_mid_generation_answer_as_they_would_alone(cm, stream):
    tasks = ["reverse", "initials", "capitalize", "base"]
    asks = [(e.prompt, tasks[i % 4], 3 + 5 * (i % 3)) for i, e in enumerate(
        [e for _, test in stream for e in test.examples[:4]])]
    batcher = Batcher(cm.adapters, max_batch_size=3, prefill_tokens=64)
    seqs, sizes, queued = [], [], []
    for prompt, task, max_tokens in asks:  # one new request before every step: rows join a running batch
        seqs.append(sequence(cm, prompt, task, max_tokens))
        batcher.submit(seqs[-1])
        batcher.step()
        sizes.append(len(batcher.running))
        queued.append(len(batcher.waiting))
    batcher.drain()
    assert max(sizes) == 3 and max(queued) > 0  # capped at --max-batch-size, the rest waited
    assert any(b < a for a, b in zip(sizes, sizes[1:]))  # rows left while others ran on
    for seq, (prompt, task, max_tokens) in zip(seqs, asks):
        assert (seq.output, seq.generated, seq.stopped) == alone(cm, prompt, task, max_tokens)
        assert seq.error is None and seq.finished_at >= seq.first_token_at >= seq.arrived


def test_a_long_prompt_is_read_in_chunks_while_running_rows_decode(cm, stream):
    short, long = stream[0][1].prompts[0], " ".join(stream[1][1].prompts[:6])
    batcher = Batcher(cm.adapters, prefill_tokens=16)
    first = sequence(cm, short, "base", 30)
    batcher.submit(first)
    batcher.step()
    second = sequence(cm, long, "initials", 4)
    batcher.submit(second)
    decoded = []
    while second.first_token_at is None:
        batcher.step()
        decoded.append(len(first.generated))
    assert len(second.prompt_ids) > 64 and len(decoded) >= 4  # several chunks of at most 16 tokens ...
    assert decoded == sorted(decoded) and decoded[-1] - decoded[0] >= 3 or first.finished_at  # ... and decoding on
    batcher.drain()
    assert (second.output, second.generated) == alone(cm, long, "initials", 4)[:2]
    assert (first.output, first.generated) == alone(cm, short, "base", 30)[:2]


def test_chunks_shrink_deep_in_a_long_prompt_so_each_costs_what_one_from_the_start_does(cm, trained_store):
    cost = key_cost(cm.adapters.base)
    bare = ContinualModel(trained_store, progress=False)  # no adapter loaded: the cost is the base model's
    assert 0 < cost < 1 and cost == key_cost(bare.adapters.base)

    def work(columns: int, done: int) -> float:  # a chunk's cost: its columns, and the keys each attends to
        return columns * (1 + cost * (done + columns / 2))

    lengths = [chunk_length(64, done, cost) for done in (0, 100, 1000, 10000)]
    assert lengths[0] == 64 and lengths == sorted(lengths, reverse=True) and lengths[-1] < 64 / 4
    for done, columns in zip((0, 100, 1000, 10000), lengths):
        assert work(columns, done) <= work(64, 0) * (1 + 1e-9) < work(columns + 1, done)
    assert chunk_length(64, 10000, 0.0) == 64 and chunk_length(0.5, 10000, cost) == 1


def test_stop_strings_end_a_row_and_are_never_sent(cm, stream):
    prompt = stream[1][1].prompts[0]
    whole, tokens, _ = alone(cm, prompt, "initials", 12)
    assert whole and len(tokens) > 1  # the tiny 'initials' expert answers a letter, then its end token
    texts: list[str] = []
    batcher = Batcher(cm.adapters)
    seq = sequence(cm, prompt, "initials", 12, stop=(whole[-1], "never-made"), texts=texts)
    batcher.submit(seq)
    batcher.drain()
    assert seq.output == whole[:whole.find(whole[-1])] == "".join(texts) and seq.stopped
    assert len(seq.generated) < len(tokens)  # generation ended at the stop, before the end token


def test_cancelled_rows_leave_at_the_next_step(cm, stream):
    cancelled = {"yes": False}
    batcher = Batcher(cm.adapters, max_batch_size=1)
    ended: list[Sequence] = []
    first = sequence(cm, stream[0][1].prompts[0], "base", 200, is_cancelled=lambda: cancelled["yes"],
                     on_done=ended.append)
    second = sequence(cm, stream[1][1].prompts[0], "initials", 3, on_done=ended.append)
    batcher.submit(first)
    batcher.submit(second)
    batcher.step()
    batcher.step()
    assert batcher.running == [first] and list(batcher.waiting) == [second]  # the one slot is taken
    made = len(first.generated)
    cancelled["yes"] = True
    batcher.step()
    assert ended[0] is first and len(first.generated) == made
    assert second.generated  # the freed slot went to the waiting sequence at once
    batcher.drain()
    assert ended == [first, second] and second.error is None


def test_one_failing_row_fails_alone(cm, stream):
    poison = cm.tokenizer.encode("zebra", add_special_tokens=False)[0]

    def refuse(module, args, kwargs):  # fault injection: the model fails on any row holding this token
        if (kwargs.get("input_ids", args[0] if args else None) == poison).any():
            raise RuntimeError("poisoned row")

    prompts = [stream[0][1].prompts[1], stream[1][1].prompts[1] + " zebra", stream[2][1].prompts[1]]
    batcher = Batcher(cm.adapters)
    seqs = [sequence(cm, p, t, 5) for p, t in zip(prompts, ["reverse", "initials", "capitalize"])]
    handle = cm.adapters.base.register_forward_pre_hook(refuse, with_kwargs=True)
    try:
        for seq in seqs:
            batcher.submit(seq)
        batcher.drain()
    finally:
        handle.remove()
    assert "poisoned row" in str(seqs[1].error) and not seqs[1].generated
    for seq, prompt, task in zip(seqs[::2], prompts[::2], ["reverse", "capitalize"]):
        assert seq.error is None and seq.output == alone(cm, prompt, task, 5)[0]


@pytest.mark.parametrize("text", ["Ünïcödé — ☃ 漢字 done", "plain words, then 🎉🎉 emoji"])
def test_incremental_text_sends_whole_characters_and_ends_equal(cm, text):
    ids = cm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters really split across tokens
    stream = IncrementalText(cm.tokenizer)
    pieces = [stream.add(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == cm.tokenizer.decode(ids).strip()
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_text_holds_back_a_possible_stop_string(cm):
    stream = IncrementalText(cm.tokenizer, stop=("STOP",))
    pieces = [stream.add(t) for t in cm.tokenizer.encode("go on ST then STOP after", add_special_tokens=False)]
    assert "".join(pieces) == "go on ST then " and stream.stopped and stream.finish() == ""


def test_short_prompts_are_read_beside_a_long_one_and_running_rows_never_wait_more_than_a_chunk(cm, stream):
    """A long prompt read in many chunks: the running row gets a token at every step, and a short prompt that
    arrives meanwhile is read beside it and answers before the long one's first token (the order of steps)."""
    batcher = Batcher(cm.adapters, prefill_tokens=16)
    running = sequence(cm, stream[0][1].prompts[0], "base", 60)
    batcher.submit(running)
    batcher.step()
    long_prompt = " ".join(test.prompts[i] for i in range(4) for _, test in stream)
    long = sequence(cm, long_prompt, "initials", 3)
    batcher.submit(long)
    batcher.step()
    short = sequence(cm, stream[2][1].prompts[1], "capitalize", 3)
    batcher.submit(short)
    steps = 0
    while long.first_token_at is None:
        before = len(running.generated)
        batcher.step()
        steps += 1
        assert len(running.generated) == before + 1 or running.finished_at  # a token at every step
    assert len(long.prompt_ids) > 16 * 8 and steps >= len(long.prompt_ids) // 16  # chunks of at most 16 tokens ...
    assert short.finished_at is not None and short.finished_at < long.first_token_at  # ... and the short one went
    batcher.drain()
    for seq, prompt, task, max_tokens in [(running, stream[0][1].prompts[0], "base", 60),
                                          (long, long_prompt, "initials", 3),
                                          (short, stream[2][1].prompts[1], "capitalize", 3)]:
        assert (seq.output, seq.generated) == alone(cm, prompt, task, max_tokens)[:2]


def test_a_task_whose_adapter_is_not_loaded_fails_its_row_and_never_gets_the_base_model(cm, stream):
    from switchcit.adapters import AdapterMissing
    from switchcit.mixed import NO_ADAPTER, MixedLoRA

    batcher = Batcher(cm.adapters)
    ghost = sequence(cm, stream[0][1].prompts[3], "ghost", 4)
    known = sequence(cm, stream[1][1].prompts[3], "initials", 4)
    for seq in (ghost, known):
        batcher.submit(seq)
    batcher.drain()
    assert isinstance(ghost.error, AdapterMissing) and "ghost" in str(ghost.error) and not ghost.generated
    assert known.error is None and known.output == alone(cm, stream[1][1].prompts[3], "initials", 4)[0]
    mixed = MixedLoRA(cm.model, ["reverse"])
    with pytest.raises(KeyError, match="initials"), mixed.rows(["reverse", NO_ADAPTER, "initials"]):
        pass


@pytest.mark.parametrize(("stops", "sent"), [
    (("DE", "BCDEF"), "go on A"),  # "DE" completes first, "BCDEF" starts first: cut where it starts
    (("DE", "BCDX"), "go on ABC"),  # the earlier one cannot complete: cut at "DE"
    (("EFG", "G a"), "go on ABCD"),
])
def test_overlapping_stop_strings_cut_where_the_first_of_them_starts(cm, stops, sent):
    text = IncrementalText(cm.tokenizer, stop=stops)
    pieces = [text.add(t) for t in cm.tokenizer.encode("go on ABCDEFG after", add_special_tokens=False)]
    assert "".join(pieces) + text.finish() == sent and text.stopped
    assert sent == "go on ABCDEFG after"[:min(i for s in stops if (i := "go on ABCDEFG after".find(s)) >= 0)]
