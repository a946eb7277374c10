"""A KV-cache layer that appends in place, for the continuous batch (batching.py).

transformers' DynamicLayer concatenates each new token to the whole cache, copying all of it every
step: with 32 rows of a few hundred tokens that is hundreds of MB per step on a small model. This layer
writes new columns into preallocated room and grows its buffers GROWTH columns at a time. It keeps the
DynamicLayer interface, so the model's attention code uses it unchanged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

GROWTH = 64  # columns added when the room runs out: one copy of the cache per GROWTH tokens


class AppendingLayer(DynamicLayer):
    """Key and value buffers [rows, heads, room, dim] of which the first `length` columns are filled."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.is_initialized, self.device = True, keys.device
        self.buffers, self.length = (keys, values), length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[2]
        if end > self.buffers[0].shape[2]:
            self.buffers = tuple(_grown(b, self.length, end + GROWTH) for b in self.buffers)
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, self.length:end] = new
        self.length = end
        self.keys, self.values = (b[:, :, :end] for b in self.buffers)
        return self.keys, self.values


def _grown(buffer: torch.Tensor, filled: int, room: int) -> torch.Tensor:
    grown = buffer.new_empty(*buffer.shape[:2], room, buffer.shape[3])
    grown[:, :, :filled] = buffer[:, :, :filled]
    return grown
