"""Fused decode attention for the TVM CPU backend: one TIR kernel per attention, reading the KV cache in place.

The legalised graph (lowering) attends with generic ops: K = Concat(past, new), then a
transposed copy of K, QK^T, scale, mask, softmax and PV. For a decode step that means two full
copies of the cache per layer (the concatenation, the transpose) and, with the KIVI int8/int4
cache of the kv_cache_compression pass, a third: the dequantised cache, materialised in float
before it is concatenated. At 2,048 cached tokens those copies cost more than the rest of the
step.

This TVM module pass (`FuseAttention(target)`) finds that chain in each decode bucket (a few query
rows per KV head) and replaces it by a call to one kernel built here, scheduled for the target:
- K and V stay in *segments* (the float cache, KIVI's quantised groups, its float residual, the new
  tokens). Each segment is read where it lies; there is no concatenated copy.
- Element-wise producers of a segment (KIVI's Cast, Sub, Mul by the scales and the reshapes around
  them, int4 unpacking) are absorbed into the kernel, so the int8 cache is read as int8 and
  dequantised in registers: this is the pass-specific kernel.
- Schedule, per KV head (threads over heads): keys in blocks of 16, each block dequantised and
  transposed into a small buffer once and multiplied by every query row of the GQA group (4 x 16
  register tile); softmax with a vectorisable exp; PV with the value rows streamed once and the
  output rows vectorised.

Matched shape (what lowering emits, as TVM's ONNX importer turns it into Relax):
    S = matmul(Q5, permute_dims(expand_dims(concat(K...), 2), [0,1,2,4,3])) * scale
    P = softmax(where(mask, S, MIN) | S + bias)
    O = matmul(P, expand_dims(concat(V...), 2))
Anything else (softcap, causal masks computed in the graph, attention probabilities that are
also outputs, as H2O reads them) keeps the generic path, and `match` says why (a `Miss`), which
the compile log prints per bucket and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_QUERY_ROWS = 16  # G x T rows per KV head: decode (and short chunks); more go to kernels/prefill_attention
KEY_BLOCK = 16  # keys per packed block: two 256-bit registers per query row
ABSORBED_OPS = {"relax.astype", "relax.subtract", "relax.add", "relax.multiply", "relax.divide",
                "relax.reshape", "relax.expand_dims", "relax.concat", "relax.bitwise_and",
                "relax.right_shift", "relax.permute_dims", "relax.strided_slice"}
_MIN = float(np.finfo(np.float32).min)


def _is_constant(expr) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.expr.Constant)  # (relax constants are this IR class in TVM 0.27)


def _const_array(expr) -> np.ndarray:
    return expr.value.numpy()


def _op_name(expr) -> str | None:
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _shape(expr) -> tuple[int, ...] | None:
    sinfo = expr.ty
    try:
        return tuple(int(d) for d in sinfo.shape.values)
    except Exception:  # not a tensor of static shape
        return None


class _Chain:
    """Walks one function's dataflow bindings backwards (var -> value) and counts var uses."""

    def __init__(self, func):
        from tvm import relax

        self.value = relax.analysis.get_var2val(func)
        self.uses: dict = {}

        def count(expr):
            if isinstance(expr, relax.Var):
                self.uses[expr] = self.uses.get(expr, 0) + 1
            elif isinstance(expr, relax.Call):
                for a in expr.args:
                    count(a)
            elif isinstance(expr, relax.Tuple):
                for f in expr.fields:
                    count(f)
            elif isinstance(expr, relax.TupleGetItem):
                count(expr.tuple_value)

        for block in func.body.blocks:
            for binding in block.bindings:
                count(binding.value)
        count(func.body.body)

    def producer(self, expr, op: str, single_use: bool = True):
        """The call `op(...)` that `expr` is bound to, or None."""
        from tvm import relax

        if isinstance(expr, relax.Var):
            if single_use and self.uses.get(expr, 0) != 1:
                return None
            expr = self.value.get(expr)
        return expr if expr is not None and _op_name(expr) == op else None

    def scalar(self, expr) -> float | None:
        from tvm import relax

        if isinstance(expr, relax.Var):
            expr = self.value.get(expr, expr)
        if _is_constant(expr) and _const_array(expr).size == 1:
            return float(_const_array(expr).reshape(()))
        return None


