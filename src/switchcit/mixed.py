"""Mixed-adapter LoRA in one batched product per layer (the idea of Punica/S-LoRA's BGMV).

PEFT's mixed-adapter batches loop over the adapters present inside every LoRA layer (select rows, two
small matmuls, scatter back). Here each layer keeps its adapters' A and B stacked once ([K+1, r, in] and
[K+1, out, r], slot 0 all zeros for the base model); a batch gathers each row's pair and applies them
with two `bmm`s, whatever the mix. Outputs equal PEFT's within float tolerance (tests pin this).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from peft import PeftModel


class MixedLoRA:
    """Stacked LoRA weights of a PeftModel's adapters, and a context that applies them per batch row."""

    def __init__(self, model: PeftModel, adapters: list[str]):
        from peft.tuners.lora import Linear

        self.model = model
        self.adapters = list(adapters)
        self.slots = {name: i + 1 for i, name in enumerate(self.adapters)}
        self.layers: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
        for module in model.modules():
            if not isinstance(module, Linear):
                continue
            present = [a for a in self.adapters if a in module.lora_A]
            if not present:
                continue
            rank = max(module.r[a] for a in present)
            weight = module.base_layer.weight
            a_stack = weight.new_zeros(len(self.adapters) + 1, rank, module.in_features)
            b_stack = weight.new_zeros(len(self.adapters) + 1, module.out_features, rank)
            for name in present:
                slot, r = self.slots[name], module.r[name]
                a_stack[slot, :r] = module.lora_A[name].weight.detach()
                b_stack[slot, :, :r] = module.lora_B[name].weight.detach() * module.scaling[name]
            self.layers.append((module, a_stack, b_stack))
        self._rows: torch.Tensor | None = None

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

    def _hook(self, a_stack: torch.Tensor, b_stack: torch.Tensor):
        import torch

        def add_delta(module, args, output):
            x = args[0]
            rows = self._rows
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_stack.dtype)
            hidden = torch.bmm(flat, a_stack[rows].transpose(1, 2))
            delta = torch.bmm(hidden, b_stack[rows].transpose(1, 2))
            return output + delta.reshape(*output.shape).to(output.dtype)

        return add_delta

    @contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Within the block, row i of every forward pass uses adapter names[i] ('__base__' or unknown: none)."""
        import torch

        device = self.layers[0][1].device if self.layers else "cpu"
        self._rows = torch.tensor([self.slots.get(n, 0) for n in names], device=device)
        handles = [m.register_forward_hook(self._hook(a, b)) for m, a, b in self.layers]
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for handle in handles:
                handle.remove()
            self._rows = None
