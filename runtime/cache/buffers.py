"""Preallocated, 64-byte aligned buffers that every cache layout (float, quantised codes,
scales) is built from."""

from __future__ import annotations

import numpy as np


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
        # aligned: an executor may hand the whole buffer to TVM in place (executors/tvm.py's _stage)
        self.data = aligned_zeros((1, heads, max(1, capacity)) + self.tail, self.dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    def reserve(self, total: int) -> None:
        """Room for `total` entries (doubling; the filled part is copied once per doubling)."""
        if total > self.capacity:
            cap = self.capacity
            while cap < total:
                cap *= 2
            new = aligned_zeros((1, self.heads, cap) + self.tail, self.dtype)
            new[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = new

    def append(self, x: np.ndarray) -> None:
        n = x.shape[2]
        self.reserve(self.length + n)
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
