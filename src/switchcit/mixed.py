"""Mixed-adapter LoRA: one batch, a different adapter per row, in a few plain products per layer.

PEFT's mixed-adapter batches loop over the adapters present inside every LoRA layer, in Python (select rows,
two small matmuls, scatter back). Here each layer stacks its adapters' A and B once per change of the
adapter set, and two layouts apply them. With up to DENSE_UP_TO adapters, A sits as [K*r, in] and B
(scaled) as [out, K*r]: every row goes through all of them in two ordinary matmuls and a mask keeps only
the columns of its own adapter, the fewest tensor ops. With more, the masked flops grow with K, so rows
are ordered by adapter and one grouped matrix product (`torch.nn.functional.grouped_mm`, in C++, groups of
contiguous rows, empty groups allowed) applies each adapter's A ([K, in, r]) and B ([K, r, out]) in place:
the work and the weights read grow with the rows, not with K, and no weight is copied per step (per-row
gathers, Punica's BGMV, copy r*(in+out) weights per row and layer: most of their time on a CPU). On a CPU
the grouped product loops over the groups, one small matrix product each, so a decoding step (one token per
row) spent its time on K tiny products per layer; there each adapter's rows are padded to the most any
adapter has and two batched products (`torch.bmm`) take all K at once, as long as padding does not more
than double the rows (one layer at 32 adapters: 332 -> 168 us; the whole step in the README, many
adapters). On a GPU `grouped_mm` has its own kernels, so the padding is not used there (not measured).
A batch whose rows all use one adapter (one task's traffic) skips both layouts: two plain products on that
adapter's slice of the stack, as a model with a single LoRA runs. A batch on at most half of the stacked
adapters (a server's batch of a few tasks with dozens loaded) takes their weights apart once per set of
adapters, kept for the next steps: on a CPU `grouped_mm` spends ~6 us per empty group (4 adapters present of
32 stacked: 244 -> 66 us a layer), more than the copy of the few adapters' weights.
Rows of the base model use no adapter. Outputs equal PEFT's within float tolerance (tests pin every layout).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from peft import PeftModel

DENSE_UP_TO = 4  # adapters; beyond, grouped + padded is faster (benchmarks/lora_step.py, --sweep; README)
PADDED_UP_TO = 2.0  # padded rows per real row, at most, for a decoding step's batched products
NO_ADAPTER = "__base__"  # PEFT's name for a row of the base model in mixed-adapter batches


class MixedLoRA:
    """Stacked LoRA weights of a PeftModel's adapters, and a context that applies them per batch row."""

    def __init__(self, model: PeftModel, adapters: list[str], dense: bool | None = None):
        """`dense`: the masked product over all adapters (default: with up to DENSE_UP_TO), else grouped products."""
        from peft.tuners.lora import Linear

        self.model = model
        self.adapters = list(adapters)
        self.index = {name: i for i, name in enumerate(self.adapters)}
        self.dense = len(self.adapters) <= DENSE_UP_TO if dense is None else dense
        self.layers: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
        k = len(self.adapters)
        for module in model.modules():
            if not isinstance(module, Linear):
                continue
            present = [a for a in self.adapters if a in module.lora_A]
            if not present:
                continue
            rank = max(module.r[a] for a in present)
            weight = module.base_layer.weight
            a_all = weight.new_zeros(k * rank, module.in_features)
            b_all = weight.new_zeros(module.out_features, k * rank)
            for name in present:
                start, r = self.index[name] * rank, module.r[name]
                a_all[start:start + r] = module.lora_A[name].weight.detach()
                b_all[:, start:start + r] = module.lora_B[name].weight.detach() * module.scaling[name]
            if not self.dense:
                a_all = a_all.view(k, rank, -1).transpose(1, 2).contiguous()  # [K, in, rank]
                b_all = b_all.view(-1, k, rank).permute(1, 2, 0).contiguous()  # [K, rank, out]
            self.layers.append((module, a_all, b_all))
        self.tuner_layers = tuner_layers(model)
        self._masks: dict[int, torch.Tensor] = {}  # dense: per rank, [rows, K*rank] ones on each row's adapter
        # else: the rows with an adapter in adapter order (None: in order already, base-model rows last), rows per
        # adapter, and how many rows have one; the grouped product's offsets per sequence length (rows * length:
        # a row's positions are contiguous)
        self._groups: tuple[torch.Tensor | None, torch.Tensor, int] | None = None
        self._offsets: dict[int, torch.Tensor] = {}
        # decoding steps: (each row's place among K groups of `per_group` padded rows, None when the rows fill
        # them exactly, per_group); None when padding would more than PADDED_UP_TO-fold the rows
        self._padded: tuple[torch.Tensor | None, int] | None = None
        self._single: int | None = None  # the adapter of every row, when they all use the same one
        # grouped layout: the adapters present in the last batch on at most half of them, and their weights
        self._present: tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = ((), [])

    def _present_weights(self, present: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's A and B of the adapters `present` only (grouped layout): kept for the next batch on the
        same adapters, as a decoding loop's steps are."""
        key = tuple(present.tolist())
        if self._present[0] != key:
            self._present = key, [(a.index_select(0, present), b.index_select(0, present)) for _, a, b in self.layers]
        return self._present[1]

    @staticmethod
    def supports(model: PeftModel, adapters: list[str]) -> bool:
        """Plain LoRA on linear layers only (no DoRA or other variants, no LoRA bias)."""
        from peft.tuners.lora import Linear, LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer):
                if not isinstance(module, Linear):
                    return False
                if any(a in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(a, False)
                       for a in adapters):
                    return False
        return True

    def _hook(self, a_all: torch.Tensor, b_all: torch.Tensor):
        import torch
        import torch.nn.functional as F

        def dense(module, args, output):  # as few tensor ops as possible: on a CPU each costs ~10 us a layer
            x = args[0] if args[0].dtype == a_all.dtype else args[0].to(a_all.dtype)
            rank = a_all.shape[0] // len(self.adapters)
            hidden = F.linear(x, a_all).mul_(self._masks[rank].view(x.shape[0], *[1] * (x.dim() - 2), -1))
            if output.dtype != a_all.dtype:
                return output + F.linear(hidden, b_all).to(output.dtype)
            flat = output.reshape(-1, output.shape[-1])
            return torch.addmm(flat, hidden.reshape(-1, hidden.shape[-1]), b_all.t()).view_as(output)

        def grouped(module, args, output):
            x = args[0] if args[0].dtype == a_all.dtype else args[0].to(a_all.dtype)
            order, counts, used = self._groups
            length = x.numel() // (x.shape[0] * x.shape[-1])
            rows = x[:used] if order is None else x.index_select(0, order)
            if length == 1 and self._padded is not None:
                delta = padded_products(rows.reshape(used, -1), *self._padded)
            else:
                offsets = self._offsets.get(length)
                if offsets is None:
                    offsets = self._offsets[length] = (counts * length).cumsum(0).to(torch.int32)
                delta = F.grouped_mm(F.grouped_mm(rows.reshape(-1, x.shape[-1]), a_all, offs=offsets), b_all,
                                     offs=offsets)
            flat = output.view(output.shape[0], -1)  # the base layer's fresh output: added to in place
            delta = delta.view(-1, flat.shape[1]).to(output.dtype)
            if order is None:
                flat[:used].add_(delta)
            else:
                flat.index_add_(0, order, delta)
            return output

        def single(module, args, output):  # every row uses adapter k: its own A and B, no mask, no grouping
            x = args[0] if args[0].dtype == a_all.dtype else args[0].to(a_all.dtype)
            hidden = x.reshape(-1, x.shape[-1]) @ a_k
            flat = output.view(-1, output.shape[-1])  # the base layer's fresh output: added to in place
            if output.dtype == a_all.dtype:
                flat.addmm_(hidden, b_k)
            else:
                flat.add_((hidden @ b_k).to(output.dtype))
            return output

        def padded_products(rows: torch.Tensor, places: torch.Tensor | None, per_group: int) -> torch.Tensor:
            k = a_all.shape[0]
            if places is None:  # every adapter has per_group rows, in order: a view, nothing copied
                padded = rows.view(k, per_group, -1)
            else:
                padded = rows.new_zeros(k * per_group, rows.shape[1]).index_copy_(0, places, rows)
                padded = padded.view(k, per_group, -1)
            delta = torch.bmm(torch.bmm(padded, a_all), b_all).view(k * per_group, -1)
            return delta if places is None else delta.index_select(0, places)

        if self._single is None:
            return dense if self.dense else grouped
        k = self._single
        if self.dense:
            rank = a_all.shape[0] // len(self.adapters)
            a_k, b_k = a_all[k * rank:(k + 1) * rank].t(), b_all[:, k * rank:(k + 1) * rank].t()
        else:
            a_k, b_k = a_all[k], b_all[k]
        return single

    @contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Within the block, row i of every forward pass uses adapter names[i] (NO_ADAPTER: none). A name that is
        not one of the stacked adapters is an error, never the base model in its place."""
        import torch

        unknown = sorted({n for n in names if n != NO_ADAPTER and n not in self.index})
        if unknown:
            raise KeyError(f"adapter(s) {unknown} are not among the stacked adapters {self.adapters}")
        device = self.layers[0][1].device if self.layers else "cpu"
        dtype = self.layers[0][1].dtype if self.layers else torch.float32
        rows = torch.tensor([self.index.get(n, -1) for n in names], device=device)
        used = rows >= 0
        self._single = int(rows[0]) if len(names) and bool((rows == rows[0]).all()) and bool(used[0]) else None
        if self.dense:
            one_hot = torch.zeros(len(names), len(self.adapters), dtype=dtype, device=device)
            one_hot[used, rows[used]] = 1
            ranks = {a.shape[0] // len(self.adapters) for _, a, _ in self.layers}
            self._masks = {r: one_hot.repeat_interleave(r, dim=1) for r in ranks}
        weights = [(a, b) for _, a, b in self.layers]
        if not self.dense and self._single is None:
            present, groups = torch.unique(rows[used]), len(self.adapters)
            if 0 < len(present) <= groups // 2:  # the groups of the adapters present only, no empty ones
                weights, groups = self._present_weights(present), len(present)
                rows = torch.searchsorted(present, rows).masked_fill_(~used, -1)
            order = torch.argsort(torch.where(used, rows, groups), stable=True)[:int(used.sum())]
            in_order = bool((order == torch.arange(len(order), device=device)).all())  # base-model rows last
            counts = torch.bincount(rows[used], minlength=groups)
            self._groups = (None if in_order else order, counts, len(order))
            self._padded = padded_places(rows[order], counts) if rows.device.type == "cpu" else None
        handles = [m.register_forward_hook(self._hook(a, b)) for (m, _, _), (a, b) in zip(self.layers, weights)]
        try:
            with adapters_off(self.tuner_layers):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self._masks, self._groups, self._offsets, self._padded, self._single = {}, None, {}, None, None


def padded_places(adapters: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor | None, int] | None:
    """For rows in adapter order (`adapters`: each row's adapter index), each row's place when every one of the
    K adapters gets as many padded rows as the most any has (None: the rows fill those places exactly), and
    that number; None when the padded rows would be more than PADDED_UP_TO times the real ones."""
    import torch

    per_group = int(counts.max()) if len(adapters) else 0
    if not len(adapters) or len(counts) * per_group > PADDED_UP_TO * len(adapters):
        return None
    if len(counts) * per_group == len(adapters):
        return None, per_group
    first = torch.cumsum(counts, 0) - counts  # each adapter's first row in the ordered rows
    return adapters * per_group + torch.arange(len(adapters), device=adapters.device) - first[adapters], per_group


def tuner_layers(model: PeftModel) -> list:
    """The model's PEFT layers (walking a model with adapters takes milliseconds: callers keep the list)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_off(layers: list) -> Iterator[None]:
    """These PEFT layers run their base layer alone for the block. PEFT's `disable_adapter()` does the same but
    first surveys the whole model (~100 ms on a 135M model), too slow for every decoding step of a batch."""
    before = [m.disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True  # what BaseTunerLayer.enable_adapters(False) sets, without its grad bookkeeping
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was
