"""Everyday requests of no task: the background class of the Gaussian switch (outlier exposure).

Why: a request of no learned task must go to the base model, and thresholds on each task's distance
alone could not do it: in a sentence embedding a new wording of a known task moves about as far as an
unrelated request, so thresholds that keep new wordings let most everyday requests in (44% caught on
CIT, none on the 48 BIG-bench tasks, where one task of long Wikipedia contexts spans everything). An
unknown request is not merely far from the tasks: it is near what people ask any assistant. So the
switch holds one more class, never routed to, whose mean is that of 599 everyday requests in 76 kinds
(`data/background.jsonl`, written for switchcit, no benchmark's text), and sends a request to the base
model when it is nearer that class than its nearest task by a margin (`SwitchConfig.background_margin`).

The requests are encoded once with the store's encoder and only their mean is kept, in the switch; the
means under the default encoder and under the embedded model alone (the default of stores made before
2026-12-07), each with and without its second view (encoders.InstructionViews), ship with them
(`data/background-means.safetensors`, rewritten by `python -m switchcit.background`), so a store of any of them
encodes none of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BACKGROUND_REQUESTS = Path(__file__).parent / "data" / "background.jsonl"
SHIPPED_MEANS = Path(__file__).parent / "data" / "background-means.safetensors"


def background_requests() -> list[dict]:
    """The shipped requests: {"category": ..., "text": ...} each."""
    lines = BACKGROUND_REQUESTS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def encoded_mean(encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """The mean feature of the shipped requests under `encode` (float64)."""
    return encode([r["text"] for r in background_requests()]).double().mean(dim=0)


def background_mean(encoder: str, encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """The background mean under the encoder of this reference: shipped for the default, else encoded now."""
    from safetensors.torch import load_file

    shipped = load_file(str(SHIPPED_MEANS))
    return shipped[encoder].double() if encoder in shipped else encoded_mean(encode)


if __name__ == "__main__":  # after changing data/background.jsonl
    from safetensors.torch import save_file

    from .encoders import DEFAULT_ENCODER, EMBEDDED_ENCODER, INSTRUCTION_VIEW, load_encoder

    references = tuple(r + view for r in (DEFAULT_ENCODER, EMBEDDED_ENCODER) for view in ("", INSTRUCTION_VIEW))
    save_file({r: encoded_mean(load_encoder(r).encode).float() for r in references}, str(SHIPPED_MEANS))
