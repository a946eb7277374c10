"""Continuous (iteration-level) batching: a running batch of sequences, each with its own adapter.

Every `step` drops cancelled sequences, admits waiting ones within the row and KV-cache budgets and
prefills them (about `prefill_tokens` prompt tokens per step, so a long prompt stalls the running rows
by one chunk at most; while a long prompt is read over many steps, newer short ones are read beside it
and start decoding), decodes one token for every running row and retires the rows that are done. A
request joins at the next step and leaves the moment it ends, instead of waiting for a whole static batch.
Each phase of a step is guarded: a failure the forward's per-row retry does not absorb ends the rows
that phase was working on, with the error, and the batch goes on with the others.

A chunk read deep into a long prompt attends to every key before it, so it costs more than one read at
the start: chunks shrink with their position (`chunk_length`), so that each costs about what
`prefill_tokens` tokens read from the start would, and a step's stall stays bounded in time, not only in
tokens.

Rows share one left-padded KV cache with explicit positions: adding rows concatenates along the batch
(padding the shorter side on the left), removing them indexes it. Each forward wraps our tensors in a
transformers DynamicCache. Padding is masked out, so a greedy answer is the request's answer alone (up
to float rounding in the padded matmuls). `AdapterPool.rows` is set per forward with the batch as it
is, so the mixed-adapter rows follow the batch as it changes.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .detokenize import IncrementalText
from .errors import SwitchcitError
from .generation import left_pad

if TYPE_CHECKING:
    import torch

    from .adapters import AdapterPool

log = logging.getLogger("switchcit.batching")
MAX_PREFILLS = 2  # prompt groups read at once: a long prompt in chunks, and the newer prompts beside it


@dataclass(eq=False)
class Sequence:
    """One answer in the making: its prompt's token ids, its adapter ('base': none), its own token limit,
    stop strings (in `text`) and end token, and callbacks for its newly final text and for its end."""

    prompt_ids: list[int]
    task: str
    max_tokens: int
    text: IncrementalText
    eos: int | None
    on_text: Callable[[Sequence, str], None] | None = None
    on_done: Callable[[Sequence], None] | None = None  # once: finished, failed (`error`) or cancelled
    is_cancelled: Callable[[], bool] = lambda: False  # asked from the stepping thread before each step
    generated: list[int] = field(default_factory=list)  # with the end token, when it came
    stopped: bool = False  # ended by the end token or a stop string (False: by the token limit)
    error: Exception | None = None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def reserved(self) -> int:
        """Cache columns this row may come to need."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def output(self) -> str:
        return self.text.sent


@dataclass(eq=False)
class _Rows:
    """Sequences sharing a left-padded cache: `mask` [rows, width] (1 on real tokens), and per layer key and
    value buffers [rows, heads, room, dim] of which the first `past` columns are filled."""

    seqs: list[Sequence]
    mask: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    past: int = 0

    @property
    def filled(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[:, :, :self.past], v[:, :, :self.past]) for k, v in self.kv]

    def select(self, keep: list[int]) -> None:
        import torch

        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask, kv = self.mask[index], [(k[index], v[index]) for k, v in self.kv]
        self.seqs, self.mask, self.kv = [self.seqs[i] for i in keep], mask, kv

    def trim(self) -> None:
        """Drop leading columns that are padding in every row (the longest row left)."""
        first = int(self.mask.any(0).int().argmax()) if self.seqs else 0
        if first:
            self.mask = self.mask[:, first:]
            self.kv = [(k[:, :, first:], v[:, :, first:]) for k, v in self.kv]
            self.past -= first


@dataclass(eq=False)
class _Prefill(_Rows):
    """Admitted sequences whose prompts are being read, `done` columns so far."""

    ids: torch.Tensor = None
    positions: torch.Tensor = None
    done: int = 0

    def select(self, keep: list[int]) -> None:
        super().select(keep)
        self.ids, self.positions = self.ids[keep], self.positions[keep]


