"""Default CPU schedules for what MetaSchedule did not tune.

TVM's schedule for an untuned fused TIR function is its naive loop nest: one thread, scalar, no
blocking. For this project's decoder, untuned prefill of 512 tokens took 6.6 s, 2.5 s of it in
the LM head's matmul. A tuning budget of ~10 minutes reaches only some tasks, so the rest need
schedules that are merely decent without any search. Those are here, as dlight-style rules
(TVM's dlight has no CPU matmul rule):
- matmul / GEMV: any fused function with one product reduction (batch dims, any operand layout,
  element-wise prologue and epilogue), normalised to C[b, i, j] += A[b, i, k] * B[b, j, k];
  register tiles, vectorised columns, threads over column panels, B packed per panel;
- row-wise (softmax, RMS norm): rows in parallel, all stages of a row together, reductions split
  into vector lanes;
- softmax and sigmoid legalised with a vectorisable exp.
Element-wise functions stay plain loops: a rule that flattened, vectorised and threaded them
measured no faster (prefill 128: 29.0 against 30.1 ms; decode within 1%).
Schedules from the tuning database take precedence; the rules apply to what is left.
Thread count and vector width come from the TVM target (`cpu_facts`: num-cores, and the vector
extensions LLVM gives its mcpu/mattr), not from constants.
"""

from __future__ import annotations

from dataclasses import dataclass

GEMV_ROWS = 4  # up to this many rows (decode: 1 token, or one query per head of a GQA group)
# Below this many multiply-adds a function runs on one thread: waking the thread pool and joining
# it costs more than it saves. Measured on 2 threads, decode_128 / decode_2048 VM calls (one
# build per threshold, runs interleaved): from 2^10 1.00 / 1.42 ms, 2^13 1.03 / 1.41, 2^15
# 0.93 / 1.47, 2^17 1.10, 2^19 1.51 / 1.73 ms. Decode's GEMVs stream weights from L3, and two
# cores stream faster than one even for the 256 x 256 projections (65K multiply-adds).
PARALLEL_MIN_WORK = 1 << 15
# The widest vector extension a target has, by LLVM feature name, and its register width in bits.
# (TVM's llvm_get_vector_width answers 512 on this AVX-512 machine for any x86-64 target, haswell
# and plain x86-64 included, so the features are asked instead.)
VECTOR_FEATURES = (("avx512f", 512), ("avx", 256), ("sse2", 128), ("neon", 128))
# The register tiles here and in kernels/ (4 x 16 C tiles in 8 accumulators, blocks of 16 keys)
# were sized for 256-bit (AVX2) vectors, and every measurement in these files was taken with 8
# float32 lanes: an AVX-512 target (e.g. znver4) uses its registers 256 bits at a time, as it
# always has here, until a 512-bit variant is measured.
MAX_VECTOR_BITS = 256


@dataclass(frozen=True)
class CpuFacts:
    """What optc's CPU schedules take from the TVM target."""

    threads: int  # the target's num-cores: a GEMV gets at least this many column tiles
    lanes: int  # float32 lanes of one vector


