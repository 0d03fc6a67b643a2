"""The runtime's KV cache: preallocated per-layer buffers that grow geometrically.

A decode step appends one token's keys and values in place (no re-concatenation of the cache in
Python); capacity doubles when full, so the amortised append cost is O(1) per token.
"""

from __future__ import annotations

import numpy as np

from optc.runtime.artifact import ArtifactError
from optc.runtime.manifest import LAYOUT_FLOAT, LAYOUT_KIVI, H2OPolicy, KVCacheSpec, past_name


def aligned_zeros(shape, dtype, align: int = 64) -> np.ndarray:
    """A zeroed array whose data is `align`-byte aligned (TVM takes numpy memory in place via
    DLPack only if it is 64-byte aligned)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


class GrowableArray:
    """A preallocated [1, heads, capacity, *tail] array filled along axis 2; capacity doubles
    when full. Every cache layout (float, quantised codes, scales) is built from these."""

    def __init__(self, heads: int, tail: tuple, dtype, capacity: int = 256):
        self.heads, self.tail, self.dtype = heads, tuple(tail), np.dtype(dtype)
        # aligned: an executor may hand the whole buffer to TVM in place (tvm_executor._stage)
        self.data = aligned_zeros((1, heads, max(1, capacity)) + self.tail, self.dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    def append(self, x: np.ndarray) -> None:
        n = x.shape[2]
        if self.length + n > self.capacity:
            cap = self.capacity
            while cap < self.length + n:
                cap *= 2
            new = aligned_zeros((1, self.heads, cap) + self.tail, self.dtype)
            new[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = new
        self.data[:, :, self.length:self.length + n] = x
        self.length += n

    def view(self) -> np.ndarray:
        """The filled part (a view, no copy)."""
        return self.data[:, :, : self.length]

    def delete(self, start: int, stop: int) -> None:
        """Drop entries [start, stop), moving the later ones down."""
        if stop > start:
            self.data[:, :, start:self.length - (stop - start)] = self.data[:, :, stop:self.length].copy()
            self.length -= stop - start

    def take(self, indices: np.ndarray) -> None:
        """Keep only the entries at `indices` (ascending), in that order."""
        n = len(indices)
        self.data[:, :, :n] = self.data[:, :, indices]
        self.length = n

    @property
    def nbytes(self) -> int:
        return self.view().nbytes


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


class H2OCache(KVCache):
    """H2O-style eviction (Zhang et al. 2023): every cached token accumulates the attention it
    receives (summed over heads and queries, per layer); when the cache exceeds its budget each
    layer drops its lowest-scoring tokens outside the first `sinks` and the last `recent`.
    Keys keep their original RoPE positions, so no re-rotation is needed."""

    def __init__(self, n_layers, kv_heads, head_dim, *, policy: H2OPolicy, **kw):
        self.policy = policy
        super().__init__(n_layers, kv_heads, head_dim, **kw)

    def reset(self) -> None:
        super().reset()
        self.scores = [np.zeros(0) for _ in range(self.n_layers)]  # per layer, one per cached token

    def observe(self, attention: list[np.ndarray]) -> None:
        """attention[i]: layer i's probabilities [1, heads, new tokens, cache length]."""
        for i, probs in enumerate(attention):
            received = probs.sum(axis=(0, 1, 2))
            received[: len(self.scores[i])] += self.scores[i]  # new tokens start from zero
            self.scores[i] = received

    def budget(self, tokens_seen: int) -> int:
        p = self.policy
        floor = p.sinks + p.recent + 1
        return p.budget if p.budget else max(floor, int(np.ceil(p.ratio * tokens_seen)))

    def enforce_budget(self, tokens_seen: int) -> None:
        length = self.length  # fixed before layer 0's eviction changes it
        lo, hi = self.policy.sinks, length - self.policy.recent
        excess = min(length - self.budget(tokens_seen), hi - lo)
        if excess <= 0:
            return
        middle = np.arange(lo, hi)
        for i in range(self.n_layers):
            drop = middle[np.argsort(self.scores[i][lo:hi], kind="stable")[:excess]]
            keep = np.setdiff1d(np.arange(length), drop)
            self.keys[i].take(keep)
            self.values[i].take(keep)
            self.scores[i] = self.scores[i][keep]


def make_cache(spec: KVCacheSpec, model_cfg: dict):
    """The cache the manifest's `kv_cache` section asks for."""
    dims = (model_cfg["n_layers"], model_cfg["kv_heads"], model_cfg["head_dim"])
    if spec.layout == LAYOUT_FLOAT and isinstance(spec.policy, H2OPolicy):
        return H2OCache(*dims, policy=spec.policy)
    if spec.layout == LAYOUT_FLOAT:
        return KVCache(*dims)
    if spec.layout == LAYOUT_KIVI and not isinstance(spec.policy, H2OPolicy):
        from optc.runtime.kv_quant import QuantizedKVCache

        k = spec.kivi
        return QuantizedKVCache(*dims, bits=k.bits, group_size=k.group_size, residual=k.residual,
                                symmetric=k.symmetric, key_quant=k.key_quant)
    raise ArtifactError(f"manifest.json: kv_cache: layout {spec.layout!r} with policy {spec.policy!r} "
                        f"is not supported")
