"""Variants of a task's training prompts: the same request with its instruction dropped, cut, moved,
unlabelled or half-worded.

Why: users word a task in ways its rows never show, and most rows come with one wording, or with the
input inside the instruction so no wording repeats. The switch's fallback has to know how far a new
wording may lie from a task before it calls a request unknown, and no held-out row can tell it: every
held-out row is worded like the rows it was held out from. A variant changes exactly what a new wording
changes, the instruction's text and place, and keeps the input, whatever the row's shape. The variants
count as the task's own prompts in its statistics (gaussian.task_stats), so the switch learns which
directions a wording moves along, and its fallback calibrates each task's region on held-out rows and
their variants (gaussian.calibrate). They are encoded once at `learn`; only statistics are kept, never text.
Five kinds; held out one at a time (benchmarks/routing_cv.py), a kind of CIT's variants routes 91.5% right
with the other four in the statistics, 90.0% with none (issue 18). Four more for one-sentence prompts: with
them, tasks of one one-sentence wording route 99.9% of their other wordings right, 13.7% without (86.3% went to
base; `routing_cv.py --studies one_sentence`).

A prompt is cut into segments at line breaks, or, when it is one line, after sentence ends and colons
("Spell out this number in words: 41" -> the instruction and "41"); the default encoder cuts at blank lines
first (`blocks`), so that an input of many lines counts as one part beside its instruction. A prompt of one
segment is cut by its task's rows instead: where the rows carry their input inside one sentence ("What is 80
plus 29?"), the words most of them share and everyday requests do not (`template_words`) are the wording, the
rest the row's own input ("80", "29"), and its variants drop, move or half-word the wording the same way. A
prompt of one segment whose task shows no such wording has no variant.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LINE_BREAK = re.compile(r"\n")
BLANK_LINE = re.compile(r"\n[ \t]*\n")
SENTENCE_END = re.compile(r"(?<=[.?!:;])\s+(?=\S)")
FIELD_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9 '()/-]{0,30}?:\s+(?=\S)")  # "Premise: ", "Sentence 1: "
RULE = re.compile(r"[=\-#*_~ ]+")  # separator lines such as "===" carry no text
MAX_PROMPTS = 256  # rows whose variants are encoded: enough to calibrate, bounded cost for large tasks
WORD = re.compile(r"\w+")
TEMPLATE_SHARE = 0.3  # a word in this share of a task's rows may be its wording; at 0.2 recurring inputs ("cake") are
EVERYDAY_RATIO = 2.0  # ... if they hold it this many times as often as everyday requests do ("the" is no wording)
RARE = 0.02  # a wording holds a word this rare in everyday requests: inputs share common words ("of the", in titles)


def segments(prompt: str) -> list[str]:
    """The prompt's lines, or its sentences when it has one line; separator lines dropped."""
    lines = [s.strip() for s in LINE_BREAK.split(prompt)]
    lines = [s for s in lines if s and not RULE.fullmatch(s)]
    if len(lines) >= 2:
        return lines
    return [s.strip() for s in SENTENCE_END.split(prompt) if s.strip()]


def blocks(prompt: str) -> list[str]:
    """The prompt's blocks between blank lines when it has two or more (an instruction apart from an input of many
    lines, as `{instruction}\n\n{input}` rows are joined), else its segments; separator blocks dropped."""
    found = [b.strip() for b in BLANK_LINE.split(prompt)]
    found = [b for b in found if b and not RULE.fullmatch(b)]
    return found if len(found) >= 2 else segments(prompt)


def longest(parts: list[str]) -> int:
    """The index of the longest segment, most often the input."""
    return max(range(len(parts)), key=lambda i: len(parts[i]))


def instruction(prompt: str) -> str:
    """What the prompt asks: its segments without the longest, which is most often the input (the prompt
    itself when it has one segment)."""
    parts = segments(prompt)
    if len(parts) < 2:
        return prompt
    input_at = longest(parts)
    return "\n".join(p for i, p in enumerate(parts) if i != input_at)


def words(text: str) -> set[str]:
    """The text's words, lower-cased: what a wording is compared by."""
    return {w.lower() for w in WORD.findall(text)}


@cache
def everyday_shares() -> dict[str, float]:
    """The share of the shipped everyday requests (background.py) that hold each word."""
    from .background import background_requests

    texts = [r["text"] for r in background_requests()]
    return {w: c / len(texts) for w, c in Counter(w for t in texts for w in words(t)).items()}


