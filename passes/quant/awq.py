"""Activation-aware weight scaling for weight_quant (`method: awq`; Lin et al., "AWQ", MLSys 2024).

Round-to-nearest spends a block's few codes on its largest weights, whatever the activations they
meet. AWQ scales each input channel k of a quantised MatMul before rounding,

    Y = X @ W = (X / s) @ (diag(s) W)      s_k = mean|x_k| ^ alpha   (normalised: max * min = 1)

so the weights that meet large activations get finer codes (their share of the block's range
grows), and puts 1/s where it costs nothing: into the op that produces X.

Groups are the MatMuls that read one activation (q/k/v, gate/up); each gets one s. Where 1/s goes
(`fold` in the report):

    norm        X is RMSNormalization / LayerNormalization's output: its scale (and bias) / s
    mul_const   X = Mul(h, c) with c a constant [K] vector (a decomposed norm's weight): c / s
    matmul      X = Mul(a, U) with U = h @ W_up and U read by this Mul only (SwiGLU's down input):
                W_up's columns / s
    attention   X = Reshape(Transpose(Attention(q, k, V))) and V = ... Reshape(h @ W_v) (o_proj's
                input): W_v's columns / s. Attention mixes rows, not channels, so this is exact; with
                grouped-query attention one V head serves several query heads, so s is tied over
                the query heads of a group (one value per kv head and head dimension)
    mul         anything else: Mul(X, 1/s) in the graph before the group's MatMuls

Every fold needs X to be read by the group's MatMuls only, and the folded constant by its op only;
otherwise the group gets the Mul. In float, the folded graph computes the same function
(tests/passes/test_weight_quant.py checks the logits to 1e-5).

alpha is grid-searched per group on calibration rows (`optc.calibration`, the rows of X sampled over
every window): the one that minimises the group's output error ||sim(X / s) @ Q(diag(s) W) - X @ W||
(summed over the group's MatMuls), where Q is the blockwise quantiser the op is built with and sim
rounds X to int8 per block as ONNX Runtime's accuracy_level 4 kernels do (identity for other
levels). alpha 0 gives s = 1: round-to-nearest, byte for byte. The search runs on the float weights
as exported; a fold into W_v / W_up changes their columns after their own group's search (AWQ
does the same). The report gives, per group, the chosen alpha and the relative output error at
alpha 0 (RTN) and at the chosen one, on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from optc.passes.quant.blockwise import dequantize_blockwise, quantize_blockwise

NORM_OPS = {("", "RMSNormalization"), ("", "LayerNormalization"), ("", "SimplifiedLayerNormalization"),
            ("com.microsoft", "SimplifiedLayerNormalization")}
DEFAULT_ALPHAS = [round(i / 20, 2) for i in range(20)]  # AWQ's grid: 0, 0.05, ..., 0.95
MIN_SCALE = 1e-4  # AWQ's clamp of mean|x|^alpha (a channel that is always zero)
SAMPLE_ROWS = 1024  # calibration rows per activation the search runs on


@dataclass
class Group:
    """MatMuls that read one activation, and where its 1/s can go."""

    act: ir.Value
    members: list  # (MatMul node, (weight source, transposed, Transpose node or None))
    fold: str = "mul"  # norm | mul_const | matmul | attention | mul
    target: object = None  # the node (norm, Mul, MatMul) whose constant takes 1/s
    constants: list = field(default_factory=list)  # the initializer values divided by s (along their last axis
    # for norm / mul_const; the columns of a [K_in, K] weight for matmul / attention)
    tie: np.ndarray | None = None  # [K] channel -> tied parameter (attention with GQA); None: one per channel
    scale: np.ndarray | None = None  # s [K], set by the search (None: identity)


def _only_use(value: ir.Value, node: ir.Node) -> bool:
    return value is not None and all(u.node is node for u in value.uses()) and not value.is_graph_output()


def _private_initializer(graph: ir.Graph, value: ir.Value, node: ir.Node) -> bool:
    """A float constant held by the graph, read by `node` only, not a graph input: safe to change."""
    return (value is not None and value.const_value is not None and value.is_initializer()
            and value.name in graph.initializers and value not in graph.inputs and _only_use(value, node)
            and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16))


def _last_axis_vector(value: ir.Value, K: int) -> bool:
    shape = value.const_value.shape
    return len(shape) >= 1 and shape[-1] == K and all(d == 1 for d in list(shape)[:-1])


def _perm(node: ir.Node) -> list[int] | None:
    p = node.attributes.get("perm")
    return list(p.as_ints()) if p is not None else None


def find_fold(graph: ir.Graph, group: Group, K: int, decoder) -> None:
    """Set group.fold/target/constants/tie: where 1/s can go exactly (else a Mul)."""
    act = group.act
    members = {n for n, _ in group.members}
    if act.is_graph_output() or any(u.node not in members or u.idx != 0 for u in act.uses()):
        return  # read by something that is not scaled: the Mul keeps that reader's input as it is
    p = act.producer()
    if p is None or p.graph is not graph:
        return
    if (p.domain, p.op_type) in NORM_OPS and p.outputs[0] is act:
        axis = p.attributes.get("axis")
        consts = [v for v in p.inputs[1:3] if v is not None]
        if (axis is None or axis.as_int() == -1) and consts and all(
                _private_initializer(graph, v, p) and _last_axis_vector(v, K) for v in consts):
            group.fold, group.target, group.constants = "norm", p, consts
        return
    if p.op_type == "Mul" and p.domain == "" and len(p.inputs) == 2:
        a, b = p.inputs
        const = [v for v in (a, b) if v is not None and v.const_value is not None]
        if len(const) == 1:
            c = const[0]
            if _private_initializer(graph, c, p) and _last_axis_vector(c, K):
                group.fold, group.target, group.constants = "mul_const", p, [c]
            return
        for v in (b, a):  # SwiGLU: Mul(silu(gate), up); up's MatMul output read by this Mul only
            m = v.producer() if v is not None else None
            if (m is not None and m.op_type == "MatMul" and m.domain == "" and m.graph is graph
                    and _only_use(v, p) and _private_initializer(graph, m.inputs[1], m)
                    and len(m.inputs[1].const_value.shape) == 2 and m.inputs[1].const_value.shape[1] == K):
                group.fold, group.target, group.constants = "matmul", m, [m.inputs[1]]
                return
        return
    _find_attention_fold(graph, group, p, K, decoder)


def _find_attention_fold(graph: ir.Graph, group: Group, reshape: ir.Node, K: int, decoder) -> None:
    """o_proj's input: Reshape(Transpose[0,2,1,3](Attention(...)[0])) with V = [Concat(past,)]
    Transpose[0,2,1,3](Reshape(h @ W_v)): fold into W_v's columns."""
    if decoder is None or reshape.op_type != "Reshape" or reshape.domain != "":
        return
    H, KV, d = decoder.num_heads, decoder.kv_heads, decoder.head_dim
    if K != H * d or H % KV:
        return

    def single(v: ir.Value, op: str, perm=None) -> ir.Node | None:
        n = v.producer() if v is not None else None
        if n is None or n.op_type != op or n.domain != "" or n.graph is not graph:
            return None
        return n if perm is None or _perm(n) == perm else None

    t = single(reshape.inputs[0], "Transpose", [0, 2, 1, 3])
    if t is None or not _only_use(t.outputs[0], reshape):
        return
    att = single(t.inputs[0], "Attention")
    if att is None or att.outputs[0] is not t.inputs[0] or not _only_use(att.outputs[0], t) or len(att.inputs) < 3:
        return
    if any(v is not None for v in att.inputs[4:]):
        return  # a cache inside the op (past_value): not the canonical form, left alone
    v = att.inputs[2]
    cat = single(v, "Concat")
    if cat is not None:  # V = Concat(past, new) along the sequence: the new part carries W_v
        axis = cat.attributes.get("axis")
        if axis is None or axis.as_int() not in (2, -2) or len(cat.inputs) != 2:
            return
        v = cat.inputs[1]
        cat_out = cat.outputs[0]
        if any(u.node is not att for u in cat_out.uses()):
            return  # the cache is read elsewhere (it holds V / s: only attention may read it)
    t2 = single(v, "Transpose", [0, 2, 1, 3])
    if t2 is None or not _only_use(v, cat if cat is not None else att):
        return
    r2 = single(t2.inputs[0], "Reshape")
    if r2 is None or not _only_use(t2.inputs[0], t2):
        return
    mm = single(r2.inputs[0], "MatMul")
    if mm is None or not _only_use(r2.inputs[0], r2) or not _private_initializer(graph, mm.inputs[1], mm):
        return
    if list(mm.inputs[1].const_value.shape)[1:] != [KV * d]:
        return
    g = H // KV
    heads = np.arange(K) // d  # channel h*d + j of o_proj's input reads kv head h // g, dimension j
    group.fold, group.target, group.constants = "attention", mm, [mm.inputs[1]]
    group.tie = (heads // g) * d + np.arange(K) % d


# ---------------------------------------------------------------------------- the search
def simulate_activation(x: np.ndarray, block_size: int, accuracy_level: int) -> np.ndarray:
    """What MatMulNBits computes with: at accuracy_level 4 A is rounded to int8 per block of
    block_size along K (symmetric, absmax / 127), otherwise A as it is."""
    if accuracy_level != 4:
        return x
    r, K = x.shape
    kb = -(-K // block_size)
    xp = np.zeros((r, kb * block_size), np.float32)
    xp[:, :K] = x
    xp = xp.reshape(r, kb, block_size)
    scale = np.abs(xp).max(axis=2, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale > 0, np.round(xp / scale), 0) * scale
    return q.reshape(r, -1)[:, :K].astype(np.float32)


def scales_for(absmean: np.ndarray, alpha: float, tie: np.ndarray | None) -> np.ndarray:
    """s [K] = mean|x|^alpha, clamped and normalised so that max(s) * min(s) = 1 (AWQ), tied
    channels sharing the mean of their |x|."""
    m = absmean.astype(np.float64)
    if tie is not None:
        m = (np.bincount(tie, m) / np.bincount(tie))[tie]
    s = np.maximum(np.power(m, alpha), MIN_SCALE)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def quantized(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    K = w.shape[0]
    return dequantize_blockwise(*quantize_blockwise(w, bits, block_size, symmetric), bits, block_size, K)


def search(x: np.ndarray, absmean: np.ndarray, weights: list[np.ndarray], alphas: list[float], tie, *, bits: int,
           block_size: int, symmetric: bool, accuracy_level: int) -> tuple[float, np.ndarray, float, float]:
    """(alpha, s, relative error at alpha 0, relative error at alpha) for one group: the alpha of
    `alphas` with the least output error on rows x (ties: the smaller alpha)."""
    refs = [x @ w for w in weights]
    den = float(sum(np.sum(r.astype(np.float64) ** 2) for r in refs)) or 1.0

    def error(s: np.ndarray) -> float:
        xs = simulate_activation(x / s, block_size, accuracy_level)
        return float(np.sqrt(sum(np.sum((xs @ quantized(w * s[:, None], bits, block_size, symmetric) - r)
                                        .astype(np.float64) ** 2) for w, r in zip(weights, refs)) / den))

    ones = np.ones(x.shape[1], np.float32)
    rtn = error(ones)
    best = None
    for a in alphas:
        s = ones if a == 0 else scales_for(absmean, a, tie)
        e = rtn if a == 0 else error(s)
        if best is None or e < best[3]:
            best = (a, s, rtn, e)
    return best


# AWQ's auto-clip grid: each block's range shrunk to r * max|w| (1.0 = not clipped)
CLIP_RATIOS = [round(1 - i / 20, 2) for i in range(10)]  # 1.0, 0.95, ..., 0.55
CLIP_ROWS = 512  # calibration rows the clip search runs on


def _blocks(a: np.ndarray, block_size: int, axis: int) -> np.ndarray:
    """Pad axis (K) with zeros to whole blocks and split it: [.., kb, block_size, ..]."""
    K = a.shape[axis]
    kb = -(-K // block_size)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, kb * block_size - K)
    a = np.pad(a, pad)
    return a.reshape(a.shape[:axis] + (kb, block_size) + a.shape[axis + 1:])


def clip_to(w: np.ndarray, ratios: np.ndarray, block_size: int) -> np.ndarray:
    """W [K, N] with each block (along K) of each column clipped to ratios[j, n] * its max |w|."""
    K, N = w.shape
    wb = _blocks(w, block_size, 0)  # [kb, bs, N]
    lim = (np.abs(wb).max(axis=1) * ratios)[:, None, :]
    return np.clip(wb, -lim, lim).reshape(-1, N)[:K].astype(w.dtype)


def clip_search(x: np.ndarray, w: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """AWQ's auto-clip: per block and output column, the ratio of CLIP_RATIOS whose clipped,
    quantised block gives the least error of that block's part of the output, x[:, blk] @ w[blk, n],
    on rows x [r, K] (x the MatMul's input as quantised: divided by s). Returns ratios [kb, N].
    The choice does not change when a column is scaled afterwards (a fold into W_v / W_up):
    the clip limit and the error scale with it."""
    xb = _blocks(x, block_size, 1).transpose(1, 0, 2)  # [kb, r, bs]
    wb = _blocks(w, block_size, 0)  # [kb, bs, N]
    best_err, best = None, None
    for r in CLIP_RATIOS:
        ratios = np.full((wb.shape[0], w.shape[1]), r, np.float32)
        d = _blocks(quantized(clip_to(w, ratios, block_size), bits, block_size, symmetric) - w, block_size, 0)
        err = np.sum(np.matmul(xb, d).astype(np.float64) ** 2, axis=1)  # [kb, N]
        if best is None:
            best_err, best = err, ratios
        else:
            better = err < best_err
            best_err, best = np.where(better, err, best_err), np.where(better, ratios, best)
    return best


# ---------------------------------------------------------------------------- applying it
def apply_fold(graph: ir.Graph, group: Group, unique) -> ir.Value | None:
    """Put 1/s into the group's fold target (or a new Mul, returned: the group's MatMuls read it)."""
    s = group.scale
    if group.fold in ("norm", "mul_const"):
        for c in group.constants:
            arr = c.const_value.numpy()
            c.const_value = ir.tensor((arr / s.astype(arr.dtype)).astype(arr.dtype), name=c.name)
        return None
    if group.fold in ("matmul", "attention"):
        c = group.constants[0]
        arr = c.const_value.numpy()
        inv = group.scale if group.tie is None else _tied(group)
        c.const_value = ir.tensor((arr / inv.astype(arr.dtype)[None, :]).astype(arr.dtype), name=c.name)
        return None
    dtype = group.act.dtype.numpy() if group.act.dtype is not None else np.float32
    name = unique(f"{group.act.name}/awq.inv_scale")
    inv = (np.float32(1) / s).astype(dtype)
    const = ir.Value(name=name, shape=ir.Shape(inv.shape), type=ir.TensorType(ir.DataType.from_numpy(inv.dtype)),
                     const_value=ir.tensor(inv, name=name))
    graph.register_initializer(const)
    first = next(n for n in graph if n in {m for m, _ in group.members})
    mul = ir.Node("", "Mul", [group.act, const], name=unique(f"{group.act.name}/awq_scale"))
    graph.insert_before(first, mul)
    mul.outputs[0].name = unique(f"{group.act.name}/awq_scaled")
    mul.outputs[0].dtype, mul.outputs[0].shape = group.act.dtype, group.act.shape
    for node, _ in group.members:
        node.replace_input_with(0, mul.outputs[0])
    return mul.outputs[0]


def _tied(group: Group) -> np.ndarray:
    """s per column of W_v ([KV * d]) from s per channel of o_proj's input (tied: equal over a group)."""
    out = np.empty(int(group.tie.max()) + 1, np.float32)
    out[group.tie] = group.scale
    return out


def format_report(report: dict) -> list[str]:
    clip = report.get("clip", False)
    lines = [f"  weight_quant awq ({report['calibration_tokens']:,} calibration tokens, {report['rows']} rows per "
             f"activation): input | MatMuls | 1/s into | alpha | rel. output error rtn -> awq"
             + (" -> clipped (mean clip ratio)" if clip else "")]
    for e in report["groups"]:
        tail = f" -> {e['rel_error_clip']:.4e} ({e['clip_ratio_mean']:.3f})" if clip else ""
        lines.append(f"    {e['input']}: {len(e['matmuls'])} | {e['fold']}{' ' + e['target'] if e['target'] else ''} "
                     f"| {e['alpha']:.2f} | {e['rel_error_rtn']:.4e} -> {e['rel_error_awq']:.4e}{tail} "
                     f"({e['error_reduction']:+.1%})")
    return lines


def group_error(x: np.ndarray, weights: list[np.ndarray], quantised: list[np.ndarray], s: np.ndarray, *,
                block_size: int, accuracy_level: int) -> float:
    """Relative output error of a group: sim(x / s) @ Wq against x @ W, over its MatMuls."""
    xs = simulate_activation(x / s, block_size, accuracy_level)
    num = den = 0.0
    for w, q in zip(weights, quantised):
        ref = x @ w
        num += float(np.sum((xs @ q - ref).astype(np.float64) ** 2))
        den += float(np.sum(ref.astype(np.float64) ** 2))
    return float(np.sqrt(num / (den or 1.0)))
