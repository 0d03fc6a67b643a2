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
        self._buffer_map: dict[str, np.ndarray] | None = None  # buffers(): the map last handed out
        self._buffer_room = 0

    @property
    def length(self) -> int:
        """Tokens in layer 0's cache (every token seen; later layers may hold fewer)."""
        return self.keys[0].length

    @property
    def layer_lengths(self) -> list[int]:
        """Tokens cached per layer: all equal, except after a prefill that dropped prompt tokens
        from some layer on (token_dropping mode prefill; appends keep the difference) and for a
        layer that layer_routing skips (its cache stops)."""
        return [k.length for k in self.keys]

    @property
    def capacity(self) -> int:
        return self.keys[0].capacity

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """Append [1, kv_heads, n, head_dim] per layer, for all layers at once."""
        for i in range(self.n_layers):
            self.keys[i].append(new_keys[i])
            self.values[i].append(new_values[i])

    # -- the fused path: the executor writes new entries into these buffers itself --------
    def buffers(self, room: int) -> dict[str, np.ndarray]:
        """The whole buffers (capacity >= length + room) by graph input name, for an executor
        that writes the next `room` entries in place (ONNX Runtime's GroupQueryAttention). The
        same dict object is returned until a buffer grows, so the executor can tell with one
        identity test that nothing needs rebinding (buffers move only in reserve, which replaces
        the dict)."""
        out = self._buffer_map
        if out is not None and self.keys[0].length + room <= self._buffer_room:
            return out
        out = {}
        for i in range(self.n_layers):
            for kind, arr in (("key", self.keys[i]), ("value", self.values[i])):
                # (every buffer grows alike, to layer 0's length, which every token reaches: a
                # layer that layer_routing skips holds fewer but keeps the same room, so the map
                # stays valid for as many steps as any other layer's room allows)
                arr.reserve(self.length + room)
                out[past_name(i, kind)] = arr.data
        self._buffer_room = min(arr.capacity for arr in self.keys + self.values)
        self._buffer_map = out
        return out

    def advance(self, n: int, skipped=(), pruned: tuple[int, int] | None = None) -> None:
        """The executor wrote `n` entries past the filled part of every buffer but those of the
        `skipped` layers (layer_routing: a skipped layer's cache is not extended). `pruned`:
        (first layer, rows) for token_dropping, whose layers from that one on wrote `rows` (the
        kept tokens)."""
        for i in range(self.n_layers):
            if i not in skipped:
                step = pruned[1] if pruned is not None and i >= pruned[0] else n
                self.keys[i].length += step
                self.values[i].length += step

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the filled part of layer `layer` (no copy here)."""
        return self.keys[layer].view(), self.values[layer].view()

    def evict(self, start: int, count: int, layer: int | None = None) -> None:
        """Drop tokens [start, start+count) of every layer (or of `layer`), moving the later ones
        down (bounded by the window)."""
        layers = range(self.n_layers) if layer is None else (layer,)
        for i in layers:
            self.keys[i].delete(start, start + count)
            self.values[i].delete(start, start + count)

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