def _segments(chain: _Chain, concat_input, axis: int) -> list | None:
    """The token-axis segments of concat(...) along `axis`, flattening nested concats."""
    from tvm import relax

    call = chain.producer(concat_input, "relax.concat")
    if call is None or not isinstance(call.args[0], relax.Tuple):
        return None
    rank = len(_shape(call) or ())
    if int(call.attrs.axis) % rank != axis % rank:
        return None
    out = []
    for field in call.args[0].fields:
        inner = chain.producer(field, "relax.concat")
        nested = _segments(chain, field, axis) if inner is not None and int(inner.attrs.axis) % rank == axis % rank \
            else None
        out.extend(nested if nested is not None else [field])
    return out


@dataclass(frozen=True)
class Miss:
    """Why a call is not fused: `reason` for the log. `attention` is False where the call is no
    attention's output at all (not a matmul of softmax probabilities), which is not worth a word."""

    reason: str
    attention: bool = True


def _describe(chain: _Chain, expr) -> str:
    """What `expr` is, for a reason: the op it is bound to, a constant (its value if scalar), or a
    function input."""
    from tvm import relax

    bound = chain.value.get(expr) if isinstance(expr, relax.Var) else expr
    if bound is None:
        return "a function input"
    if _is_constant(bound):
        value = chain.scalar(expr)
        return "a constant" if value is None else f"{value:g}"
    return _op_name(bound) or type(bound).__name__


def _find(chain: _Chain, expr, op: str, what: str):
    """(the call `op(...)` that `expr` is bound to, None), or (None, the reason it is not)."""
    from tvm import relax

    call = chain.producer(expr, op, single_use=False)
    if call is None:
        return None, f"{what} is {_describe(chain, expr)}, not {op}"
    if isinstance(expr, relax.Var) and chain.uses.get(expr, 0) != 1:
        return None, f"{what} ({op}) is read {chain.uses.get(expr, 0)} times, not once"
    return call, None


