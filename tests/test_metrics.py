"""Benchmark metrics: SARI as HF evaluate computes it, AP / BWT, and the secondary scores."""

from __future__ import annotations

import pytest

from switchcit.bench.metrics import (
    average_performance,
    backward_transfer,
    bleu,
    choice_scores,
    constraint_satisfaction,
    exact_match_scores,
    normalize_choice,
    rouge1,
    sari,
)


def test_sari_matches_hf_evaluate():
    sources = ["About 95 species are currently accepted."]
    predictions = ["About 95 you now get in."]
    references = [["About 95 species are currently known.", "About 95 species are now accepted.",
                   "95 species are now accepted."]]
    assert sari(sources, predictions, references) == pytest.approx(26.953601953601954, abs=1e-6)


def test_sari_is_a_mean_of_sentence_scores():
    refs = ["About 95 species are currently known.", "About 95 species are now accepted."]
    one = sari(["About 95 species are currently accepted."], ["About 95 species are now accepted."], [refs])
    other = sari(["About 95 species are currently accepted."], ["About 95 you now get in."], [refs])
    both = sari(["About 95 species are currently accepted."] * 2,
                ["About 95 species are now accepted.", "About 95 you now get in."], [refs, refs])
    assert both == pytest.approx((one + other) / 2)
    assert one > other
    with pytest.raises(ValueError):
        sari(["a"], ["a", "b"], [["a"]])


def test_ap_and_bwt_on_a_hand_made_matrix():
    matrix = [[80.0, None, None],
              [60.0, 70.0, None],
              [50.0, 65.0, 90.0]]
    assert average_performance(matrix) == pytest.approx((50 + 65 + 90) / 3)
    assert backward_transfer(matrix) == pytest.approx(((50 - 80) + (65 - 70)) / 2)
    assert backward_transfer([[42.0]]) is None


def test_rouge_bleu_and_constraints():
    assert rouge1(["nec in computer sales tie-up"], [["nec unk in computer sales tie-up", "x"]]) > 90
    assert rouge1(["completely different"], [["nec in computer sales"]]) == 0
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat", "a cat"]]) == pytest.approx(100)
    constraints = [("start", "sri"), ("end", "escalates"), ("contain", "schools"), ("start", "war")]
    predictions = ["Sri lanka closes schools", "schools close as war escalates .", "no match here", "the war"]
    assert constraint_satisfaction(predictions, constraints) == 50.0


def test_ap_and_bwt_leave_out_tasks_without_a_score():
    reworded = [[80.0, None, None],  # task 2 has no rewordings
                [60.0, None, None],
                [50.0, None, 90.0]]
    assert average_performance(reworded) == pytest.approx(70.0)
    assert backward_transfer(reworded) == pytest.approx(-30.0)
    assert average_performance([[None]]) is None and backward_transfer([[None, None], [None, 5.0]]) is None


def test_choice_answers_are_matched_after_normalisation():
    answers = ["Yes", "the red one", "B"]
    predictions = ["  yes. ", "The  Red\nOne!", "A"]
    assert choice_scores(predictions, answers) == [100.0, 100.0, 0.0]
    assert normalize_choice(" Plausible?! ") == "plausible"
    assert exact_match_scores(predictions, answers) == [0.0, 0.0, 0.0]  # exact match keeps case and punctuation


def test_per_prompt_scores_average_to_the_metric():
    from switchcit.bench.metrics import METRICS, PER_EXAMPLE
    from switchcit.bench.streams import EvalExample

    examples = [EvalExample("p1", ("the cat sat", "a cat sat"), "the cat sat down", ("start", "the")),
                EvalExample("p2", ("dogs bark",), "dogs bark loudly", ("end", "bark"))]
    predictions = ["the cat sat", "dogs are loud"]
    for name in ("exact_match", "choice", "sari", "rouge1", "constraint"):
        scores = PER_EXAMPLE[name](examples, predictions)
        assert len(scores) == 2 and METRICS[name](examples, predictions) == pytest.approx(sum(scores) / 2)
    assert PER_EXAMPLE["rouge1"](examples, predictions)[0] == pytest.approx(100.0)
    assert "bleu" not in PER_EXAMPLE  # a corpus score has no per-prompt parts
