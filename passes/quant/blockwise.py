"""Round-to-nearest blockwise weight quantisation in the layout of ONNX Runtime's
`com.microsoft::MatMulNBits` contrib op (docs/ContribOperators.md in onnxruntime, "MatMulNBits";
ORT 1.32's schema text says the same).

The op computes Y = A @ W with W [K, N] given as:

    B           uint8 [N, k_blocks, blob_size]   k_blocks = ceil(K / block_size),
                                                 blob_size = block_size * bits / 8
                The codes of output column n, block j are W[j*bs : (j+1)*bs, n], packed along K
                low bits first: for 4 bits, element 2i in the low nibble of byte i and 2i+1 in
                the high nibble; for 8 bits, one byte each. K is padded with zeros to a whole
                block.
    scales      float (A's type) [N, k_blocks]
    zero_points uint8 [N, ceil(k_blocks * bits / 8)], packed like B (two 4-bit zero points per
                byte, low nibble first, each row padded separately); absent = 2^(bits-1).
                Codes past K (the last block's padding) are 0.

    W[k, n] = (code - zero_point) * scale      for k in block j = k // block_size

The quantiser is ONNX Runtime's own (MLAS `MlasQuantizeBlockwise`, what its
`matmul_nbits_quantizer` calls), restated in numpy because passes do not import onnxruntime
(DESIGN.md) and must be deterministic; tests/passes/test_weight_quant.py checks the bytes against it:

    symmetric:  scale = v / -2^(bits-1), v the block's element of largest magnitude (so that
                element lands exactly on the lowest code and the full code range is used);
                code = clamp(round(w / scale) + 2^(bits-1)), no zero_points input
    asymmetric: lo = min(min(w), 0), hi = max(max(w), 0) (zero stays exactly representable),
                scale = (hi - lo) / (2^bits - 1), zero_point = clamp(round(-lo / scale)),
                code = clamp(round(w / scale + zero_point))

`round` is half away from zero (C's roundf, as in MLAS); an all-zero block gets scale 0.
"""

from __future__ import annotations

import numpy as np


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """W [K, N] -> (B [N, k_blocks, blob] uint8, scales [N, k_blocks] (W's dtype),
    zero_points [N, ceil(k_blocks*bits/8)] uint8 or None when symmetric)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    K, N = w.shape
    k_blocks = -(-K // block_size)
    x = np.zeros((N, k_blocks * block_size), np.float32)
    x[:, :K] = w.T  # [N, K]: MatMulNBits stores B transposed, blocks run along K
    x = x.reshape(N, k_blocks, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        idx = np.abs(x).argmax(axis=2)[..., None]  # first element of largest magnitude, as MLAS
        scale = (np.take_along_axis(x, idx, axis=2) / np.float32(-mid)).astype(np.float32)
        zero = np.full(scale.shape, mid, np.float32)
    else:
        lo = np.minimum(x.min(axis=2, keepdims=True), 0).astype(np.float32)
        hi = np.maximum(x.max(axis=2, keepdims=True), 0).astype(np.float32)
        scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(scale != 0, -lo / scale, lo)
        zero = np.clip(_round_half_away(zero), 0, qmax).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    codes = np.clip(_round_half_away(x * inv + zero), 0, qmax).astype(np.uint8)
    codes.reshape(N, -1)[:, K:] = 0  # the padding past K holds code 0 (as ORT writes it; never read)
    scales = scale[..., 0].astype(w.dtype)
    # a padding zero point is the default one, 2^(bits-1), as ORT writes it
    zero_points = None if symmetric else pack(zero[..., 0].astype(np.uint8), bits, pad=1 << (bits - 1))
    return pack(codes, bits), scales, zero_points


def pack(codes: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """Pack codes along the last axis, low bits first (8 bits: unchanged); an odd count (the
    zero points of an odd number of blocks) is padded with `pad`."""
    if bits == 8:
        return np.ascontiguousarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.full(codes.shape[:-1] + (1,), pad, np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4), np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack`: the first `count` codes along the last axis."""
    if bits == 8:
        return packed[..., :count]
    pairs = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return pairs[..., :count]


def dequantize_blockwise(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                         block_size: int, K: int) -> np.ndarray:
    """What MatMulNBits multiplies by: W [K, N] from its packed inputs."""
    N, k_blocks, _ = B.shape
    codes = unpack(B, bits, block_size).astype(np.float32)  # [N, k_blocks, block_size]
    zero = (np.full((N, k_blocks), 1 << (bits - 1), np.float32) if zero_points is None
            else unpack(zero_points, bits, k_blocks).astype(np.float32))
    w = (codes - zero[..., None]) * scales.astype(np.float32)[..., None]
    return w.reshape(N, k_blocks * block_size)[:, :K].T