def template_words(prompts: list[str]) -> frozenset[str]:
    """The words of a task's wording where its rows carry their input inside it: held by at least
    TEMPLATE_SHARE of the prompts (and two), and EVERYDAY_RATIO times as often as by everyday requests;
    numbers are input. Empty unless one of them is RARE in everyday requests."""
    counts = Counter(w for p in prompts for w in words(p))
    least, everyday = max(2.0, TEMPLATE_SHARE * len(prompts)), everyday_shares()
    found = frozenset(w for w, c in counts.items() if c >= least and not w.isdigit()
                      and c / len(prompts) >= EVERYDAY_RATIO * everyday.get(w, 0.0))
    return found if any(everyday.get(w, 0.0) < RARE for w in found) else frozenset()


def template_variants(prompt: str, template: frozenset[str], rng: random.Random) -> dict[str, str]:
    """A one-sentence prompt's variants by its task's wording (`template_words`): the wording dropped (the
    row's own words alone), the row's own words dropped, the row's own words first, and half the wording's
    words dropped; none where the prompt holds no word of either."""
    tokens = prompt.split()
    worded = [bool(words(t)) and words(t) <= template for t in tokens]
    own = [t for t, w in zip(tokens, worded) if not w]
    wording = [t for t, w in zip(tokens, worded) if w]
    everyday = everyday_shares()
    if not own or not any(everyday.get(w, 0.0) < RARE for t in wording for w in words(t)):
        return {}
    half = [t for t, w in zip(tokens, worded) if not w or rng.random() >= 0.5]
    return {"wording_dropped": " ".join(own), "own_dropped": " ".join(wording),
            "own_first": " ".join(own + wording), "wording_half_worded": " ".join(half)}


def named_variants(prompt: str, template: frozenset[str] = frozenset()) -> dict[str, str]:
    """The prompt's variants by kind: without its first segment, without its last, with its first segment
    moved to the end, without the field labels that open its segments, and with half the words of every
    segment but the longest (the input) dropped, seeded by the prompt so that a prompt always has the same
    variants; a prompt of one segment, by its task's `template` (`template_variants`). A kind that changes
    nothing, or repeats an earlier kind, is left out."""
    parts = segments(prompt)
    rng = random.Random(zlib.crc32(prompt.encode()))
    if len(parts) < 2:
        made = template_variants(prompt, template, rng)
    else:
        input_at = longest(parts)
        half_worded = [p if i == input_at else
                       " ".join([w for w in p.split() if rng.random() >= 0.5] or p.split()[:1])
                       for i, p in enumerate(parts)]
        made = {"first_dropped": "\n".join(parts[1:]), "last_dropped": "\n".join(parts[:-1]),
                "first_moved": "\n\n".join(parts[1:] + parts[:1]),
                "unlabelled": "\n".join(FIELD_LABEL.sub("", p) for p in parts),
                "half_worded": "\n".join(half_worded)}
    found: dict[str, str] = {}
    for kind, text in made.items():
        if text not in (prompt, "\n".join(parts)) and text not in found.values():
            found[kind] = text
    return found


def variants(prompt: str, template: frozenset[str] = frozenset()) -> list[str]:
    """The prompt's variants (`named_variants`), in their kinds' order."""
    return list(named_variants(prompt, template).values())


def prompt_variants(prompts: list[str], seed: int = 0, limit: int = MAX_PROMPTS) -> tuple[list[str], list[int]]:
    """Variants of up to `limit` prompts (a seeded sample) and, for each, the index of the prompt it came from."""
    chosen = range(len(prompts))
    if len(prompts) > limit:
        chosen = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    texts, owner, template = [], [], template_words(prompts)
    for i in chosen:
        for v in variants(prompts[i], template):
            texts.append(v)
            owner.append(i)
    return texts, owner


def encode_variants(encode: Callable[[list[str]], torch.Tensor], prompts: list[str],
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features of the variants, index of each one's prompt), what `gaussian.calibrate` takes; None when
    no prompt has a variant."""
    import torch

    texts, owner = prompt_variants(prompts, seed)
    return (encode(texts), torch.tensor(owner, dtype=torch.long)) if texts else None


def rows_and_variants(features: torch.Tensor, fold: torch.Tensor,
             variants: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The features of the rows in `fold` and of those rows' variants: what a calibration holds out together."""
    import torch

    if variants is None:
        return features[fold]
    view_features, owner = variants
    return torch.cat([features[fold], view_features[torch.isin(owner, fold)]])
