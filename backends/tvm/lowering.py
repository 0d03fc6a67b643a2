"""ONNX-level lowering of a canonical, pass-rewritten decoder for TVM's Relax importer.

TVM's ONNX frontend takes neither the standard opset-23 `Attention` op (its `Attention` is the
com.microsoft one) nor `RotaryEmbedding`, nor an `If` whose branches it would have to import.
optc therefore lowers the graph itself, before import, without touching TVM:

1. `legalize`: every `Attention` and `RotaryEmbedding` becomes primitive ONNX ops (MatMul,
   Softmax, Slice, ...) with the op's exact semantics (GQA, mask, causal, softcap, scale, and
   the qk output modes H2O uses).
2. `specialize`: the graph gets static shapes for one (new tokens, cache segments) bucket and is
   constant-folded (onnxscript optimizer). Shape arithmetic disappears and an `If` whose
   condition depends only on shapes (block-sparse prefill) is inlined to the branch it takes.

Static shapes are what MetaSchedule can tune: the runtime pads each step into the smallest
compiled bucket (masked cache slots, discarded extra tokens), see runtime/executors/tvm.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import tape

from optc.errors import OptcError
from optc.ir import const, copy_model, ints, take_over

# Ops this lowering rewrites; everything else must be in TVM's ONNX convert map.
LEGALIZED = ("Attention", "RotaryEmbedding")
_NEG = float(np.finfo(np.float32).min)


def _scalar(t: tape.Tape, x: int) -> ir.Value:
    return const(t, np.int64(x))


def _f32(t: tape.Tape, x: float) -> ir.Value:
    return const(t, np.float32(x))


def _replace(graph: ir.Graph, node: ir.Node, t: tape.Tape, outputs: list[ir.Value | None]) -> None:
    for j, n in enumerate(t.nodes):
        n.name = f"{node.name}/lowered/{j}"
        for k, out in enumerate(n.outputs):
            # names unique across the graph and its If branches (inlining a branch merges them)
            out.name = f"{n.name}:{k}"
    graph.insert_before(node, t.nodes)
    for old, new in zip(node.outputs, outputs):
        if new is None:
            if old.uses() or old in graph.outputs:
                raise OptcError(f"tvm lowering: {node.op_type} node {node.name!r}: output {old.name!r} is used "
                                f"but this lowering cannot produce it")
            continue
        take_over(old, new)
    graph.remove(node, safe=True)


def _lower_attention(graph: ir.Graph, node: ir.Node, q_heads: int, kv_heads: int) -> None:
    """Standard ONNX Attention (opset 23), 4-D form, past already concatenated into K/V."""
    where = f"tvm lowering: Attention node {node.name!r}"
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    q, k, v, mask, past_k, past_v = ins[:6]
    if past_k is not None or past_v is not None or len(node.inputs) > 6:
        raise OptcError(f"{where}: past_key/past_value inputs are not supported (canonical graphs concatenate "
                        f"the cache before attention)")
    if q.shape is not None and len(q.shape) != 4:
        raise OptcError(f"{where}: {len(q.shape)}-D inputs are not supported (canonical graphs use 4-D Q/K/V)")
    a = node.attributes
    scale = a.get_float("scale", 0.0)
    softcap = a.get_float("softcap", 0.0)
    causal = a.get_int("is_causal", 0)
    mode = a.get_int("qk_matmul_output_mode", 0)
    rep = q_heads // kv_heads
    t = tape.Tape()
    head_dim = q.shape[3] if q.shape is not None and isinstance(q.shape[3], int) else None
    if head_dim is None:
        raise OptcError(f"{where}: the query's head dimension is not static")
    scale = scale or 1.0 / float(np.sqrt(head_dim))
    # GQA without copying K/V: group the query heads by the KV head they share (head h uses
    # KV head h // rep, as the op specifies) and broadcast K/V over the group axis.
    q5 = t.op("Reshape", [q, ints(t, 0, kv_heads, rep, -1, head_dim)])
    k5 = t.op("Unsqueeze", [k, ints(t, 2)])
    v5 = t.op("Unsqueeze", [v, ints(t, 2)])
    scores = t.op("MatMul", [q5, t.op("Transpose", [k5], {"perm": [0, 1, 2, 4, 3]})])
    scores = t.op("Mul", [scores, _f32(t, scale)])                                   # [B,Hkv,r,S,T]
    raw = scores
    if causal:  # query i sits at cache position T - S + i
        one, zero = _scalar(t, 1), _scalar(t, 0)
        s_len = t.op("Squeeze", [t.op("Shape", [scores], {"start": 3, "end": 4})])
        t_len = t.op("Squeeze", [t.op("Shape", [scores], {"start": 4, "end": 5})])
        qi = t.op("Unsqueeze", [t.op("Range", [t.op("Sub", [t_len, s_len]), t_len, one]), ints(t, 1)])
        kj = t.op("Range", [zero, t_len, one])
        scores = t.op("Where", [t.op("Greater", [kj, qi]), _f32(t, _NEG), scores])
    if mask is not None:
        rank = len(mask.shape) if mask.shape is not None else None
        if rank == 4:
            if mask.shape[1] != 1:
                raise OptcError(f"{where}: a per-head attention mask is not supported (mask shape {mask.shape})")
            mask5 = t.op("Unsqueeze", [mask, ints(t, 1)])
        elif rank in (2, 3):
            mask5 = mask
        else:
            raise OptcError(f"{where}: attention mask of unknown rank")
        if mask.dtype == ir.DataType.BOOL:
            scores = t.op("Where", [mask5, scores, _f32(t, _NEG)])
        else:
            scores = t.op("Add", [scores, mask5])
    masked = scores
    if softcap:
        scores = t.op("Mul", [t.op("Tanh", [t.op("Div", [scores, _f32(t, softcap)])]), _f32(t, softcap)])
    capped = scores
    probs = t.op("Softmax", [scores], {"axis": -1})
    y5 = t.op("MatMul", [probs, v5])                                                 # [B,Hkv,r,S,Dv]
    y = t.op("Reshape", [y5, t.op("Concat", [ints(t, 0, q_heads), t.op("Shape", [y5], {"start": 3})], {"axis": 0})])
    outputs: list[ir.Value | None] = [y, k if len(node.outputs) > 1 else None, v if len(node.outputs) > 2 else None]
    if len(node.outputs) > 3:
        qk = {0: raw, 1: masked, 2: capped, 3: probs}.get(mode)
        if qk is None:
            raise OptcError(f"{where}: qk_matmul_output_mode {mode} is not supported")
        outputs.append(t.op("Reshape", [qk, t.op("Concat", [ints(t, 0, q_heads), t.op("Shape", [qk], {"start": 3})],
                                                 {"axis": 0})]))
    # present_key/value without a past input are K and V themselves
    for j in (1, 2):
        if outputs[j] is not None:
            outputs[j] = t.op("Identity", [outputs[j]])
    _replace(graph, node, t, outputs[: len(node.outputs)])


def _lower_rotary(graph: ir.Graph, node: ir.Node) -> None:
    """Standard ONNX RotaryEmbedding (opset 23)."""
    where = f"tvm lowering: RotaryEmbedding node {node.name!r}"
    x, cos, sin = node.inputs[0], node.inputs[1], node.inputs[2]
    pos = node.inputs[3] if len(node.inputs) > 3 else None
    a = node.attributes
    interleaved = a.get_int("interleaved", 0)
    rot = a.get_int("rotary_embedding_dim", 0)
    num_heads = a.get_int("num_heads", 0)
    if x.shape is None or len(x.shape) not in (3, 4) or not isinstance(x.shape[-1], int):
        raise OptcError(f"{where}: input needs a known rank (3 or 4) and last dimension")
    t = tape.Tape()
    x4 = x
    if len(x.shape) == 3:  # [B,S,H*D] -> [B,S,H,D]
        if not num_heads:
            raise OptcError(f"{where}: 3-D input without num_heads")
        x4 = t.op("Reshape", [x, ints(t, 0, 0, num_heads, x.shape[-1] // num_heads)])
        head_axis_for_cos = 2
        d = x.shape[-1] // num_heads
    else:  # [B,H,S,D]
        head_axis_for_cos = 1
        d = x.shape[-1]
    rot = rot or d
    if pos is not None:
        cos, sin = t.op("Gather", [cos, pos]), t.op("Gather", [sin, pos])           # [B,S,rot/2]
    cos = t.op("Unsqueeze", [cos, ints(t, head_axis_for_cos)])
    sin = t.op("Unsqueeze", [sin, ints(t, head_axis_for_cos)])
    half = rot // 2
    if interleaved:
        x1 = t.op("Slice", [x4, ints(t, 0), ints(t, rot), ints(t, -1), ints(t, 2)])
        x2 = t.op("Slice", [x4, ints(t, 1), ints(t, rot), ints(t, -1), ints(t, 2)])
    else:
        x1 = t.op("Slice", [x4, ints(t, 0), ints(t, half), ints(t, -1)])
        x2 = t.op("Slice", [x4, ints(t, half), ints(t, rot), ints(t, -1)])
    real = t.op("Sub", [t.op("Mul", [x1, cos]), t.op("Mul", [x2, sin])])
    imag = t.op("Add", [t.op("Mul", [x2, cos]), t.op("Mul", [x1, sin])])
    if interleaved:
        pairs = t.op("Concat", [t.op("Unsqueeze", [real, ints(t, -1)]), t.op("Unsqueeze", [imag, ints(t, -1)])],
                     {"axis": -1})
        rotated = t.op("Reshape", [pairs, t.op("Concat", [t.op("Shape", [real], {"end": -1}), ints(t, rot)], {"axis": 0})])
    else:
        rotated = t.op("Concat", [real, imag], {"axis": -1})
    if rot < d:
        rotated = t.op("Concat", [rotated, t.op("Slice", [x4, ints(t, rot), ints(t, d), ints(t, -1)])], {"axis": -1})
    out = rotated
    if len(x.shape) == 3:
        out = t.op("Reshape", [rotated, ints(t, 0, 0, x.shape[-1])])
    _replace(graph, node, t, [out])


def fold_weight_transposes(model: ir.Model) -> int:
    """Replace Transpose(weight) by a transposed copy of the weight (e.g. a tied LM head reads
    the embedding transposed). The weights reach TVM as function parameters, which constant
    folding cannot see through, so the transpose would otherwise run on every call (4 ms per
    decode step for this model's 4096x256 head)."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or src.const_value is None:
            continue
        perm = node.attributes.get_ints("perm", None)
        array = src.const_value.numpy()
        transposed = np.ascontiguousarray(np.transpose(array, perm))
        name = f"{src.name}.transposed" + ("" if perm is None else "_" + "".join(map(str, perm)))
        existing = model.graph.initializers.get(name)
        if existing is None:
            existing = ir.Value(name=name, shape=ir.Shape(transposed.shape), type=src.type,
                                const_value=ir.tensor(transposed, name=name))
            model.graph.register_initializer(existing)
        ir.convenience.replace_all_uses_with(node.outputs[0], existing, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def legalize(model: ir.Model, info) -> dict[str, int]:
    """Rewrite Attention / RotaryEmbedding (also inside If branches) into primitive ops.
    Returns how many of each were lowered."""
    counts = {op: 0 for op in LEGALIZED}

    def visit(graph: ir.Graph) -> None:
        for node in list(graph):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    visit(attr.value)
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Attention":
                _lower_attention(graph, node, info.num_heads, info.kv_heads)
                counts["Attention"] += 1
            elif node.op_type == "RotaryEmbedding":
                _lower_rotary(graph, node)
                counts["RotaryEmbedding"] += 1
            elif node.op_type == "TopK" and node.attributes.get_int("sorted", 1) == 0:
                # TVM's importer wants sorted output; "unsorted" leaves the order free, so sorted is
                # a valid implementation of it (block-sparse selection does not depend on order)
                node.attributes["sorted"] = ir.AttrInt64("sorted", 1)

    visit(model.graph)
    return counts


def specialize(model: ir.Model, shapes: dict[str, tuple[int, ...]], outputs: list[str],
               branch: str | None = None) -> onnx.ModelProto:
    """A copy of the (legalised) graph with static input shapes, only `outputs` (in that order),
    and everything that depends only on shapes folded away. `branch` ("sparse" / "dense") fixes
    the condition of block-sparse prefill's If nodes, which folding then inlines."""
    import onnxscript.optimizer

    m = copy_model(model)
    for value in m.graph.inputs:
        if value.name not in shapes:
            raise OptcError(f"tvm lowering: no static shape for graph input {value.name!r}")
        value.shape = ir.Shape(shapes[value.name])
    by_name = {o.name: o for o in m.graph.outputs}
    missing = [name for name in outputs if name not in by_name]
    if missing:
        raise OptcError(f"tvm lowering: graph output {missing[0]!r} is missing")
    m.graph.outputs.clear()
    m.graph.outputs.extend(by_name[name] for name in outputs)
    if branch is not None:
        for node in m.graph:
            if node.op_type == "If":
                cond = ir.Value(name=f"{node.name}/fixed_cond", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.BOOL),
                                const_value=ir.tensor(np.array(branch == "sparse")))
                m.graph.register_initializer(cond)
                node.replace_input_with(0, cond)
    # constant folding only (the optimizer's pattern rewrites cost seconds per bucket and buy
    # nothing that TVM's fusion does not); folding also inlines an If with a constant condition
    for _ in range(2):
        if not onnxscript.optimizer.fold_constants(m, onnx_shape_inference=True).modified:
            break
    _drop_zero_pads(m)
    ir.passes.common.RemoveUnusedNodesPass()(m)
    return ir.serde.serialize_model(m)


def _drop_zero_pads(model: ir.Model) -> None:
    """A Pad whose pads are all zero (block-sparse prefill padding a prompt that is already a
    whole number of blocks) is an identity; TVM's importer would emit a TE function for it."""
    for node in list(model.graph):
        if node.op_type != "Pad" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        pads = node.inputs[1].const_value
        if pads is not None and not pads.numpy().any() and len(node.inputs) < 4:
            ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0], replace_graph_outputs=True)
            model.graph.remove(node, safe=True)
