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

With token_dropping (mode prefill) the layers from `pruned_from` on cache only the kept prompt
tokens, numbered by the slots of their own buffer: they are a second group of layers with a length,
compactions, sinks and bias of their own. A layer that layer_routing skips is left as it is (its
cache is never read again).
"""

from __future__ import annotations

import numpy as np

# the buffer's slack over sinks + window, as a fraction of the window: compaction copies the
# window once per `slack` steps; attention reads up to `slack` hidden rows more
SLACK_FRACTION = 0.25


class SlotWindow:
    def __init__(self, sinks: int, window: int, inv_freq: list[float], context: int | None, limit: int,
                 pruned_from: int | None = None):
        self.sinks, self.window = sinks, window
        slack = int(window * SLACK_FRACTION)
        # the query-sink distance grows by the slack: keep it within the trained context and the
        # artifact's rotary tables
        bound = min(limit, context or limit)
        self.slack = max(0, min(slack, bound - sinks - window))
        self.capacity = sinks + window + self.slack
        self._angle = np.asarray(inv_freq, np.float64)
        self.pruned_from = pruned_from
        # a decode step's bias row per group of layers (reused)
        self._rows = {0: np.zeros(self.capacity + window, np.float32)}
        if pruned_from is not None:
            self._rows[pruned_from] = np.zeros(self.capacity + window, np.float32)
        self.reset()

    def reset(self) -> None:
        # per group of layers (by its first layer): the sinks' keys rotated 0..slack positions from
        # their own slots, [slack + 1, layers of the group, kv_heads, sinks, head_dim] (made once per
        # sequence, when first needed), and how far the sinks' keys in the buffer are rotated now
        self._sink_keys: dict[int, np.ndarray] = {}
        self._sink_shift: dict[int, int] = {}

    def _groups(self, n_layers: int) -> list[range]:
        """Layers that share a cache length: all, or those before and from token_dropping's cut."""
        if self.pruned_from is None:
            return [range(n_layers)]
        return [range(self.pruned_from), range(self.pruned_from, n_layers)]

    def _rotate(self, k: np.ndarray, shift) -> np.ndarray:
        """Half-split RoPE keys rotated by `shift` positions (negative: back); an array of shifts
        [m] gives [m, *k.shape]."""
        shift = np.asarray(shift, np.float64)
        angle = np.multiply.outer(shift, self._angle).reshape(shift.shape + (1,) * (k.ndim - 1) + (-1,))
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        half = k.shape[-1] // 2
        x1, x2 = k[..., :half], k[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def step(self, cache, n: int, frozen=()) -> tuple[np.ndarray, np.ndarray | None]:
        """Before a step of `n` tokens, per group of layers: room in the buffer (_make_room), the
        sinks' keys placed right before the visible window, and the step's attention bias. Returns
        the first group's bias [1, 1, n, total] and the pruned group's bias row [1, 1, 1, total]
        (None without token_dropping; its step may keep fewer than `n` tokens, the first step's
        only, when nothing is hidden: the graph cuts the row to its total). `frozen`: the layers
        layer_routing skips for the rest of the sequence; their caches are never read again, so
        they are left as they are (they stopped growing)."""
        biases = []
        for group in self._groups(len(cache.keys)):
            live = [i for i in group if i not in frozen]
            if live:
                self._make_room(cache, live, n)
            length = cache.keys[(live or group)[0]].length
            hidden_end = max(self.sinks, length - max(0, self.window - n))
            shift = hidden_end - self.sinks
            if shift != self._sink_shift.get(group.start, 0) and self.sinks and live:
                if group.start not in self._sink_keys:  # (first hidden row: the sinks are still at their slots)
                    own = np.stack([cache.keys[i].data[0, :, :self.sinks] for i in group])
                    self._sink_keys[group.start] = self._rotate(own, np.arange(self.slack + 1))
                rotated = self._sink_keys[group.start][shift]  # (shift <= slack: sinks + window + slack rows)
                for i in live:
                    cache.keys[i].data[0, :, :self.sinks] = rotated[i - group.start]
                self._sink_shift[group.start] = shift
            rows = n if group.start == 0 else 1  # (the pruned group's row is the same for every query)
            biases.append(self._bias(self._rows[group.start], length, n, hidden_end, rows))
        return biases[0], (biases[1] if len(biases) > 1 else None)

    def _make_room(self, cache, layers: list[int], n: int) -> None:
        """Before a step of `n` new tokens into `layers` (one group's, of one length): if their
        buffer cannot take them, keep the sinks and the last `window - n` tokens (those the step
        attends to) and move the latter down to follow the sinks, rotating their keys back by the
        distance moved."""
        length = cache.keys[layers[0]].length
        if length + n <= self.capacity:
            return
        keep = min(max(0, self.window - n), length - self.sinks)
        shift = length - keep - self.sinks
        if shift <= 0:
            return
        for i in layers:
            cache.evict(start=self.sinks, count=shift, layer=i)
        if keep:  # rows moved `shift` slots down: their keys rotated back as far
            for i in layers:
                k = cache.keys[i].data[:, :, self.sinks:self.sinks + keep]
                k[...] = self._rotate(k, -shift)

    def _bias(self, row: np.ndarray, length: int, n: int, hidden_end: int, rows: int) -> np.ndarray:
        """The additive bias [1, 1, rows, length + n] for a step of `n` tokens after `length` cached
        rows: the sinks and the last `window - n` cached rows visible, the rows between hidden.
        (GQA adds causality within the step itself.)"""
        total = length + n
        if rows == 1:
            if total > row.size:  # (a prompt's first step: nothing hidden yet)
                row = np.zeros(total, np.float32)
            row = row[:total]
            row[self.sinks:hidden_end] = -np.inf
            row[hidden_end:] = 0.0
            return row.reshape(1, 1, 1, total)
        out = np.zeros((1, 1, rows, total), np.float32)
        out[..., self.sinks:hidden_end] = -np.inf
        return out