def match(chain: _Chain, call) -> dict | Miss:
    """The attention chain ending in `call` (the PV matmul), or the reason it is not one the
    kernels take."""
    if _op_name(call) != "relax.matmul":
        return Miss("not a matmul", attention=False)
    probs, v5 = call.args
    if chain.producer(probs, "relax.nn.softmax", single_use=False) is None:
        return Miss("not softmax(...) @ V", attention=False)
    softmax, why = _find(chain, probs, "relax.nn.softmax", "the softmax output")
    if softmax is None:
        return Miss(why + ": the probabilities are needed outside the attention (H2O's scores are a graph output)")
    if int(softmax.attrs.axis) not in (-1, 4):
        return Miss(f"softmax over axis {int(softmax.attrs.axis)}, not the key axis")
    masked = softmax.args[0]
    mask, additive = None, False
    where = chain.producer(masked, "relax.where")
    add = chain.producer(masked, "relax.add")
    if where is not None:
        if chain.scalar(where.args[2]) != _MIN:
            x, y = (_describe(chain, a) for a in where.args[1:])
            return Miss(f"masked by where(c, {x}, {y}), not where(mask, scores, float32 min): a mask the graph "
                        f"computes (is_causal, block-sparse's causality within its gathered blocks)")
        mask, scaled = where.args[0], where.args[1]
    elif add is not None:
        scaled, mask, additive = add.args[0], add.args[1], True
    else:
        scaled = masked
    mul, why = _find(chain, scaled, "relax.multiply", "the score tensor before the mask")
    if mul is None:
        return Miss(why)
    scale = chain.scalar(mul.args[1])
    if scale is None:
        return Miss(f"the scores are scaled by {_describe(chain, mul.args[1])}, not a scalar constant")
    qk, why = _find(chain, mul.args[0], "relax.matmul", "the tensor the scale multiplies")
    if qk is None:
        return Miss(why)
    q5, kt = qk.args
    perm, why = _find(chain, kt, "relax.permute_dims", "the right operand of Q K^T")
    if perm is None:
        return Miss(why)
    if [int(a) for a in perm.attrs.axes] != [0, 1, 2, 4, 3]:
        return Miss(f"K^T permutes axes {[int(a) for a in perm.attrs.axes]}, not [0, 1, 2, 4, 3]")
    k5, why = _find(chain, perm.args[0], "relax.expand_dims", "the transposed K")
    if k5 is None:
        return Miss(why)
    v_exp, why = _find(chain, v5, "relax.expand_dims", "the right operand of P V")
    if v_exp is None:
        return Miss(why)
    if [int(a) for a in k5.attrs.axis] != [2] or [int(a) for a in v_exp.attrs.axis] != [2]:
        return Miss("K or V is not broadcast over the GQA group axis (expand_dims at axis 2)")
    q_shape, out_shape = _shape(q5), _shape(call)
    if q_shape is None or out_shape is None or len(q_shape) != 5 or q_shape[0] != 1:
        return Miss(f"query shape {q_shape} / output shape {out_shape}: not static [1, kv heads, group, tokens, dim]")
    # K and V each as the segments they are concatenated from (one segment where they are not)
    k_segs = _segments(chain, k5.args[0], 2) or [k5.args[0]]
    v_segs = _segments(chain, v_exp.args[0], 2) or [v_exp.args[0]]
    # every segment [1, kv heads, tokens, head dim] (V: its own head dim, the output's)
    k_shapes, v_shapes = [_shape(x) for x in k_segs], [_shape(x) for x in v_segs]
    for kind, shapes, dim in (("K", k_shapes, q_shape[4]), ("V", v_shapes, out_shape[4])):
        bad = [sh for sh in shapes if sh is None or len(sh) != 4 or sh[0] != 1 or sh[1] != q_shape[1]
               or sh[3] != dim or sh[2] == 0]
        if bad:
            return Miss(f"a {kind} segment of shape {bad[0]} is not [1, {q_shape[1]}, tokens > 0, {dim}]")
    k_lens, v_lens = [sh[2] for sh in k_shapes], [sh[2] for sh in v_shapes]
    if sum(k_lens) != sum(v_lens):
        return Miss(f"{sum(k_lens)} keys but {sum(v_lens)} values")
    if mask is not None:
        m_shape = _shape(mask)
        if m_shape is None or len(m_shape) != 5 or m_shape[-1] != sum(k_lens):
            return Miss(f"mask shape {m_shape} is not 5-D over {sum(k_lens)} keys")
        if (str(mask.ty.dtype) == "bool") == additive:  # where() takes a boolean mask, add() a float bias
            return Miss(f"a {mask.ty.dtype} mask {'added to' if additive else 'selecting'} the scores")
        if any(m not in (1, full) for m, full in zip(m_shape[:4], (1, q_shape[1], q_shape[2], q_shape[3]))):
            return Miss(f"mask shape {m_shape} does not broadcast to the scores {q_shape[:4]}")
    return {"q": q5, "mask": mask, "additive": additive, "scale": scale, "k": k_segs, "v": v_segs,
            "out_shape": out_shape, "out_dtype": str(call.ty.dtype)}


def _ints(expr) -> list[int]:
    return [int(f.value) for f in expr.fields]


def _slice(x, call, shape):
    """strided_slice with static, in-range bounds, as an index map (it inlines into the kernel)."""
    from tvm import te

    axes, begin, strides = _ints(call.args[1]), _ints(call.args[2]), \
        (_ints(call.args[4]) if len(call.args) > 4 else None)
    strides = strides or [1] * len(axes)
    rank = len(shape)
    start, step = [0] * rank, [1] * rank
    for a, b, st in zip(axes, begin, strides):
        a %= rank
        if b < 0 or st <= 0:
            raise _NotAbsorbed
        start[a], step[a] = b, st
    return te.compute(shape, lambda *i: x(*[start[a] + step[a] * i[a] for a in range(rank)]), name="slice")


class _NotAbsorbed(Exception):
    """A producer the kernel does not rebuild; it stays a separate function."""