class Batcher:
    """The running batch over an adapter pool. Not thread-safe: one thread submits and steps."""

    def __init__(self, pool: AdapterPool, max_batch_size: int = 32, max_kv_tokens: int = 32768,
                 prefill_tokens: int = 512):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=pool.model.config).layers):
            raise SwitchcitError("continuous batching needs a model with full attention in every layer (no sliding "
                                 "window): use the static engine")
        self.pool, self.max_batch_size = pool, max_batch_size
        self.max_kv_tokens, self.prefill_tokens = max_kv_tokens, prefill_tokens
        self.device = next(pool.model.parameters()).device
        self.key_cost = key_cost(pool.base)
        forward = inspect.signature(pool.base.forward).parameters  # transformers renamed it in 5.x
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        self.waiting: deque[Sequence] = deque()
        self.admitting = True  # False: running rows go on, waiting ones stay waiting
        self._running: _Rows | None = None
        self._prefills: list[_Prefill] = []  # oldest first

    @property
    def running(self) -> list[Sequence]:
        return self._running.seqs if self._running else []

    @property
    def prefilling(self) -> list[Sequence]:
        return [s for p in self._prefills for s in p.seqs]

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    @property
    def kv_tokens(self) -> int:
        """Cache cells in use now (rows x columns, padding included)."""
        return sum(r.mask.shape[0] * r.past for r in self._row_sets())

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def step(self) -> None:
        """Drop cancelled rows, admit waiting ones, read a chunk of the prompts being read, decode one token per
        running row. A failing phase ends the rows it was working on (with the error), never the batch."""
        import torch

        with torch.inference_mode():
            self._guard(self._drop_cancelled, [*self.running, *self.prefilling])
            group = self._admissible()
            if group:
                self._guard(lambda: self._start_prefill(group), group)
            budget = self.prefill_tokens // max(1, len(self._prefills))  # the step's prompt tokens, shared
            for prefill in list(self._prefills):
                read = self._guard(lambda p=prefill: self._read_prompts(p, budget), list(prefill.seqs))
                if read is not None:
                    self._guard(lambda r=read: self._join(r), [*read.seqs, *self.running])
            if self.running:
                self._guard(self._decode, list(self.running))

    def drain(self) -> None:
        """Step until every submitted sequence is done (library use without a server)."""
        while self.busy:
            self.step()

    def _row_sets(self) -> list[_Rows]:
        return [*([self._running] if self._running else []), *self._prefills]

    def _guard(self, phase: Callable[[], _Rows | None], seqs: list[Sequence]) -> _Rows | None:
        """Run one phase of a step; should it fail, `seqs` (whole row sets: what it was working on) end with the
        error and leave, and the batch goes on without them."""
        try:
            return phase()
        except Exception as exc:
            log.error("a batch step failed: %d sequence(s) end with its error", len(seqs), exc_info=exc)
            gone = set(seqs)
            self.waiting = deque(s for s in self.waiting if s not in gone)
            if self._running is not None and gone.intersection(self._running.seqs):
                self._running = None
            self._prefills = [p for p in self._prefills if not gone.intersection(p.seqs)]
            for seq in [s for s in seqs if s.finished_at is None]:
                seq.error = seq.error or exc
                self._end(seq)
            return None

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.is_cancelled()]:
            self.waiting.remove(seq)
            self._end(seq)
        for rows in self._row_sets():
            if any(s.is_cancelled() for s in rows.seqs):
                gone = [s for s in rows.seqs if s.is_cancelled()]
                self._select(rows, [i for i, s in enumerate(rows.seqs) if not s.is_cancelled()])
                for seq in gone:
                    self._end(seq)

    def _admissible(self) -> list[Sequence]:
        """The waiting sequences to start reading now, first come first served, while rows, cache and prefill
        budgets allow. The cache budget bounds the padded cache: rows x the longest prompt + max_tokens among
        them. A group may start while another is still being read (a long prompt): up to MAX_PREFILLS."""
        if not self.admitting or len(self._prefills) >= MAX_PREFILLS:
            return []
        holding, group = [*self.running, *self.prefilling], []
        widest = max((s.reserved for s in holding), default=0)
        for seq in self.waiting:
            rows = [*group, seq]
            if len(holding) + len(rows) > self.max_batch_size:
                break
            if group and len(rows) * max(len(s.prompt_ids) for s in rows) > self.prefill_tokens:
                break
            widest_now = max(widest, *(s.reserved for s in rows))
            if (len(holding) + len(rows)) * widest_now > self.max_kv_tokens and (holding or group):
                break
            group.append(seq)
        return group

    def _start_prefill(self, group: list[Sequence]) -> None:
        """Take `group` (the head of the waiting line) into a new prefill, its prompts left-padded together."""
        ids, mask = left_pad([s.prompt_ids for s in group], self.pool.tokenizer.pad_token_id)
        positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
        prefill = _Prefill(group, mask.to(self.device), ids=ids.to(self.device), positions=positions.to(self.device))
        for _ in group:
            self.waiting.popleft()
        self._prefills.append(prefill)

    def _read_prompts(self, p: _Prefill, budget: int) -> _Rows | None:
        """One chunk of a prefill (about `budget` tokens over its rows); once its prompts are read, their first
        tokens, and the rows that go on, ready to join the batch."""
        end = min(p.ids.shape[1], p.done + chunk_length(budget / len(p.seqs), p.done, self.key_cost))
        logits = self._forward(p, p.ids[:, p.done:end], p.positions[:, p.done:end])
        p.done = end
        if not p.seqs or end < p.ids.shape[1]:
            return None
        self._prefills.remove(p)
        self._advance(p, logits)
        return _Rows(p.seqs, p.mask, p.kv, p.past) if p.seqs else None

    def _join(self, rows: _Rows) -> None:
        self._running = rows if self._running is None else _joined(self._running, rows)
        self._running.trim()

    def _decode(self) -> None:
        import torch

        r = self._running
        ids = torch.tensor([[s.generated[-1]] for s in r.seqs], device=self.device)
        positions = torch.tensor([[len(s.prompt_ids) + len(s.generated) - 1] for s in r.seqs], device=self.device)
        r.mask = torch.cat([r.mask, r.mask.new_ones(len(r.seqs), 1)], 1)
        logits = self._forward(r, ids, positions)
        if r.seqs:
            self._advance(r, logits)

    def _forward(self, rows: _Rows, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Last-column logits per row, the cache extended. Should the batch fail, each row is tried alone, and
        a row that fails alone ends with its error and leaves: one bad row fails only itself."""
        import torch

        mask = rows.mask[:, :rows.past + ids.shape[1]]
        try:
            logits, rows.kv, rows.past = self._call(rows.seqs, ids, mask, positions, rows.kv, rows.past)
            return logits
        except Exception as exc:
            if len(rows.seqs) == 1:
                self._fail(rows, 0, exc)
                return None
        ok, parts = [], []
        for i, seq in enumerate(list(rows.seqs)):
            one = slice(i, i + 1)
            try:
                logits, kv, past = self._call([seq], ids[one], mask[one], positions[one],
                                              [(k[one], v[one]) for k, v in rows.kv], rows.past)
                parts.append((logits, [(k[:, :, :past], v[:, :, :past]) for k, v in kv]))
                ok.append(i)
            except Exception as exc:
                seq.error = exc
        failed = [s for i, s in enumerate(rows.seqs) if i not in ok]
        rows.kv = []
        rows.select(ok)
        rows.kv = [(torch.cat(ks), torch.cat(vs)) for ks, vs in
                   (zip(*layer) for layer in zip(*(kv for _, kv in parts)))] if parts else []
        rows.past = rows.kv[0][0].shape[2] if rows.kv else 0
        self._settle(rows)
        for seq in failed:
            log.error("generation failed for one sequence", exc_info=seq.error)
            self._end(seq)
        return torch.cat([logits for logits, _ in parts]) if parts else None

    def _call(self, seqs: list[Sequence], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
              kv: list[tuple[torch.Tensor, torch.Tensor]], past: int) -> tuple[torch.Tensor, list, int]:
        """Last-column logits, and the cache's buffers and filled length after this forward."""
        cache = _cache(kv, past)
        with self.pool.rows([s.task for s in seqs]) as kwargs:
            out = self.pool.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                  logits_to_keep=1, **{self._cache_kwarg: cache}, **kwargs)
        buffers = [getattr(layer, "buffers", (layer.keys, layer.values)) for layer in cache.layers]
        return out.logits[:, -1], buffers, past + ids.shape[1]

    def _advance(self, rows: _Rows, logits: torch.Tensor) -> None:
        """Append each row's greedy token, send its new text, and retire the rows that are done (or whose text
        failed: detokenizing or sending it ends that row alone)."""
        now, keep = time.monotonic(), []
        for i, (seq, token) in enumerate(zip(rows.seqs, logits.argmax(-1).tolist())):
            seq.generated.append(token)
            seq.first_token_at = seq.first_token_at or now
            try:
                if token == seq.eos:
                    seq.stopped = True
                else:
                    self._send(seq, seq.text.add(token))
                    seq.stopped = seq.text.stopped
            except Exception as exc:
                log.error("sending a sequence's text failed", exc_info=exc)
                seq.error = exc
            if seq.error is not None or seq.stopped or len(seq.generated) >= seq.max_tokens:
                self._end(seq)
            else:
                keep.append(i)
        if len(keep) < len(rows.seqs):
            self._select(rows, keep)

    def _select(self, rows: _Rows, keep: list[int]) -> None:
        rows.select(keep)
        self._settle(rows)

    def _settle(self, rows: _Rows) -> None:
        """After rows left: a narrower running cache, and no empty row set."""
        if rows is self._running:
            rows.trim()
            if not rows.seqs:
                self._running = None
        elif not rows.seqs and rows in self._prefills:
            self._prefills.remove(rows)

    def _fail(self, rows: _Rows, index: int, exc: Exception) -> None:
        seq = rows.seqs[index]
        log.error("generation failed for one sequence", exc_info=exc)
        seq.error = exc
        self._select(rows, [i for i in range(len(rows.seqs)) if i != index])
        self._end(seq)

    def _send(self, seq: Sequence, text: str) -> None:
        if text and seq.on_text:
            seq.on_text(seq, text)

    def _end(self, seq: Sequence) -> None:
        """Finish a sequence once: its last text, then its end callback (whose failure is logged, not raised)."""
        if seq.finished_at is not None:
            return
        seq.finished_at = time.monotonic()
        try:
            if seq.error is None and not seq.is_cancelled():
                self._send(seq, seq.text.finish())
                seq.stopped = seq.stopped or seq.text.stopped
        except Exception as exc:
            log.error("sending a sequence's last text failed", exc_info=exc)
            seq.error = exc
        try:
            if seq.on_done:
                seq.on_done(seq)
        except Exception:
            log.exception("a sequence's end callback failed")


