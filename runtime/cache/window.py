"""sink_window on the fused ONNX Runtime path: a bounded buffer that GQA writes in place.

The generic sink_window graph keeps keys before RoPE and rotates the whole cache by slot at every
step, after the runtime has evicted the oldest window token (a copy of the window per step). On
the fused path GroupQueryAttention rotates each new key once, at the row it writes, so the
buffer holds rotated keys. This helper keeps that buffer bounded at `sinks + window + slack`
rows with work amortised over `slack` steps:

- between compactions, rows that have left the window stay in the buffer and are hidden by an
  additive attention bias (0 for the sinks and the window, -inf for the rest), so every query
  sees the tokens the generic artifact's query sees;
- when a step would overflow the buffer, the window is moved down next to the sinks (one copy
  per `slack` steps) and its keys are rotated back by the distance they moved, so that every
  key sits at its slot again, as the generic artifact numbers them.

- the sinks' keys are kept rotated as if they sat right before the first visible window row
  (rotated from a copy taken at their own slots, by the number of hidden rows), so every query
  sees each key at the distance the generic artifact's renumbering gives it.

So the logits are the generic artifact's (tests: to 1e-4 over hundreds of compactions), for one
copy of the window per `slack` steps plus a rotation of the sinks' keys per step, instead of a
copy of the window and a rotation of the whole cache per step.
"""

from __future__ import annotations

import numpy as np

# the buffer's slack over sinks + window, as a fraction of the window: compaction copies the
# window once per `slack` steps; attention reads up to `slack` hidden rows more
SLACK_FRACTION = 0.25


class SlotWindow:
    def __init__(self, sinks: int, window: int, inv_freq: list[float], context: int | None, limit: int):
        self.sinks, self.window = sinks, window
        slack = int(window * SLACK_FRACTION)
        # the query-sink distance grows by the slack: keep it within the trained context and the
        # artifact's rotary tables
        bound = min(limit, context or limit)
        self.slack = max(0, min(slack, bound - sinks - window))
        self.capacity = sinks + window + self.slack
        self._angle = np.asarray(inv_freq, np.float64)
        self._bias = np.zeros(self.capacity + window, np.float32)  # a decode step's bias row (reused)
        self.reset()

    def reset(self) -> None:
        # per shift 0..slack: the sinks' keys rotated that far from their own slots,
        # [slack + 1, layers, kv_heads, sinks, head_dim] (made once per sequence, when first needed)
        self._sink_keys = None
        self._sink_shift = 0  # how far the sinks' keys in the buffer are rotated from those slots

    def _rotate(self, k: np.ndarray, shift) -> np.ndarray:
        """Half-split RoPE keys rotated by `shift` positions (negative: back); an array of shifts
        [m] gives [m, *k.shape]."""
        shift = np.asarray(shift, np.float64)
        angle = np.multiply.outer(shift, self._angle).reshape(shift.shape + (1,) * (k.ndim - 1) + (-1,))
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        half = k.shape[-1] // 2
        x1, x2 = k[..., :half], k[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def step(self, cache, n: int, frozen=()) -> np.ndarray:
        """Before a step of `n` tokens: room in the buffer (make_room), the sinks' keys placed
        right before the visible window, and the step's attention bias (returned). `frozen`: the
        layers layer_routing skips for the rest of the sequence; their caches are never read
        again, so they are left as they are (they stopped growing)."""
        self.make_room(cache, n, frozen)
        length = cache.length
        hidden_end = max(self.sinks, length - max(0, self.window - n))
        shift = hidden_end - self.sinks
        if shift != self._sink_shift and self.sinks:
            if self._sink_keys is None:  # (first hidden row: the sinks are still at their slots)
                own = np.stack([arr.data[0, :, :self.sinks] for arr in cache.keys])
                self._sink_keys = self._rotate(own, np.arange(self.slack + 1))
            rotated = self._sink_keys[shift]  # (shift <= slack: the buffer holds sinks + window + slack)
            for i, arr in enumerate(cache.keys):
                if i not in frozen:
                    arr.data[0, :, :self.sinks] = rotated[i]
            self._sink_shift = shift
        return self.bias(length, n)

    def make_room(self, cache, n: int, frozen=()) -> None:
        """Before a step of `n` new tokens: if the buffer cannot take them, keep the sinks and the
        last `window - n` tokens (those the step attends to) and move the latter down to follow
        the sinks, rotating their keys back by the distance moved (in every layer but the
        `frozen` ones)."""
        length = cache.length
        if length + n <= self.capacity:
            return
        keep = min(max(0, self.window - n), length - self.sinks)
        shift = length - keep - self.sinks
        if shift <= 0:
            return
        live = [i for i in range(len(cache.keys)) if i not in frozen]
        for i in live:
            cache.evict(start=self.sinks, count=shift, layer=i)
        if keep:  # rows moved `shift` slots down: their keys rotated back as far
            for i in live:
                k = cache.keys[i].data[:, :, self.sinks:self.sinks + keep]
                k[...] = self._rotate(k, -shift)

    def bias(self, length: int, n: int) -> np.ndarray:
        """The additive bias [1, 1, n, length + n] for a step of `n` tokens after `length` cached
        rows: the sinks and the last `window - n` cached rows visible, the rows between hidden.
        (GQA adds causality within the step itself.)"""
        total = length + n
        hidden_end = max(self.sinks, length - max(0, self.window - n))
        if n == 1:
            row = self._bias[:total]
            row[self.sinks:hidden_end] = -np.inf
            row[hidden_end:] = 0.0
            return row.reshape(1, 1, 1, total)
        out = np.zeros((1, 1, n, total), np.float32)
        out[..., self.sinks:hidden_end] = -np.inf
        return out