class _TE:
    """Rebuilds a segment's element-wise producers in TE over placeholders (the kernel's inputs);
    `leaves` are the Relax values that become kernel arguments, in order."""

    def __init__(self, chain: _Chain):
        self.chain = chain
        self.leaves: list = []
        self.placeholders: list = []
        self._seen: dict = {}

    def leaf(self, expr):
        from tvm import te

        if expr in self._seen:
            return self._seen[expr]
        shape = _shape(expr)
        ph = te.placeholder(shape, dtype=str(expr.ty.dtype), name=f"in{len(self.placeholders)}")
        self.leaves.append(expr)
        self.placeholders.append(ph)
        self._seen[expr] = ph
        return ph

    def build(self, expr, depth: int = 0):
        """`expr` in TE: its element-wise producers rebuilt (up to 12 deep, each used only here),
        scalar constants inlined, anything else a kernel input."""
        from tvm import relax, tirx

        bound = self.chain.value.get(expr) if isinstance(expr, relax.Var) else expr
        if _is_constant(bound):
            value = self.chain.scalar(expr)
            if value is not None:
                return tirx.const(value, str(expr.ty.dtype))
        call = None
        if isinstance(expr, relax.Var) and depth < 12 and self.chain.uses.get(expr, 0) == 1:
            call = self.chain.value.get(expr)
        if call is None or _op_name(call) not in ABSORBED_OPS or _shape(call) is None:
            return self.leaf(expr)
        try:
            return self._absorb(call, depth)
        except _NotAbsorbed:
            return self.leaf(expr)

    def _absorb(self, call, depth: int):
        from tvm import topi

        op = _op_name(call)
        shape = _shape(call)
        args = call.args
        if op == "relax.concat":
            parts = [self.build(f, depth + 1) for f in args[0].fields]
            return topi.concatenate(parts, int(call.attrs.axis))
        x = self.build(args[0], depth + 1)
        if op == "relax.astype":
            return topi.cast(x, str(call.attrs.dtype))
        if op in ("relax.reshape", "relax.expand_dims"):
            return topi.reshape(x, shape)
        if op == "relax.permute_dims":
            return topi.transpose(x, [int(a) for a in call.attrs.axes])
        if op == "relax.strided_slice":
            return _slice(x, call, shape)
        y = self.build(args[1], depth + 1)
        fn = {"relax.subtract": topi.subtract, "relax.add": topi.add, "relax.multiply": topi.multiply,
              "relax.divide": topi.divide, "relax.bitwise_and": topi.bitwise_and,
              "relax.right_shift": topi.right_shift}[op]
        return fn(x, y)


def _shifted(seg, shape, off: int):
    from tvm import te

    return te.compute(shape, lambda b, h, j, d: seg[b, h, j + off, d], name="piece")


def _aligned(k_segs: list, v_segs: list) -> tuple[list, list]:
    """K and V segments cut at the same token boundaries (e.g. sink_window re-rotates the whole
    key cache, one K segment, while V stays cache + new tokens): each key block then meets the
    value rows of the same tokens."""
    from tvm import te

    def bounds(segs):
        return [int(x) for x in np.cumsum([0] + [int(s.shape[2]) for s in segs])]

    cuts = sorted(set(bounds(k_segs)) | set(bounds(v_segs)))

    def cut(segs):
        starts, out = bounds(segs), []
        for a, b in zip(cuts, cuts[1:]):
            i = max(k for k, st in enumerate(starts[:-1]) if st <= a)
            seg, off = segs[i], a - starts[i]
            if off == 0 and b - a == int(seg.shape[2]):
                out.append(seg)
            else:
                shape = [int(x) for x in seg.shape]
                shape[2] = b - a
                out.append(_shifted(seg, shape, off))
        return out

    return cut(k_segs), cut(v_segs)


