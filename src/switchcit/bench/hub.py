"""The CIT stream's records from Hugging Face datasets, for machines that reach the hub.

Each source row becomes a record with the keys of the local sample (see shared/data/cit/SOURCES.md),
so prompts are built by the same code either way. Sizes match the local sample: the first 2000
training and 300 test records. The instruction wordings are CT0's, shipped with this package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import SwitchcitError

LIMIT = {"train": 2000, "test": 300}
ESNLI_LABELS = ("entailment", "neutral", "contradiction")


def dialogue_records(row: dict) -> list[dict]:
    """One record per listener turn of an EmpatheticDialogues conversation: earlier turns -> that reply."""
    turns = row["conversations"]
    return [{"emotion": row["emotion"], "situation": row.get("situation", ""),
             "context": [t["content"] for t in turns[:i]], "response": turn["content"]}
            for i, turn in enumerate(turns) if i and turn["role"] == "assistant"]


def _esnli(row: dict, n_explanations: int) -> list[dict]:
    return [{"premise": row["premise"], "hypothesis": row["hypothesis"], "label": ESNLI_LABELS[row["label"]],
             "explanations": [row[f"explanation_{k}"] for k in range(1, n_explanations + 1)]}]


def _eli5(row: dict) -> list[dict]:
    return [{"text": row["answer"], "question": row["question"]}]


def _gigaword(row: dict) -> list[dict]:
    return [{"document": row["document"], "headline": row["summary"]}]


# (task, split) -> (dataset id, config, split, rows to skip, row -> records)
SOURCES: dict[tuple[str, str], tuple[str, str | None, str, int, Callable[[dict], list[dict]]]] = {
    ("simp", "train"): ("GEM/wiki_auto_asset_turk", None, "train", 0,
                        lambda r: [{"source": r["source"], "references": [r["target"]]}]),
    ("simp", "test"): ("facebook/asset", "simplification", "test", 0,
                       lambda r: [{"source": r["original"], "references": r["simplifications"]}]),
    ("emdg", "train"): ("Estwld/empathetic_dialogues_llm", None, "train", 0, dialogue_records),
    ("emdg", "test"): ("Estwld/empathetic_dialogues_llm", None, "test", 0, dialogue_records),
    # ELI5 has one split here: its first rows are the test set, the following ones the training set.
    ("inqqg", "train"): ("sentence-transformers/eli5", None, "train", LIMIT["test"], _eli5),
    ("inqqg", "test"): ("sentence-transformers/eli5", None, "train", 0, _eli5),
    ("exp", "train"): ("esnli", None, "train", 0, lambda r: _esnli(r, 1)),
    ("exp", "test"): ("esnli", None, "test", 0, lambda r: _esnli(r, 3)),
    ("hgen", "train"): ("Harvard/gigaword", None, "train", 0, _gigaword),
    ("hgen", "test"): ("Harvard/gigaword", None, "test", 0, _gigaword),
}


def load_cit_records(task: str, split: str) -> list[dict]:
    """The first LIMIT[split] records of one CIT task, streamed from the hub."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SwitchcitError("the CIT stream without --data-dir loads Hugging Face datasets: "
                             "`pip install datasets`, or give --data-dir with a local copy") from None
    dataset, config, name, skip, to_records = SOURCES[(task, split)]
    records: list[dict] = []
    try:
        for row in load_dataset(dataset, config, split=name, streaming=True).skip(skip):
            records.extend(to_records(row))
            if len(records) >= LIMIT[split]:
                break
    except Exception as exc:  # the hub's failures come in many types; all mean the same to the user
        raise SwitchcitError(f"cannot load {dataset} from Hugging Face ({exc}): give --data-dir with a "
                             "local copy of the CIT data") from None
    return records[:LIMIT[split]]


def load_cit_templates() -> dict:
    """CT0's instruction wordings; online they come from a local copy of the CIT folder's templates.json."""
    path = os.environ.get("SWITCHCIT_CIT_TEMPLATES")
    if not path or not Path(path).is_file():
        raise SwitchcitError("the online CIT stream needs CT0's instruction templates: set SWITCHCIT_CIT_TEMPLATES "
                             "to a templates.json laid out like the one in the CIT data folder, or give --data-dir")
    return json.loads(Path(path).read_text(encoding="utf-8"))