def cpu_facts(target) -> CpuFacts:
    """The facts of a TVM llvm target, e.g. {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
    "mcpu": "znver4", "num-cores": 2} (pipeline.cpu_target): threads from num-cores (1 where the
    target does not say), vector width from the features LLVM gives its mtriple/mcpu/mattr."""
    key = str(target)  # (the rules ask for every function; LLVM is asked once per target)
    if key not in _FACTS:
        from tvm.target import codegen

        bits = next((b for feature, b in VECTOR_FEATURES if codegen.target_has_features(feature, target)), 128)
        cores = target.attrs.get("num-cores")
        _FACTS[key] = CpuFacts(threads=max(1, int(cores)) if cores is not None else 1,
                               lanes=min(bits, MAX_VECTOR_BITS) // 32)
    return _FACTS[key]


_FACTS: dict[str, CpuFacts] = {}


def worth_threads(work: int, threads: int) -> bool:
    """Whether a function of `work` multiply-adds runs on threads: the target has more than one
    (a 1-core target's parallel loop only pays for the thread pool) and the work is at least
    PARALLEL_MIN_WORK."""
    return threads > 1 and work >= PARALLEL_MIN_WORK


def parallel_if_worth(sch, loop, work: int, threads: int) -> None:
    """Threads for `loop` where worth_threads says so."""
    if worth_threads(work, threads):
        sch.parallel(loop)


def pick_divisor(extent: int, candidates) -> int:
    for c in candidates:
        if extent % c == 0:
            return c
    return 1


def legalizations() -> dict:
    """Relax ops legalised differently from TVM's defaults on the CPU. Softmax: TOPI's
    fast_softmax, whose exp is a range reduction plus a degree-5 polynomial in plain arithmetic
    (vectorisable; Cephes-style, float32-accurate to a few ulp) instead of a libm call per
    element: the libm exp made softmax the largest cost of a 512-token prefill. Sigmoid (the
    SwiGLU gate, fused into the FFN matmul's epilogue): 1 / (1 + fast_exp(-x)) for the same
    reason.

    Not TVM's FastMathTransform, though its softmax is this one (topi.nn.fast_softmax): it also
    swaps tanh and erf for fast_tanh and fast_erf, which changes the GELU of GPT-2, Gemma and
    GPT-NeoX exports (measured on [-6, 6]: 69% of tanh and 47% of erf results differ, by up to
    4e-7), and it has no sigmoid. Here only softmax and sigmoid change."""
    from tvm import te, topi

    def softmax(bb, call):
        return bb.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis)

    def fast_sigmoid(x):
        e = topi.fast_exp(topi.negative(x))
        return te.compute(x.shape, lambda *i: 1.0 / (1.0 + e(*i)), name="fast_sigmoid")

    def sigmoid(bb, call):
        if str(call.args[0].ty.dtype) != "float32":
            return bb.call_te(topi.sigmoid, call.args[0])
        return bb.call_te(fast_sigmoid, call.args[0])

    return {"relax.nn.softmax": softmax, "relax.sigmoid": sigmoid}


def default_rules() -> list:
    """The rules, in the order they are tried on each untuned function."""
    return [cpu_matmul_rule(), cpu_row_rule()]


