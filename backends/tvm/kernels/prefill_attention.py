"""Fused prefill attention for the TVM CPU backend: flash-attention style, masked blocks skipped.

The generic path of a prefill (or a multi-token continuation) materialises the whole score
matrix: QK^T, the mask, a softmax and PV, each a separate function over [heads, tokens, keys].
At 512 tokens that was 40% of the step, although causality masks half of those scores.

This kernel (chosen by kernels/attention's pass for attentions with more query rows than the decode
kernel takes) never stores the score matrix:
- a task is one KV head and TQ query tokens of all G query heads that share it (G x TQ rows);
  tasks run in parallel;
- keys go in blocks of NK. A block whose mask is false for every row of the task is skipped: the
  mask is an input (the graph builds it from causality and the attention mask), read at run time,
  so any mask works; a causal one skips about half the blocks;
- a live block: scores in 4 x 16 register tiles, masked, then online softmax (running row maximum
  and sum, earlier partial results rescaled), and P V accumulated in 4 x 16 register tiles;
- exp is a range reduction plus a polynomial in plain arithmetic (vectorisable), as the
  legalised softmax uses (schedules/cpu.legalizations).
A row masked at every key gets what softmax over an all-masked row gives: the mean of all values.

K and V first go through a small packing function: the segments they are concatenated from
(the cache, new tokens, a quantised cache's groups, with element-wise producers such as KIVI's
dequantisation absorbed, as in the decode kernel) become one key-major K^T [heads, head dim,
keys] and one V [heads, keys, head dim].
"""

from __future__ import annotations

import numpy as np

ROW_TILE = 4  # query rows of a register tile
COL_TILE = 16  # keys (QK) or value columns (PV) of a register tile: two 256-bit registers per row
QUERY_TOKENS = (8, 4, 2, 1)  # tokens per task, the first that divides the bucket's tokens
KEY_BLOCKS = (64, 32, 16)  # keys per block, the first that divides the keys (measured: 64 best at 512 tokens)
_MIN = float(np.finfo(np.float32).min)


def fast_exp(x):
    """exp(x) for float32 in plain arithmetic, vectorisable: x = n ln2 + f with |f| <= ln2 / 2,
    exp(f) by a degree-7 polynomial (the Cephes expf coefficients), 2^n by building the float's
    exponent bits. Inputs are clamped to float32's range of exp."""
    from tvm import tirx

    f32 = "float32"

    def c(v):
        return tirx.const(v, f32)

    x = tirx.max(tirx.min(x, c(88.3762626647949)), c(-88.3762626647949))
    n = tirx.floor(x * c(1.44269504088896341) + c(0.5))
    f = x - n * c(0.693359375) - n * c(-2.12194440e-4)  # ln 2 in two parts: f exact to float precision
    p = c(1.9875691500e-4)
    for coefficient in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * f + c(coefficient)
    return (p * f * f + f + c(1.0)) * tirx.reinterpret(f32, (n.astype("int32") + 127) << 23)


def plan(q_shape, out_shape, keys: int):
    """Tile sizes for this attention ({"tq": tokens per task, "nk": keys per block}), or the
    kernels.attention.Miss saying why the kernel does not apply (the generic path stays)."""
    from optc.backends.tvm.kernels.attention import Miss

    _, _, groups, tokens, _ = q_shape
    dv = out_shape[-1]
    tq = next((t for t in QUERY_TOKENS if tokens % t == 0 and groups * t % ROW_TILE == 0), None)
    nk = next((k for k in KEY_BLOCKS if keys % k == 0), None)
    if tq is None:
        return Miss(f"prefill kernel: no task of {QUERY_TOKENS} tokens divides {tokens} tokens into "
                    f"rows of {ROW_TILE} for {groups} query heads per KV head")
    if nk is None:
        return Miss(f"prefill kernel: {keys} keys is not a multiple of {KEY_BLOCKS[-1]}")
    if dv % COL_TILE:
        return Miss(f"prefill kernel: value head dim {dv} is not a multiple of {COL_TILE}")
    return {"tq": tq, "nk": nk}


