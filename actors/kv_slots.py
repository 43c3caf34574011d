"""Slot-based KV storage for the running batch of the session engine.

Each decoder layer owns one key slab and one value slab of shape
``[slots, kv_heads, width, head_dim]``. A running row lives in one slot and keeps
its tokens right-padded in columns ``[0, length)``; the next token of row ``b`` is
written at column ``length[b]``. Rows of the running batch always occupy the
contiguous slots ``[0, n)`` (a leaving row is replaced by the last one, one row
copy), so a decode step works on views of the slabs and never copies the cache:
compare ``DynamicCache``, which concatenates (copies) the whole cache every step.

Columns at or beyond a row's length hold junk (pad tokens of a ragged prefill,
the leftovers of a previous occupant); the attention mask built from the write
positions never lets a real query see them, and they are overwritten as the row grows.

``SlotForwardCache`` plugs the slabs into an unmodified transformers model: its
layers' ``update`` scatter the new keys/values at the planned positions and return
views ``[rows, kv_heads, :read_width, head_dim]`` for attention.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class KVSlots:
    """Per-layer key/value slabs that grow (by reallocation, doubling) on demand."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.slots, self.width = 0, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def ensure(self, slots: int, width: int, used: int) -> None:
        """Make room for ``slots`` rows of ``width`` columns, keeping rows ``[0, used)``."""
        if slots <= self.slots and width <= self.width:
            return
        new_slots = max(slots, min(2 * self.slots, slots + 64)) if slots > self.slots else self.slots
        new_width = max(width, self.width + self.width // 2) if width > self.width else self.width
        shape = (new_slots, self.kv_heads, new_width, self.head_dim)
        keys, values = [], []
        for i in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if used and self.keys:
                k[:used, :, : self.width] = self.keys[i][:used]
                v[:used, :, : self.width] = self.values[i][:used]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values
        self.slots, self.width = new_slots, new_width

    def write_row(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a session's cached keys/values (per layer ``[kv_heads, L, head_dim]``) into a slot."""
        for i, (k, v) in enumerate(kv):
            n = k.shape[1]
            self.keys[i][slot, :, :n] = k
            self.values[i][slot, :, :n] = v

    def read_row(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A compact copy of the first ``length`` columns of a slot (per layer ``[kv_heads, L, head_dim]``)."""
        return [(self.keys[i][slot, :, :length].clone(), self.values[i][slot, :, :length].clone())
                for i in range(self.num_layers)]

    def move_row(self, src: int, dst: int, length: int) -> None:
        for i in range(self.num_layers):
            self.keys[i][dst, :, :length] = self.keys[i][src, :, :length]
            self.values[i][dst, :, :length] = self.values[i][src, :, :length]

    def release(self) -> None:
        """Drop the slabs (the engine is idle); they are reallocated on the next admission."""
        self.keys, self.values = [], []
        self.slots, self.width = 0, 0


class _SlotLayer(DynamicLayer):
    def __init__(self, cache: "SlotForwardCache", index: int):
        super().__init__()
        self._cache, self._index = cache, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        k_slab = c.slots.keys[self._index][c.lo:c.hi]  # [B, Hkv, W, D] view
        v_slab = c.slots.values[self._index][c.lo:c.hi]
        # key_states: [B, Hkv, Q, D] -> scattered at (row b, column pos[b, q])
        k_slab[c.rows, :, c.write_pos] = key_states.permute(0, 2, 1, 3).to(k_slab.dtype)
        v_slab[c.rows, :, c.write_pos] = value_states.permute(0, 2, 1, 3).to(v_slab.dtype)
        self.keys, self.values = k_slab[:, :, : c.read_width], v_slab[:, :, : c.read_width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._cache.read_width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.read_width, 0


class SlotForwardCache(DynamicCache):
    """The cache handed to one forward pass over slots ``[lo, hi)``.

    ``write_pos`` long[B, Q]: the column each input token's key/value goes to.
    ``read_width``: how many leading columns attention reads (mask covers the rest).
    """

    def __init__(self, slots: KVSlots, lo: int, hi: int, write_pos: torch.Tensor, read_width: int):
        super().__init__()
        self.slots, self.lo, self.hi = slots, lo, hi
        self.write_pos, self.read_width = write_pos, read_width
        self.rows = torch.arange(hi - lo, device=write_pos.device)[:, None]  # [B, 1]
        self.layers = [_SlotLayer(self, i) for i in range(slots.num_layers)]
        self.layer_class_to_replicate = None
