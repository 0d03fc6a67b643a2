"""H2O eviction over the float cache (the h2o_eviction pass's runtime side)."""

from __future__ import annotations

import numpy as np

from optc.runtime.cache.dense import KVCache
from optc.runtime.manifest import H2OPolicy


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