def build_kernel(m: dict, chain: _Chain, facts):
    """The scheduled PrimFunc for one matched attention, and the Relax values it takes."""
    from tvm import te, tirx, topi

    B, H, G, T, D = _shape(m["q"])
    Dv = m["out_shape"][-1]
    builder = _TE(chain)
    q = builder.leaf(m["q"])
    mask = builder.leaf(m["mask"]) if m["mask"] is not None else None
    k_segs, v_segs = _aligned([builder.build(s) for s in m["k"]], [builder.build(s) for s in m["v"]])
    scale = tirx.const(m["scale"], "float32")
    lens = [int(s.shape[2]) for s in k_segs]
    offsets = [int(x) for x in np.cumsum([0] + lens[:-1])]

    def masked(score, b, h, g, t, j):
        if mask is None:
            return score
        idx = [0 if int(mask.shape[a]) == 1 else v for a, v in enumerate((b, h, g, t))] + [j]
        if m["additive"]:
            return score + mask(*idx).astype("float32")
        return tirx.Select(mask(*idx), score, tirx.const(_MIN, "float32"))

    def segment_scores(i, ks, n, off):
        """Masked, scaled scores of one key segment, and their row maximum."""
        packed = te.compute((B, H, D, n), lambda b, h, d, j: ks[b, h, j, d].astype("float32"), name=f"k_packed{i}")
        d = te.reduce_axis((0, D), name="d")
        s = te.compute((B, H, G, T, n), lambda b, h, g, t, j: te.sum(q[b, h, g, t, d] * packed[b, h, d, j], axis=d),
                       name=f"scores{i}")
        sm = te.compute((B, H, G, T, n), lambda b, h, g, t, j: masked(s[b, h, g, t, j] * scale, b, h, g, t, j + off),
                        name=f"masked{i}")
        j = te.reduce_axis((0, n), name="j")
        mx = te.compute((B, H, G, T), lambda b, h, g, t: te.max(sm[b, h, g, t, j], axis=j), name=f"max{i}")
        return sm, mx

    scored = [segment_scores(i, ks, n, off) for i, (ks, n, off) in enumerate(zip(k_segs, lens, offsets))]

    def overall_max(b, h, g, t):
        out = scored[0][1][b, h, g, t]
        for _, mx in scored[1:]:
            out = tirx.max(out, mx[b, h, g, t])
        return out

    row_max = te.compute((B, H, G, T), overall_max, name="row_max")

    def segment_values(i, sm, vs, n):
        """exp(score - max) of one segment, its sum, and its share of P V (unnormalised)."""
        shifted = te.compute((B, H, G, T, n), lambda b, h, g, t, j: sm[b, h, g, t, j] - row_max[b, h, g, t],
                             name=f"shifted{i}")
        e = topi.fast_exp(shifted)  # TOPI's vectorisable exp (range reduction + polynomial)
        j = te.reduce_axis((0, n), name="j")
        z = te.compute((B, H, G, T), lambda b, h, g, t: te.sum(e[b, h, g, t, j], axis=j), name=f"sum{i}")
        j2 = te.reduce_axis((0, n), name="j")
        o = te.compute((B, H, G, T, Dv), lambda b, h, g, t, c: te.sum(
            e[b, h, g, t, j2] * vs[b, h, j2, c].astype("float32"), axis=j2), name=f"pv{i}")
        return e.op.name, z, o

    parts = [segment_values(i, sm, vs, n) for i, ((sm, _), vs, n) in enumerate(zip(scored, v_segs, lens))]
    exp_names = [p[0] for p in parts]

    def combine(b, h, g, t, c):
        total, norm = parts[0][2][b, h, g, t, c], parts[0][1][b, h, g, t]
        for _, z, o in parts[1:]:
            total, norm = total + o[b, h, g, t, c], norm + z[b, h, g, t]
        return (total / norm).astype(m["out_dtype"])

    out = te.compute((B, H, G, T, Dv), combine, name="attention")
    func = te.create_prim_func(builder.placeholders + [out])
    return schedule(func, lens, exp_names, facts), builder.leaves