def build_pack(m: dict, builder, heads: int, keys: int, parallel: bool):
    """The packing PrimFunc: K^T [heads, D, keys] and V [heads, keys, Dv] from the segments
    (heads on threads where `parallel`: the kernel's own choice)."""
    from tvm import s_tir, te, topi
    from tvm.s_tir.dlight.analysis import get_root_block

    from optc.backends.tvm.kernels.attention import finished_kernel

    k_segs = [builder.build(s) for s in m["k"]]
    v_segs = [builder.build(s) for s in m["v"]]
    k = topi.concatenate(k_segs, 2) if len(k_segs) > 1 else k_segs[0]
    v = topi.concatenate(v_segs, 2) if len(v_segs) > 1 else v_segs[0]
    d, dv = int(k.shape[3]), int(v.shape[3])
    kt = te.compute((heads, d, keys), lambda h, i, j: k[0, h, j, i].astype("float32"), name="k_transposed")
    vp = te.compute((heads, keys, dv), lambda h, j, i: v[0, h, j, i].astype("float32"), name="v_packed")
    func = te.create_prim_func(builder.placeholders + [kt, vp])
    sch = s_tir.Schedule(func)
    for block in list(sch.get_child_blocks(get_root_block(sch))):
        if sch.get(block).name_hint not in ("k_transposed", "v_packed"):
            sch.compute_inline(block)  # concatenations, dequantisation: read where they lie
    for name in ("k_transposed", "v_packed"):
        h, *_ = sch.get_loops(sch.get_sblock(name))
        if parallel:
            sch.parallel(h)
    return finished_kernel(sch.mod["main"])


