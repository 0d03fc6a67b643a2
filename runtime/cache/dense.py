"""The float KV cache: preallocated per-layer buffers that grow geometrically.

A decode step appends one token's keys and values in place (no re-concatenation of the cache in
Python); capacity doubles when full, so the amortised append cost is O(1) per token.
"""

from __future__ import annotations

import numpy as np

from optc.runtime.cache.buffers import GrowableArray
from optc.runtime.manifest import past_name


class KVCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, *, dtype=np.float32, initial_capacity: int = 256):
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self._initial = initial_capacity
        self.reset()

    def reset(self) -> None:
        make = lambda: GrowableArray(self.kv_heads, (self.head_dim,), self.dtype, self._initial)  # noqa: E731
        self.keys = [make() for _ in range(self.n_layers)]
        self.values = [make() for _ in range(self.n_layers)]

    @property
    def length(self) -> int:
        return self.keys[0].length

    @property
    def capacity(self) -> int:
        return self.keys[0].capacity

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """Append [1, kv_heads, n, head_dim] per layer, for all layers at once."""
        for i in range(self.n_layers):
            self.keys[i].append(new_keys[i])
            self.values[i].append(new_values[i])

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the filled part of layer `layer` (no copy here)."""
        return self.keys[layer].view(), self.values[layer].view()

    def evict(self, start: int, count: int) -> None:
        """Drop tokens [start, start+count), moving the later ones down (bounded by the window)."""
        for arr in self.keys + self.values:
            arr.delete(start, start + count)

    def feeds(self) -> dict[str, np.ndarray]:
        """The graph's cache inputs for the next step."""
        out = {}
        for i in range(self.n_layers):
            out[past_name(i, "key")], out[past_name(i, "value")] = self.past(i)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held for the tokens now in the cache."""
        return sum(a.nbytes for a in self.keys + self.values)