def schedule(func, lens: list[int], exp_names: list[str], facts):
    """`facts`: the target's schedules.cpu.CpuFacts (vector lanes)."""
    from tvm import s_tir

    from optc.backends.tvm.schedules.cpu import lanes_innermost, pick_divisor, rfactor_lanes, parallel_if_worth

    lanes = facts.lanes

    sch = s_tir.Schedule(func)
    n_segments = len(lens)
    names = {"k_packed", "scores", "masked", "max", "row_max", "sum", "pv", "attention"}
    # TOPI names every exp block alike; create_prim_func numbered them in creation order
    blocks = [sch.get(b).name_hint for b in sch.get_child_blocks(_root(sch))]
    exp_names = [b for b in blocks if b == exp_names[0] or b.startswith(exp_names[0] + "_")]
    assert len(exp_names) == n_segments, exp_names
    keep = set(exp_names)
    # inline the segments' element-wise producers (dequantisation, reshapes, concatenations)
    for block in list(sch.get_child_blocks(_root(sch))):
        name = sch.get(block).name_hint
        if name.rstrip("0123456789") not in names and name not in keep:
            sch.compute_inline(block)  # also the shifted scores, into the exp
    for i in range(n_segments):
        sch.compute_inline(sch.get_sblock(f"masked{i}"))
    final = sch.get_sblock("attention")
    b, h, *_ = sch.get_loops(final)
    head = sch.fuse(b, h)
    B, H, G, T, D = [int(x) for x in func.params[0].shape]  # the query
    parallel_if_worth(sch, head, 2 * B * H * G * T * sum(lens) * D, facts.threads)  # (QK and PV)
    order = ["attention"] + [f"pv{i}" for i in reversed(range(n_segments))] + \
        [f"sum{i}" for i in reversed(range(n_segments))] + [exp_names[i] for i in reversed(range(n_segments))] + \
        ["row_max"] + [f"max{i}" for i in reversed(range(n_segments))] + \
        [f"scores{i}" for i in reversed(range(n_segments))]
    # row maxima and sums in vector lanes (rfactor), as the CPU row rule does: 3-6% of a decode
    # step at 2,048 cached tokens, measured (8 lanes) against scalar chains
    partials = {name: rfactor_lanes(sch, sch.get_sblock(name), lanes)
                for name in [f"{kind}{i}" for kind in ("max", "sum") for i in range(n_segments)]}
    for name in order[1:]:
        sch.compute_at(sch.get_sblock(name), head, preserve_unit_loops=True)
        if partials.get(name) is not None:  # the lanes go where their row's result goes
            sch.compute_at(partials[name], head, preserve_unit_loops=True)
    for partial in partials.values():
        if partial is not None:
            lanes_innermost(sch, partial, lanes)
    for i, n in enumerate(lens):
        # scores: keys in blocks; each block dequantised + transposed once, then every query row
        blk = sch.get_sblock(f"scores{i}")
        *_, g, t, j, d = sch.get_loops(blk)
        block_keys = pick_divisor(n, (KEY_BLOCK, lanes, 4, 2))
        jo, ji = sch.split(j, [None, block_keys])
        sch.reorder(jo, g, t, d, ji)
        packed = sch.get_sblock(f"k_packed{i}")
        sch.compute_at(packed, jo, preserve_unit_loops=True)
        pd, pj = sch.get_loops(packed)[-2:]
        sch.reorder(pj, pd)
        if block_keys % lanes == 0:
            sch.vectorize(ji)
        sch.decompose_reduction(blk, d)
        # softmax pieces: vectorised exp
        e = sch.get_sblock(exp_names[i])
        if n % lanes == 0:
            _, vec = sch.split(sch.get_loops(e)[-1], [None, lanes])
            sch.vectorize(vec)
        # PV: value rows streamed once, all query rows per value row, output columns vectorised
        pv = sch.get_sblock(f"pv{i}")
        *_, g, t, c, jj = sch.get_loops(pv)
        sch.reorder(jj, g, t, c)
        if int(sch.get(c).extent) % lanes == 0:  # (before the init is split off, which copies it)
            _, vec = sch.split(c, [None, lanes])
            sch.vectorize(vec)
        sch.decompose_reduction(pv, jj)
    return finished_kernel(sch.mod["main"])


def finished_kernel(func):
    """One of optc's own kernels, ready for the module: marked scheduled (dlight rules and tuning
    leave it alone), opaque (FuseOps fuses nothing into it, which would re-create it
    unscheduled), and without a global symbol (the module names it)."""
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8).without_attr("global_symbol")


def _root(sch):
    from tvm.s_tir.dlight.analysis import get_root_block

    return get_root_block(sch)


