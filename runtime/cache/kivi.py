"""KIVI-style quantised KV cache (int8 / int4) that the runtime stores compressed.

Keys are quantised per channel over groups of `group_size` tokens; values per token over groups
of `min(group_size, head_dim)` channels (KIVI, Liu et al. 2024). The newest tokens stay in full
precision in a residual of between `residual` and `residual + group_size` tokens; whenever it
reaches `residual + group_size`, its oldest `group_size` tokens are quantised into the store.
The graph (rewritten by the kv_quantize pass) dequantises on its side; this class only
quantises, packs and hands out the compressed tensors.

Per layer and kind (key / value) the graph inputs are
    past_key_values.{i}.{kind}.q         uint8  [1, H, Q, D or D/2 (int4, two per byte)]
    past_key_values.{i}.{kind}.scale     fp16   keys [1, H, Q/G, D]   values [1, H, Q, D/Gc]
    past_key_values.{i}.{kind}.zero      fp16   same as scale (asymmetric only)
    past_key_values.{i}.{kind}.residual  fp32   [1, H, R, D]
Symmetric: x = (q - 2^(bits-1)) * scale.  Asymmetric: x = q * scale + zero.
"""

from __future__ import annotations

import numpy as np

from optc.runtime.cache.buffers import GrowableArray
from optc.runtime.manifest import kivi_input, past_name

KINDS = ("key", "value")


def quantize(x: np.ndarray, bits: int, symmetric: bool, axis: int):
    """Quantise x along `axis` (the reduction axis of one group). Returns (q uint8, scale, zero|None),
    scale/zero as float16 with the reduced axis kept (size 1)."""
    levels = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        amax = np.abs(x).max(axis=axis, keepdims=True)
        scale = np.maximum(amax / (half - 1), 1e-5).astype(np.float16)
        q = np.clip(np.rint(x / scale.astype(np.float32)) + half, 1, levels)
        return q.astype(np.uint8), scale, None
    lo = x.min(axis=axis, keepdims=True).astype(np.float16)
    hi = x.max(axis=axis, keepdims=True)
    scale = np.maximum((hi - lo.astype(np.float32)) / levels, 1e-5).astype(np.float16)
    q = np.clip(np.rint((x - lo.astype(np.float32)) / scale.astype(np.float32)), 0, levels)
    return q.astype(np.uint8), scale, lo


def dequantize(q, scale, zero, bits, symmetric):
    """numpy reference of the graph's dequantisation (for tests)."""
    x = q.astype(np.float32)
    if symmetric:
        return (x - (1 << (bits - 1))) * scale.astype(np.float32)
    return x * scale.astype(np.float32) + zero.astype(np.float32)


def pack4(q: np.ndarray) -> np.ndarray:
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


class QuantizedKVCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, *, bits: int, group_size: int, residual: int,
                 symmetric: bool, key_quant: str = "per_channel"):
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.bits, self.group, self.residual_min, self.symmetric = bits, group_size, residual, symmetric
        self.per_channel_keys = key_quant == "per_channel"
        self.channel_group = min(group_size, head_dim)
        self.reset()

    def reset(self) -> None:
        H, D = self.kv_heads, self.head_dim
        dq = D if self.bits == 8 else D // 2
        keys = [(i, k) for i in range(self.n_layers) for k in KINDS]
        self.q = {key: GrowableArray(H, (dq,), np.uint8, 64) for key in keys}
        scale_tail = {"key": (D,) if self.per_channel_keys else (D // self.channel_group,),
                      "value": (D // self.channel_group,)}
        self.scale = {key: GrowableArray(H, scale_tail[key[1]], np.float16, 64) for key in keys}
        self.zero = ({} if self.symmetric else
                     {key: GrowableArray(H, scale_tail[key[1]], np.float16, 64) for key in keys})
        self.res = {key: np.zeros((1, H, 0, D), np.float32) for key in keys}

    @property
    def length(self) -> int:
        return self.q[(0, "key")].length + self.res[(0, "key")].shape[2]

    @property
    def layer_lengths(self) -> list[int]:
        """Tokens cached per layer (stored groups + residual): all equal, except after a prefill
        that dropped prompt tokens from some layer on (token_dropping mode prefill) and for a layer
        that layer_routing skips (its cache stops)."""
        return [self.q[(i, "key")].length + self.res[(i, "key")].shape[2] for i in range(self.n_layers)]

    def _store(self, layer: int, kind: str, x: np.ndarray) -> None:
        """Quantise one group of `group` tokens [1, H, G, D] into the store."""
        if kind == "key" and self.per_channel_keys:  # per channel: statistics over the group's tokens
            q, scale, zero = quantize(x, self.bits, self.symmetric, axis=2)
        else:  # per token: statistics over channel groups
            g = x.reshape(1, self.kv_heads, x.shape[2], self.head_dim // self.channel_group, self.channel_group)
            q, scale, zero = quantize(g, self.bits, self.symmetric, axis=4)
            q = q.reshape(x.shape)
            scale, zero = scale[..., 0], (None if zero is None else zero[..., 0])
        self.q[(layer, kind)].append(pack4(q) if self.bits == 4 else q)
        self.scale[(layer, kind)].append(scale)
        if zero is not None:
            self.zero[(layer, kind)].append(zero)

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        for i in range(self.n_layers):
            for kind, new in (("key", new_keys[i]), ("value", new_values[i])):
                res = np.concatenate([self.res[(i, kind)], new], axis=2)
                while res.shape[2] >= self.residual_min + self.group:
                    self._store(i, kind, res[:, :, : self.group])
                    res = res[:, :, self.group:]
                self.res[(i, kind)] = np.ascontiguousarray(res)

    def evict(self, start: int, count: int, layer: int | None = None) -> None:
        """Drop tokens [start, start+count) of every layer (or of `layer`) (sink_window). Needs
        per-token scales for keys too: a per-channel key group cannot give up single tokens."""
        if self.per_channel_keys:
            raise ValueError("per-channel key groups cannot evict single tokens")
        for key in self.q:
            if layer is not None and key[0] != layer:
                continue
            stored = self.q[key].length  # (each layer's own: token_dropping, layer_routing)
            res = self.res[key]
            # tokens [start, start+count) split over the store [0, stored) and the residual
            s0, e0 = min(start, stored), min(start + count, stored)
            for arr in (self.q[key], self.scale[key], self.zero.get(key)):
                if arr is not None:
                    arr.delete(s0, e0)
            r0, r1 = max(start - stored, 0), max(start + count - stored, 0)
            if r1 > r0:
                self.res[key] = np.ascontiguousarray(np.concatenate([res[:, :, :r0], res[:, :, r1:]], axis=2))

    def feeds(self) -> dict[str, np.ndarray]:
        out = {}
        for (i, kind), q in self.q.items():
            base = past_name(i, kind)
            out[kivi_input(base, "q")] = q.view()
            out[kivi_input(base, "scale")] = self.scale[(i, kind)].view()
            if not self.symmetric:
                out[kivi_input(base, "zero")] = self.zero[(i, kind)].view()
            out[kivi_input(base, "residual")] = self.res[(i, kind)]
        return out

    @property
    def nbytes(self) -> int:
        total = sum(g.nbytes for g in self.q.values()) + sum(g.nbytes for g in self.scale.values())
        total += sum(g.nbytes for g in self.zero.values()) + sum(r.nbytes for r in self.res.values())
        return total