def key_cost(model: torch.nn.Module) -> float:
    """What attending to one cached key costs a new token, as a share of what the token's pass through the
    weights costs: 2 x layers x heads x head_dim multiply-adds against one per weight outside the embeddings.
    0 (chunks by tokens alone) for a model whose config does not say its attention's shape."""
    try:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        embeddings = {id(w) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                      for w in m.parameters()}
        # PEFT's adapters sit inside the model's layers: a token's pass is the base weights'
        weights = sum(w.numel() for name, w in model.named_parameters() if id(w) not in embeddings
                      and "lora_" not in name)
        return 2 * config.num_hidden_layers * heads * head_dim / weights
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0.0


def chunk_length(tokens: float, done: int, key_cost: float) -> int:
    """Prompt columns to read in one step after `done` are read: as many as cost what `tokens` columns read
    from the start would. A column costs 1 + key_cost x the keys it attends to (`done` + half the chunk, on
    average), so the chunk is the root of c x (1 + key_cost x (done + c/2)) = that cost (in the form without
    cancellation, which holds for key_cost 0 too); at the start, `tokens`."""
    cost = tokens * (1 + key_cost * tokens / 2)
    start = 1 + key_cost * done
    return max(1, math.floor(2 * cost / (start + math.sqrt(start * start + 2 * key_cost * cost)) + 1e-9))


def _joined(a: _Rows, b: _Rows) -> _Rows:
    """Two row sets in one cache, the narrower padded on the left."""
    import torch
    import torch.nn.functional as F

    width = max(a.past, b.past)

    def pad(rows: _Rows) -> tuple[torch.Tensor, list]:
        left = width - rows.past
        return F.pad(rows.mask, (left, 0)), [(F.pad(k, (0, 0, left, 0)), F.pad(v, (0, 0, left, 0)))
                                             for k, v in rows.filled]

    (mask_a, kv_a), (mask_b, kv_b) = pad(a), pad(b)
    return _Rows(a.seqs + b.seqs, torch.cat([mask_a, mask_b]),
                 [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(kv_a, kv_b)], width)


def _cache(kv: list[tuple[torch.Tensor, torch.Tensor]], past: int):
    """A DynamicCache over our buffers, without copying them; empty, the model makes its own layers."""
    from transformers import DynamicCache

    from .kvcache import AppendingLayer

    cache = DynamicCache()
    cache.layers.extend(AppendingLayer(keys, values, past) for keys, values in kv)
    return cache
