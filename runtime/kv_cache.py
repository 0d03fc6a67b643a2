"""The runtime's KV cache: preallocated per-layer buffers that grow geometrically.

A decode step appends one token's keys and values in place (no re-concatenation of the cache in
Python); capacity doubles when full, so the amortised append cost is O(1) per token.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, *, dtype=np.float32, initial_capacity: int = 256):
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self._initial = max(1, initial_capacity)
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.capacity = self._initial
        shape = (1, self.kv_heads, self.capacity, self.head_dim)
        self.keys = [np.zeros(shape, self.dtype) for _ in range(self.n_layers)]
        self.values = [np.zeros(shape, self.dtype) for _ in range(self.n_layers)]

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        while cap < needed:
            cap *= 2
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = np.zeros((1, self.kv_heads, cap, self.head_dim), self.dtype)
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new
        self.capacity = cap

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """Append [1, kv_heads, n, head_dim] per layer, for all layers at once."""
        n = new_keys[0].shape[2]
        if self.length + n > self.capacity:
            self._grow(self.length + n)
        end = self.length + n
        for i in range(self.n_layers):
            self.keys[i][:, :, self.length:end] = new_keys[i]
            self.values[i][:, :, self.length:end] = new_values[i]
        self.length = end

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the filled part of layer `layer` (no copy here)."""
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def evict(self, start: int, count: int) -> None:
        """Drop tokens [start, start+count), moving the later ones down (bounded by the window)."""
        end = self.length
        for store in (self.keys, self.values):
            for buf in store:
                buf[:, :, start:end - count] = buf[:, :, start + count:end].copy()
        self.length -= count

    def feeds(self) -> dict[str, np.ndarray]:
        """The graph's cache inputs for the next step."""
        out = {}
        for i in range(self.n_layers):
            out[f"past_key_values.{i}.key"], out[f"past_key_values.{i}.value"] = self.past(i)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held for the tokens now in the cache."""
        return 2 * self.n_layers * self.kv_heads * self.length * self.head_dim * self.dtype.itemsize

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.n_layers * self.kv_heads * self.capacity * self.head_dim * self.dtype.itemsize


class H2OCache(KVCache):
    """H2O-style eviction (Zhang et al. 2023): every cached token accumulates the attention it
    receives (summed over heads and queries, per layer); when the cache exceeds its budget each
    layer drops its lowest-scoring tokens outside the first `sinks` and the last `recent`.
    Keys keep their original RoPE positions, so no re-rotation is needed."""

    def __init__(self, n_layers, kv_heads, head_dim, *, policy: dict, **kw):
        self.policy = policy
        super().__init__(n_layers, kv_heads, head_dim, **kw)

    def reset(self) -> None:
        super().reset()
        self.scores = [np.zeros(self.capacity) for _ in range(self.n_layers)]

    def _grow(self, needed: int) -> None:
        super()._grow(needed)
        for i, old in enumerate(self.scores):
            new = np.zeros(self.capacity)
            new[: len(old)] = old
            self.scores[i] = new

    def observe(self, attention: list[np.ndarray]) -> None:
        """attention[i]: layer i's probabilities [1, heads, new tokens, cache length]."""
        for i, probs in enumerate(attention):
            self.scores[i][: probs.shape[-1]] += probs.sum(axis=(0, 1, 2))

    def budget(self, tokens_seen: int) -> int:
        p = self.policy
        floor = p["sinks"] + p["recent"] + 1
        return p["budget"] if p.get("budget") else max(floor, int(np.ceil(p["ratio"] * tokens_seen)))

    def enforce_budget(self, tokens_seen: int) -> None:
        excess = self.length - self.budget(tokens_seen)
        lo, hi = self.policy["sinks"], self.length - self.policy["recent"]
        excess = min(excess, hi - lo)
        if excess <= 0:
            return
        for i in range(self.n_layers):
            middle = np.arange(lo, hi)
            drop = middle[np.argsort(self.scores[i][lo:hi], kind="stable")[:excess]]
            keep = np.setdiff1d(np.arange(self.length), drop)
            n = len(keep)
            self.keys[i][:, :, :n] = self.keys[i][:, :, keep]
            self.values[i][:, :, :n] = self.values[i][:, :, keep]
            self.scores[i][:n] = self.scores[i][keep]
            self.scores[i][n:] = 0.0
        self.length -= excess


def make_cache(spec: dict, model_cfg: dict):
    """The cache the manifest's `kv_cache` section asks for."""
    layout = spec.get("layout", "float")
    dims = (model_cfg["n_layers"], model_cfg["kv_heads"], model_cfg["head_dim"])
    policy = spec.get("policy") or {}
    if layout == "float" and policy.get("kind") == "h2o":
        return H2OCache(*dims, policy=policy)
    if layout == "float":
        return KVCache(*dims)
    if layout == "kivi":
        from optc.runtime.kv_quant import QuantizedKVCache

        return QuantizedKVCache(*dims, bits=spec["bits"], group_size=spec["group_size"],
                                residual=spec["residual"], symmetric=spec["symmetric"],
                                key_quant=spec.get("key_quant", "per_channel"))
    from optc.runtime.artifact import ArtifactError

    raise ArtifactError(f"manifest.json: unknown kv_cache layout {layout!r}")