def build_kernel(q_shape, out_shape, mask_info, scale: float, keys: int, tiles: dict, parallel: bool, lanes: int):
    """The attention PrimFunc over the packed K^T and V (see the module docstring).
    mask_info: None, or (shape, additive) of the 5-D mask [1, Hm, Gm, Tm, keys]; lanes: float32
    lanes of the target's vectors (schedules.cpu.cpu_facts), which the row maxima and sums use."""
    from tvm import tirx
    from tvm.script import tirx as T

    from optc.backends.tvm.kernels.attention import finished_kernel

    _, H, G, TT, D = q_shape
    Dv = out_shape[-1]
    TQ, NK = tiles["tq"], tiles["nk"]
    R, QB, NB = G * TQ, TT // TQ, keys // NK
    MT, CT, L = ROW_TILE, COL_TILE, lanes
    if NK % L:
        raise ValueError(f"prefill attention: {NK} keys per block is not a multiple of {L} lanes")
    mask_shape = tuple(mask_info[0]) if mask_info else (1, 1, 1, 1, keys)
    mask_dtype = "float32" if mask_info and mask_info[1] else "bool"
    additive, masked = bool(mask_info and mask_info[1]), mask_info is not None
    # the part of the mask that varies within a task: query heads and tokens (KV head is fixed)
    GL = G if mask_shape[2] > 1 else 1
    TL = TQ if mask_shape[3] > 1 else 1
    tasks = T.parallel if parallel else T.serial
    MIN = _MIN

    def mask_at(mask, h, g, t, j):
        idx = [0, h if mask_shape[1] > 1 else 0, g if mask_shape[2] > 1 else 0, t if mask_shape[3] > 1 else 0, j]
        return tirx.BufferLoad(mask, idx)

    def live_term(mask, h, g, t, j):
        # an additive mask has no "all masked" value: its blocks always run
        if not masked or additive:
            return tirx.const(1, "int32")
        return mask_at(mask, h, g, t, j).astype("int32")

    def score(tile_value, mask, h, g, t, j):
        if not masked:
            return tile_value
        if additive:
            return tile_value + mask_at(mask, h, g, t, j).astype("float32")
        return tirx.Select(mask_at(mask, h, g, t, j), tile_value, tirx.const(MIN, "float32"))

    @T.macro
    def body(q, mask, kt, vp, out):
        for task in tasks(H * QB):
            # row r of a task: query head g = r // TQ of the group, token t0 + r % TQ
            qs = T.alloc_local((R, D))
            s = T.alloc_local((R, NK))
            row_max = T.alloc_local((R,))
            row_sum = T.alloc_local((R,))
            acc = T.alloc_local((R, Dv))
            live = T.alloc_local((1,), "int32")
            lanes = T.alloc_local((L,))
            step = T.alloc_local((2,))  # (new row maximum, rescale factor of the earlier blocks)
            for r in range(R):
                for d in T.vectorized(D):
                    qs[r, d] = q[0, task // QB, r // TQ, task % QB * TQ + r % TQ, d] * T.float32(scale)
                row_max[r] = T.float32(MIN)
                row_sum[r] = T.float32(0)
                for c in T.vectorized(Dv):
                    acc[r, c] = T.float32(0)
            for kb in range(NB):
                live[0] = 0
                for g, tq, j in T.grid(GL, TL, NK):
                    live[0] = live[0] | live_term(mask, task // QB, g, task % QB * TQ + tq, kb * NK + j)
                if live[0] != 0:
                    for r4, jb in T.grid(R // MT, NK // CT):
                        tile = T.alloc_local((MT, CT))
                        for ii in T.unroll(MT):
                            for jj in T.vectorized(CT):
                                tile[ii, jj] = T.float32(0)
                        for d in range(D):
                            for ii in T.unroll(MT):
                                for jj in T.vectorized(CT):
                                    tile[ii, jj] = tile[ii, jj] + qs[r4 * MT + ii, d] * \
                                        kt[task // QB, d, kb * NK + jb * CT + jj]
                        for ii in T.unroll(MT):
                            for jj in T.vectorized(CT):
                                s[r4 * MT + ii, jb * CT + jj] = score(
                                    tile[ii, jj], mask, task // QB, (r4 * MT + ii) // TQ,
                                    task % QB * TQ + (r4 * MT + ii) % TQ, kb * NK + jb * CT + jj)
                    for r in range(R):
                        # online softmax: the block's maximum in L lanes, then exp and the sum
                        for v in T.vectorized(L):
                            lanes[v] = s[r, v]
                        for jb in range(1, NK // L):
                            for v in T.vectorized(L):
                                lanes[v] = T.max(lanes[v], s[r, jb * L + v])
                        for v in range(1, L):
                            lanes[0] = T.max(lanes[0], lanes[v])
                        step[0] = T.max(row_max[r], lanes[0])
                        step[1] = fast_exp(row_max[r] - step[0])
                        row_max[r] = step[0]
                        for j in T.vectorized(NK):
                            s[r, j] = fast_exp(s[r, j] - step[0])
                        for v in T.vectorized(L):
                            lanes[v] = s[r, v]
                        for jb in range(1, NK // L):
                            for v in T.vectorized(L):
                                lanes[v] = lanes[v] + s[r, jb * L + v]
                        for v in range(1, L):
                            lanes[0] = lanes[0] + lanes[v]
                        row_sum[r] = row_sum[r] * step[1] + lanes[0]
                        for c in T.vectorized(Dv):
                            acc[r, c] = acc[r, c] * step[1]
                    for r4, cb in T.grid(R // MT, Dv // CT):
                        tile = T.alloc_local((MT, CT))
                        for ii in T.unroll(MT):
                            for jj in T.vectorized(CT):
                                tile[ii, jj] = acc[r4 * MT + ii, cb * CT + jj]
                        for j in range(NK):
                            for ii in T.unroll(MT):
                                for jj in T.vectorized(CT):
                                    tile[ii, jj] = tile[ii, jj] + s[r4 * MT + ii, j] * \
                                        vp[task // QB, kb * NK + j, cb * CT + jj]
                        for ii in T.unroll(MT):
                            for jj in T.vectorized(CT):
                                acc[r4 * MT + ii, cb * CT + jj] = tile[ii, jj]
            for r in range(R):
                if row_max[r] == T.float32(MIN):  # masked at every key (or every block skipped)
                    for c in T.vectorized(Dv):
                        acc[r, c] = T.float32(0)
                    for j in range(keys):
                        for c in T.vectorized(Dv):
                            acc[r, c] = acc[r, c] + vp[task // QB, j, c]
                    row_sum[r] = T.float32(keys)
                for c in T.vectorized(Dv):
                    out[0, task // QB, r // TQ, task % QB * TQ + r % TQ, c] = acc[r, c] / row_sum[r]

    # (only the variant wanted is parsed: parsing expands the macro for its own signature)
    if masked:
        @T.prim_func
        def masked_attention(q: T.Buffer((1, H, G, TT, D), "float32"), mask: T.Buffer(mask_shape, mask_dtype),
                             kt: T.Buffer((H, D, keys), "float32"), vp: T.Buffer((H, keys, Dv), "float32"),
                             out: T.Buffer((1, H, G, TT, Dv), "float32")):
            T.func_attr({"tirx.noalias": True})
            body(q, mask, kt, vp, out)

        return finished_kernel(masked_attention)

    @T.prim_func
    def unmasked_attention(q: T.Buffer((1, H, G, TT, D), "float32"), kt: T.Buffer((H, D, keys), "float32"),
                           vp: T.Buffer((H, keys, Dv), "float32"), out: T.Buffer((1, H, G, TT, Dv), "float32")):
        T.func_attr({"tirx.noalias": True})
        body(q, None, kt, vp, out)

    return finished_kernel(unmasked_attention)
