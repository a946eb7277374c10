"""Benchmark metrics: SARI as HF evaluate computes it, AP / BWT, and the secondary scores."""

from __future__ import annotations

import pytest

from switchcit.bench.metrics import (
    average_performance,
    backward_transfer,
    bleu,
    constraint_satisfaction,
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
