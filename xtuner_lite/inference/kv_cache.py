"""The running batch's keys and values, written in place into buffers with room to grow.

Why not transformers' ``DynamicCache``: it appends each token with ``torch.cat``, copying the
whole cache of every layer on every step, a large share of a small model's decode step on
CPU. Here a step writes one column per layer; buffers
grow by ``GROW`` columns at a time, so the copy happens once per ``GROW`` tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

GROW = 128  # columns added when a buffer is full


class KVCache:
    """Per layer a (batch, kv_heads, capacity, head_dim) key and value buffer; columns
    ``[0, length)`` are filled (rows are left-padded to a common length; the engine's attention
    mask says which columns are real)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def from_tensors(
        cls, keys: list[torch.Tensor], values: list[torch.Tensor], room: int = GROW
    ) -> KVCache:
        """Copy filled (batch, kv_heads, length, head_dim) tensors into buffers with ``room``
        free columns."""
        length = keys[0].shape[2]
        return cls(
            [_with_room(k, length + room) for k in keys],
            [_with_room(v, length + room) for v in values],
            length,
        )

    def filled(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the filled columns of one layer."""
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` more columns (grows every layer by whole ``GROW`` blocks)."""
        needed = self.length + columns
        capacity = self.keys[0].shape[2]
        if needed <= capacity:
            return
        capacity += -(-(needed - capacity) // GROW) * GROW
        self.keys = [_with_room(k[:, :, : self.length], capacity) for k in self.keys]
        self.values = [_with_room(v[:, :, : self.length], capacity) for v in self.values]

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new columns after the filled ones (``reserve`` first) and return views of the
        layer's filled columns including them; ``advance`` once all layers are written."""
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length : end] = keys
        self.values[layer][:, :, self.length : end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, columns: int) -> None:
        self.length += columns

    def select(self, rows: torch.Tensor, first: int) -> None:
        """Keep only ``rows``, and the columns from ``first`` on (leading all-padding columns
        left by finished rows)."""
        self.keys = [
            _with_room(k[rows, :, first : self.length], self.length - first + GROW)
            for k in self.keys
        ]
        self.values = [
            _with_room(v[rows, :, first : self.length], self.length - first + GROW)
            for v in self.values
        ]
        self.length -= first

    def extend(self, other: KVCache) -> None:
        """Append ``other``'s rows below ours, left-padding the shorter side's columns."""
        length = max(self.length, other.length)
        capacity = length + GROW

        def stack(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            out = mine.new_zeros(
                mine.shape[0] + theirs.shape[0], *mine.shape[1:2], capacity, mine.shape[3]
            )
            out[: mine.shape[0], :, length - self.length : length] = mine[:, :, : self.length]
            out[mine.shape[0] :, :, length - other.length : length] = theirs[:, :, : other.length]
            return out

        self.keys = [stack(a, b) for a, b in zip(self.keys, other.keys)]
        self.values = [stack(a, b) for a, b in zip(self.values, other.values)]
        self.length = length

    def as_transformers_cache(self) -> Cache:
        """A transformers ``Cache`` over these buffers, for a model forward of models the fast
        decoder does not cover; ``advance`` after the forward."""
        return Cache(layers=[_InPlaceLayer(self, i) for i in range(len(self.keys))])


def first_used_column(mask: torch.Tensor) -> int:
    """The first column of a (rows, columns) mask that some row uses (the width if none):
    the columns before it are padding every row shares, and can be dropped."""
    used = mask.any(0).nonzero()
    return int(used[0]) if len(used) else mask.shape[1]


def _with_room(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """A (batch, heads, capacity, dim) buffer whose first columns are ``t``."""
    out = t.new_zeros(t.shape[0], t.shape[1], capacity, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out


class _InPlaceLayer(DynamicLayer):
    """One layer of a ``KVCache`` seen through transformers' cache-layer interface."""

    def __init__(self, cache: KVCache, layer: int):
        super().__init__()
        self.cache, self.layer = cache, layer
        self.keys, self.values = cache.filled(layer)
        self.dtype, self.device = self.keys.dtype, self.keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self.cache.write(self.layer, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cache.length