def _prefill_call(builder, chain: _Chain, m: dict, visit, facts):
    """The fused prefill attention (kernels/prefill_attention) of a matched attention with many
    query rows, emitted into `builder`; a Miss where that kernel does not apply."""
    from tvm import relax

    from optc.backends.tvm.kernels import prefill_attention as prefill
    from optc.backends.tvm.schedules.cpu import worth_threads

    q_shape, out_shape = _shape(m["q"]), m["out_shape"]
    keys = sum(_shape(x)[2] for x in m["k"])
    tiles = prefill.plan(q_shape, out_shape, keys)
    if isinstance(tiles, Miss):
        return tiles
    if m["out_dtype"] != "float32" or str(m["q"].ty.dtype) != "float32":
        return Miss(f"the prefill kernel computes in float32, not {m['q'].ty.dtype} -> {m['out_dtype']}")
    _, heads, groups, tokens, dim = q_shape
    packer = _TE(chain)
    work = 2 * heads * groups * tokens * keys * dim
    parallel = worth_threads(work, facts.threads)
    pack = prefill.build_pack(m, packer, heads, keys, parallel)
    mask_info = None if m["mask"] is None else (_shape(m["mask"]), m["additive"])
    kernel = prefill.build_kernel(q_shape, out_shape, mask_info, m["scale"], keys, tiles,
                                  parallel=parallel, lanes=facts.lanes)
    packed = builder.emit(relax.call_tir(
        builder.add_func(pack, "attention_pack"), [visit(x) for x in packer.leaves],
        [relax.TensorType((heads, dim, keys), "float32"), relax.TensorType((heads, keys, out_shape[-1]), "float32")]))
    args = [visit(m["q"])] + ([visit(m["mask"])] if m["mask"] is not None else []) + \
        [builder.emit(relax.TupleGetItem(packed, 0)), builder.emit(relax.TupleGetItem(packed, 1))]
    return relax.call_tir(builder.add_func(kernel, "fused_prefill_attention"), args,
                          relax.TensorType(out_shape, "float32"))


def FuseAttention(target):  # noqa: N802 (named as TVM's pass constructors are: relax.transform.FuseOps())
    """The Relax module pass: every matched attention becomes a call to a fused kernel, the decode
    kernel (here) for a few query rows per KV head, the prefill kernel (kernels/prefill_attention)
    for more; scheduled for `target` (its vector width, schedules.cpu.cpu_facts).

    Once it has run, the pass object holds `fused` ({"decode": n, "prefill": n}) and `kept`:
    one (function, index of the attention in it, reason) for each attention left on the generic
    path. Attentions are indexed in graph order, which is layer order for a canonical decoder
    (one Attention per layer)."""
    import tvm
    from tvm import relax

    from optc.backends.tvm.schedules.cpu import cpu_facts

    facts = cpu_facts(tvm.target.Target(target) if isinstance(target, dict) else target)

    @relax.expr_functor.mutator
    class Fuser(relax.PyExprMutator):
        def __init__(self, mod, stats):
            super().__init__(mod)
            self.stats = stats
            self.chain = None
            self.function = ""
            self.index = 0  # attentions seen in this function

        def visit_call_(self, call):
            m = match(self.chain, call) if self.chain is not None else Miss("", attention=False)
            if isinstance(m, Miss):
                return self._keep(call, m)
            q_shape = _shape(m["q"])
            if q_shape[2] * q_shape[3] > MAX_QUERY_ROWS:
                new = _prefill_call(self.builder_, self.chain, m, self.visit_expr, facts)
                if isinstance(new, Miss):
                    return self._keep(call, new)
                kind = "prefill"
            else:
                func, leaves = build_kernel(m, self.chain, facts)
                gv = self.builder_.add_func(func, "fused_decode_attention")
                args = [self.visit_expr(x) for x in leaves]
                new = relax.call_tir(gv, args, relax.TensorType(m["out_shape"], m["out_dtype"]))
                kind = "decode"
            self.stats["fused"][kind] += 1
            self.index += 1
            return new

        def _keep(self, call, miss: Miss):
            if miss.attention:
                self.stats["kept"].append((self.function, self.index, miss.reason))
                self.index += 1
            return super().visit_call_(call)

    @tvm.transform.module_pass(opt_level=0, name="optc.FuseAttention")
    class FuseAttentionPass:
        def __init__(self):
            self.fused = {"decode": 0, "prefill": 0}
            self.kept: list[tuple[str, int, str]] = []

        def transform_module(self, mod, _ctx):
            fuser = Fuser(mod, {"fused": self.fused, "kept": self.kept})
            for gv, func in list(mod.functions.items()):
                if isinstance(func, relax.Function):
                    fuser.chain, fuser.function, fuser.index = _Chain(func), gv.name_hint, 0
                    fuser.builder_.update_func(gv, fuser.visit_expr(func))
            return relax.transform.DeadCodeElimination()(fuser.builder_.get())

    return FuseAttentionPass()