def _root_blocks(rule, func, target):
    """(schedule, top-level blocks) of `func` if `rule` may apply to it at all, else None."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block

    if not isinstance(func, tirx.PrimFunc) or not rule.is_target_available(target):
        return None
    sch = s_tir.Schedule(func)
    return sch, sch.get_child_blocks(get_root_block(sch))


def _spatial_only(sch, block) -> bool:
    from tvm.tirx import IterVar

    return all(v.iter_type == IterVar.DataPar for v in sch.get(block).iter_vars)


def _vectorize_inner(sch, loop, lanes: int) -> None:
    if int(sch.get(loop).extent) % lanes == 0:
        _, vec = sch.split(loop, [None, lanes])
        sch.vectorize(vec)


def rfactor_lanes(sch, block, lanes: int):
    """Split a row's max or sum into `lanes` partial results (rfactor): the loop over the
    row then runs as vector instructions instead of one scalar chain paying an add's latency
    per element. Returns the partial-result block, or None where the row is too short."""
    loop = sch.get_loops(block)[-1]
    extent = int(sch.get(loop).extent)
    if extent % lanes or extent < 2 * lanes:
        return None
    _, inner = sch.split(loop, [None, lanes])
    return sch.rfactor(inner, factor_axis=len(sch.get(block).iter_vars) - 1)


def lanes_innermost(sch, partial, lanes: int) -> None:
    """Vectorise a partial-result block over its lanes. compute_at under the row loop puts the
    lane loop first (a scalar chain per lane, striding through the row: measured 5 ns per element
    of a 512-wide softmax); the lanes go innermost instead, the loop over the row outside."""
    below = sch.get_loops(partial)[1:]  # (the first is the row loop it was computed at)
    inner = next((lp for lp in below if int(sch.get(lp).extent) == lanes), None)
    if inner is None:
        return
    others = [lp for lp in below if not lp.same_as(inner) and int(sch.get(lp).extent) > 1]
    sch.reorder(*others, inner)
    sch.vectorize(inner)


def cpu_row_rule():
    """Row-wise functions: softmax, RMS norm — reductions over the last axis, each row
    independent. One parallel loop over rows; every stage of a row computed inside it (the
    row stays in cache between the max, exp, sum and normalise passes); inner loops of the
    element-wise stages vectorised."""
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class CpuRows(CPUScheduleRule):
        def apply(self, func, target, _tunable):
            started = _root_blocks(self, func, target)
            if started is None:
                return None
            sch, blocks = started
            facts = cpu_facts(target)
            lanes = facts.lanes
            if len(blocks) < 2 or all(_spatial_only(sch, b) for b in blocks) or not _spatial_only(sch, blocks[-1]):
                return None
            try:
                # Element-wise stages stay stored: inlining softmax's exp into the sum and the
                # normalisation measured 2.6x slower. Partial-result blocks come first: rfactor
                # wants the reduction alone in its loop nest.
                partials = [rfactor_lanes(sch, b, lanes) for b in blocks if not _spatial_only(sch, b)]
                blocks = sch.get_child_blocks(get_root_block(sch))
                loops = sch.get_loops(blocks[-1])
                if len(loops) < 2:
                    return None
                row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
                elements = int(sch.get(row).extent) * int(sch.get(loops[-1]).extent)
                parallel_if_worth(sch, row, 4 * elements, facts.threads)  # (max, exp, sum, scale: a few ops each)
                for block in reversed(blocks[:-1]):
                    sch.compute_at(block, row, preserve_unit_loops=True)
                for block in blocks:
                    if _spatial_only(sch, block):
                        _vectorize_inner(sch, sch.get_loops(block)[-1], lanes)
                for partial in partials:
                    if partial is not None:
                        lanes_innermost(sch, partial, lanes)
                return sch
            except Exception:  # not row-wise after all
                return None

    return CpuRows()


def cpu_matmul_rule():
    """A dlight ScheduleRule (built lazily: TVM is imported only by the TVM backend)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, get_index_map, get_reduction_blocks

    class CpuMatmul(CPUScheduleRule):
        def apply(self, func, target, _tunable):
            started = _root_blocks(self, func, target)
            if started is None:
                return None
            sch, blocks = started
            reductions = get_reduction_blocks(sch, blocks)
            if reductions is None:
                return None
            block = sch.get(reductions[0])
            if str(block.writes[0].source.dtype) != "float32":
                return None
            operands = [r.source for r in block.reads if not r.source.same_as(block.writes[0].source)]
            if len(operands) != 2:  # a product of two operands (not a norm's sum of squares)
                return None
            facts = cpu_facts(target)
            for strategy in (self._normalised, self._single_row):
                sch = s_tir.Schedule(func)
                main = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))[0]
                try:
                    scheduled = strategy(sch, main, facts)
                except Exception:  # a shape this strategy does not handle
                    continue
                if scheduled is not None:
                    return scheduled
            return None

        def _single_row(self, sch, main, facts: CpuFacts):
            """One output row (decode GEMV, e.g. the LM head), where the normalisation finds no
            row axis: all spatial axes fused into the column axis."""
            from tvm.tirx import IterVar

            kinds = [v.iter_type for v in sch.get(main).iter_vars]
            extents = [int(v.dom.extent) for v in sch.get(main).iter_vars]
            if sum(e > 1 for e, kind in zip(extents, kinds) if kind == IterVar.DataPar) != 1:
                return None  # several rows (a batched matmul this rule did not normalise): not this strategy
            loops = sch.get_loops(main)
            spatial = [lp for lp, kind in zip(loops, kinds) if kind == IterVar.DataPar]
            reduce = [lp for lp, kind in zip(loops, kinds) if kind == IterVar.CommReduce]
            sch.reorder(*spatial, *reduce)
            j = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
            k = sch.fuse(*reduce) if len(reduce) > 1 else reduce[0]
            return self._tile(sch, main, None, j, k, 1, int(sch.get(j).extent), None, facts)

        def _normalised(self, sch, main, facts: CpuFacts):
            # Normalise to C[S, I, J] += A[S, I, K] * B[S, J, K]; the reindex copies are inlined
            # back, so operands are read where they lie.
            b_operand = sch.get(main).reads[1].source
            reindex = [sch.reindex(main, ("read", 0)), sch.reindex(main, ("read", 1)),
                       sch.reindex(main, ("write", 0))]
            matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
            sch.transform_layout(reindex[0], ("write", 0), a_map)
            sch.transform_layout(reindex[1], ("write", 0), b_map)
            sch.transform_layout(reindex[2], ("read", 0), c_map)
            sch.transform_block_layout(main, matmul_map)
            n = int(sch.get(sch.get_loops(main)[2]).extent)
            lanes = facts.lanes
            if n % lanes and n > lanes:  # e.g. attention over cache + new keys
                sch.pad_einsum(main, [1, 1, lanes, 1])  # (zero-padded copies of B and C)
            sch.compute_inline(reindex[0])
            sch.compute_inline(reindex[1])  # (the output's copy is inlined with the epilogue, below)
            padded_b = None
            for _ in range(3):  # element-wise prologues (casts, dequantisation), chains too
                for block in list(sch.get_producers(main)):
                    if sch.get(block).name_hint.endswith("_pad"):
                        # B's zero-padded copy stays a copy: inlined, every multiply-add of the
                        # inner loop tests the bound (measured 15x slower on 382 keys)
                        padded_b = block
                        continue
                    try:
                        sch.compute_inline(block)
                    except Exception:
                        pass
            if padded_b is not None:
                # stored [batch, k, j]: the tile's vector loads along j are then contiguous
                sch.transform_layout(padded_b, ("write", 0), lambda b, j, k: (b, k, j))
                b_operand = sch.get(padded_b).writes[0].source

            batch, i, j, k = sch.get_loops(main)
            m, n = int(sch.get(i).extent), int(sch.get(j).extent)
            return self._tile(sch, main, (batch, i), j, k, m, n, b_operand, facts)

        def _tile(self, sch, main, rows, j, k, m, n, b_operand, facts: CpuFacts):
            lanes = facts.lanes
            if m <= GEMV_ROWS:
                # GEMV-like (decode): B is streamed once; each tile of nj columns accumulates in
                # registers (nj <= 64: 8 256-bit registers); tiles are spread across threads, at
                # least one per thread of the target
                mi = m
                nj = next((c for c in (64, 32) if n % c == 0 and n // c >= facts.threads), 0) or \
                    pick_divisor(n, (4 * lanes, 2 * lanes, lanes, 4, 2))
            else:
                # GEMM: a 4 x 16 tile of C in registers (8 256-bit accumulators; 4 x 32 spills)
                nj = pick_divisor(n, (2 * lanes, lanes, 4, 2))
                mi = pick_divisor(m, (4, 2)) if nj >= lanes else pick_divisor(m, (8, 4, 2))
            work = m * n * int(sch.get(k).extent)
            jo, ji = sch.split(j, [None, nj])
            if rows is None:
                ii = None
                sch.reorder(jo, k, ji)
                outer = tile = jo
                parallel_if_worth(sch, outer, work, facts.threads)
            elif m <= GEMV_ROWS:
                batch, i = rows
                io, ii = sch.split(i, [None, mi])
                sch.reorder(batch, io, jo, k, ii, ji)
                outer = tile = sch.fuse(batch, io, jo)
                parallel_if_worth(sch, outer, work, facts.threads)
            else:
                # Threads take column panels; each packs its K x nj panel of B into a contiguous
                # buffer once (B's rows are a power-of-two apart, so unpacked they all fall into
                # the same cache sets and miss on every reuse), then runs every row tile over it.
                batch, i = rows
                io, ii = sch.split(i, [None, mi])
                sch.reorder(batch, jo, io, k, ii, ji)
                outer = sch.fuse(batch, jo)
                tile = io
                parallel_if_worth(sch, outer, work, facts.threads)
                reads = [r for r, region in enumerate(sch.get(main).reads) if region.source.same_as(b_operand)]
                if reads and m // mi > 1:
                    packed = sch.cache_read(main, reads[0], "local")
                    sch.compute_at(packed, outer, preserve_unit_loops=True)
                    _vectorize_inner(sch, sch.get_loops(packed)[-1], lanes)
            write_back = sch.cache_write(main, 0, "local")
            sch.reverse_compute_at(write_back, tile, preserve_unit_loops=True)
            auto_inline_consumer_chain(sch, write_back)
            if nj % lanes == 0:  # (vectorised before the init is split off, which copies it)
                jv_o, jv = sch.split(ji, [None, lanes])
                sch.vectorize(jv)
                if nj <= 4 * lanes:
                    sch.unroll(jv_o)
            if ii is not None and mi <= 8:
                sch.unroll(ii)
            sch.decompose_reduction(main, k)
            loops = sch.get_loops(write_back)
            if nj % lanes == 0:
                _, vec = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vec)
            return sch

    return CpuMatmul()
