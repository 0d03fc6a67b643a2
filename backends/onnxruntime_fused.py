"""ONNX Runtime's fast decode path: each layer's canonical attention lowered to one
`com.microsoft.GroupQueryAttention` (GQA) that rotates Q and K itself and writes the new keys and
values into the runtime's cache buffer in place.

The canonical form (what the passes see) per layer is

    q, k, v [B, heads, S, D]  ->  RotaryEmbedding(q), RotaryEmbedding(k)
    present = Concat(past, new)  ->  Attention(q_rot, present.key, present.value, mask)

so every decode step re-concatenates the whole cache and runs the attention unfused. GQA takes
the projections in their [B, S, heads * D] layout, a past buffer of fixed capacity that is also
its present output (ONNX Runtime shares them when both are bound to the same memory), the cache
lengths (`seqlens_k`, `total_sequence_length`) and cos/sin tables over all positions. The runtime
binds its own cache buffers (runtime/executors/onnxruntime.py), so a decode step copies nothing
proportional to the context.

The lowering applies to a dense cache the runtime only appends to, float or int8 with static
scales (kv_quantize scales: static: GQA's own int8 cache, its fixed per-channel scales read from
the graph's (de)quantisation): no H2O eviction, KIVI layout or attention outputs (those keep the
generic path, and the compile log says why).

layer_routing wraps a routable layer in an `If` on the runtime's per-layer flag. Its attention is
lowered inside the run branch: ONNX Runtime hands the If's bound output (the cache buffer) to
the branch, so GQA still writes in place; the skip branch passes the past through as the same
buffer (an Identity onto itself copies nothing, measured). With sink_window as well, the runtime
compacts the running layers' buffers only: a skipped layer's cache is never read again.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optc.errors import OptcError
from optc.ir import take_over
from optc.passes.kv_cache.static_int8 import dequantized_past, fake_quant
from optc.runtime.manifest import (ATTENTION_MASK, KEY_POSITION_IDS, LAYERS_RUN_INPUT, LAYOUT_INT8, POLICY_SINK_WINDOW,
                                   POSITION_IDS, PRUNED_FROM_LAYER, is_attention_output, past_name, present_name)

FUSED_OP = "GroupQueryAttention"
SEQLENS_INPUT = "seqlens_k"  # per sequence: tokens in the cache after this step, minus one (int32)
TOTAL_INPUT = "total_sequence_length"  # tokens in the cache after this step (int32 scalar)
ATTENTION_BIAS_INPUT = "optc.gqa.attention_bias"  # sink_window: 0 / -inf per cached row [1, 1, S, total]
# token_dropping (mode prefill): tokens in the cache of the layers from pruned_from_layer on (int64 [1])
PRUNED_PAST_INPUT = "optc.gqa.pruned_past_length"
# token_dropping + sink_window: the pruned layers' bias row, 0 / -inf per row of their own buffer
# [1, 1, 1, >= their total] (the hidden rows are the same for every query row of a step)
PRUNED_BIAS_INPUT = "optc.gqa.pruned_attention_bias"
# positions the cos/sin tables cover: a few times the trained context (the runtime warns past
# the context but runs; past the tables it refuses), bounded so a table stays small
MIN_TABLE, MAX_TABLE = 4096, 32768


def _perm(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("perm")
    return list(attr.value) if attr is not None else None


def why_not(model: ir.Model, info, kv_cache: dict | None, target: str, prefill: dict | None = None) -> str | None:
    """Why the fused path does not apply to this artifact (None: it does)."""
    if prefill:
        return "block-sparse prefill selects key blocks from the cache itself"
    if target != "cpu":
        return f"target {target} (the in-place cache binding is implemented for the CPU)"
    kv = kv_cache or {}
    if kv.get("layout", "float") not in ("float", LAYOUT_INT8):
        # GQA's quantised cache (ORT 1.32) takes fixed per-tensor / per-channel scales, not KIVI's
        # per-group scales computed as tokens arrive: that is kv_quantize scales: static
        return (f"the {kv.get('layout')} cache layout is stored by the runtime, not by GQA (its int8 cache takes "
                f"fixed scales: kv_quantize scales: static)")
    policy = kv.get("policy")
    if policy and policy.get("kind") != POLICY_SINK_WINDOW:
        return f"the {policy.get('kind')} cache policy rewrites the cache between steps"
    if any(is_attention_output(v.name) for v in model.graph.outputs):
        return "a cache policy reads the attention probabilities"
    if info.head_dim % 16:
        return f"head_dim {info.head_dim} (ONNX Runtime's CPU GroupQueryAttention takes multiples of 16)"
    if POSITION_IDS not in {v.name for v in model.graph.inputs}:
        return "the graph has no position_ids input to build the rotary tables from"
    for layer in info.layers:
        if (why := _layer(model, layer.index)[1]) is not None:
            return f"layer {layer.index}: {why}"
    if policy:
        return _why_not_window(model, info, policy)
    return None


def _why_not_window(model: ir.Model, info, policy: dict) -> str | None:
    """sink_window on the fused path needs rotary tables that are plain rotations (angle = position
    x a constant per pair), so the runtime can move a rotated key to a new slot; and a buffer of
    sinks + window + slack slots within the tables."""
    q_rope = _layer(model, info.layers[0].index)[0][0]
    inv_freq = _inv_freq(model, q_rope, _window_positions(info, policy))
    if inv_freq is None:
        return ("sink_window: the rotary tables are not plain rotations (position x a fixed angle), so rotated keys "
                "cannot be moved to new slots")
    return None


def _window_positions(info, policy: dict) -> int:
    """Slots a fused sink_window buffer may use (the runtime's capacity stays within them)."""
    return max(MIN_TABLE, 2 * (policy["sinks"] + policy["window"]), info.context or 0)


def _inv_freq(model: ir.Model, q_rope: ir.Node, positions: int) -> list[float] | None:
    """The rotary angle per position of each rotated pair, read from the graph's own tables, when
    cos/sin at every position p < `positions` are cos(p * angle) / sin(p * angle); else None. (The
    tolerance, 1e-5 + 4e-7 p, allows for the graph's float32 product of position and angle.)"""
    cos, sin = (_rotary_table(model, q_rope.inputs[slot], positions).astype(np.float64) for slot in (1, 2))
    angle = np.arctan2(sin[1], cos[1])
    p = np.arange(positions, dtype=np.float64)[:, None]
    err = np.maximum(np.abs(np.cos(p * angle) - cos), np.abs(np.sin(p * angle) - sin))
    if (err > 1e-5 + 4e-7 * p).any():
        return None
    return [float(a) for a in angle]


def _same(a: ir.Value, b: ir.Value) -> bool:
    """The same tensor, or the same element-wise op of the same input (dynamo writes a Cos and a
    Sin for each of q and k)."""
    if a is b:
        return True
    pa, pb = a.producer(), b.producer()
    return (pa is not None and pb is not None and pa.op_type == pb.op_type and pa.op_type in ("Cos", "Sin")
            and pa.inputs[0] is pb.inputs[0])


def _layer(model: ir.Model, i: int):
    """The canonical ops of layer `i` ((q_rope, k_rope, attention, present key concat, present
    value concat), None), or (None, why they are not in the form the lowering takes)."""
    outputs = {v.name: v for v in model.graph.outputs}
    pk, pv = outputs.get(present_name(i, "key")), outputs.get(present_name(i, "value"))
    if pk is None or pv is None:
        return None, "no present outputs"
    pk, pv = _run_branch_value(pk), _run_branch_value(pv)
    catk, catv = pk.producer(), pv.producer()
    if catk is None or catk.op_type != "Concat" or catv is None or catv.op_type != "Concat":
        return None, "the present keys/values are not Concat(past, new)"
    k_rope = _stored(catk)[1].producer()
    keys, rotate_all = pk, None
    if KEY_POSITION_IDS in {v.name for v in model.graph.inputs}:
        # sink_window: the cache holds keys before RoPE and one RotaryEmbedding rotates the whole
        # present key tensor by slot; GQA rotates each new key once, at its slot, instead
        rotate_all = [u for u, slot in pk.uses() if u.op_type == "RotaryEmbedding" and slot == 0]
        if len(rotate_all) != 1:
            return None, "sink_window: no single RotaryEmbedding rotates the cached keys"
        rotate_all = rotate_all[0]
        keys, k_rope = rotate_all.outputs[0], rotate_all
    attn = [u for u, slot in keys.uses() if u.op_type == "Attention" and slot == 1]
    if len(attn) != 1:
        return None, "no single Attention op reads the present keys"
    attn = attn[0]
    others = {u.op_type for v in (pk, pv) for u, _ in v.uses() if u is not attn and u is not rotate_all}
    if others:  # e.g. block_sparse's prefill branch gathers key blocks from the cache
        return None, f"the cache is read by more than one attention ({', '.join(sorted(others))})"
    q_rope = attn.inputs[0].producer()
    if attn.inputs[2] is not pv:
        return None, "the Attention op does not read the present values"
    for name, rope in (("query", q_rope), ("key", k_rope)):
        if rope is None or rope.op_type != "RotaryEmbedding":
            return None, f"the {name} is not rotated by a RotaryEmbedding op"
        if rope.attributes.get_int("interleaved", 0) or rope.attributes.get_int("rotary_embedding_dim", 0):
            return None, "interleaved or partial rotary (GQA rotates the whole head, half-split)"
        if len(rope.inputs) > 3 and rope.inputs[3] is not None:
            return None, "the RotaryEmbedding takes its own position ids"
    if rotate_all is not None:
        # (its cos/sin are a copy of the query's subgraph fed from the key positions)
        def attrs(node):
            return {k: a.value for k, a in node.attributes.items() if k != "num_heads"}

        if attrs(rotate_all) != attrs(q_rope):
            return None, "sink_window: the cached keys are rotated unlike the query"
    elif not (_same(q_rope.inputs[1], k_rope.inputs[1]) and _same(q_rope.inputs[2], k_rope.inputs[2])):
        return None, "query and key are rotated with different cos/sin tables"
    if attn.attributes.get_float("softcap", 0.0) or attn.attributes.get_int("qk_matmul_output_mode", 0):
        return None, "the Attention op has a softcap or extra outputs"
    if any(len(o.uses()) or o in model.graph.outputs for o in attn.outputs[1:] if o is not None):
        return None, "the Attention op's extra outputs are used"
    return (q_rope, k_rope, attn, catk, catv), None


def _stored(concat: ir.Node) -> tuple[ir.Value, ir.Value, np.ndarray | None]:
    """A present Concat's (cache input, the step's new value, the static int8 scale or None): the
    Concat's own inputs, or, for kv_quantize scales: static, what its int8 (de)quantisation reads."""
    past, new = concat.inputs[0], concat.inputs[1]
    cached, read = dequantized_past(past), fake_quant(new)
    if cached is not None and read is not None:
        return cached[0], read[0], cached[1]
    return past, new, None


def _routing_if(value: ir.Value) -> ir.Node | None:
    """The layer_routing If that outputs `value` (None: another producer)."""
    node = value.producer()
    if node is None or node.op_type != "If" or node.domain != "":
        return None
    flag = node.inputs[0].producer()  # Gather(optc.layers_run, i)
    if flag is None or flag.op_type != "Gather" or flag.inputs[0].name != LAYERS_RUN_INPUT:
        return None
    return node


def _run_branch_value(value: ir.Value) -> ir.Value:
    """A routed layer's present output is an If's: the value its run branch outputs there (where
    the layer's ops are); any other value as it is."""
    node = _routing_if(value)
    if node is None:
        return value
    return node.attributes["then_branch"].as_graph().outputs[list(node.outputs).index(value)]


def _drop_unused_if_outputs(model: ir.Model, node: ir.Node) -> ir.Node:
    """A routing If without the outputs nothing reads any more (the generic path's new keys and
    values, which the fused path does not return): a new If whose branches output the rest, so
    that what computed only those is dead in both branches."""
    keep = [j for j, v in enumerate(node.outputs) if v.uses() or v.is_graph_output()]
    if len(keep) == len(node.outputs):
        return node
    branches = {}
    for key in ("then_branch", "else_branch"):
        branch = node.attributes[key].as_graph()
        kept = [branch.outputs[j] for j in keep]
        branch.outputs.clear()
        branch.outputs.extend(kept)
        branches[key] = ir.AttrGraph(key, branch)
    new = ir.Node("", "If", list(node.inputs), attributes=list(branches.values()), num_outputs=len(keep),
                  name=node.name)
    node.graph.insert_before(node, new)
    for j, out in zip(keep, new.outputs):
        take_over(node.outputs[j], out)
    node.graph.remove(node, safe=True)
    return new


def _rotary_table(model: ir.Model, value: ir.Value, positions: int) -> np.ndarray:
    """Evaluate `value` (cos or sin per position, [batch, seq, D/2]) for positions 0..positions-1
    by running the ops it is computed with, so that any exporter's rotary arithmetic gives its
    own table. It must depend on position_ids alone."""
    import onnx
    import onnxruntime as ort

    cone, todo, seen = set(), [value], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input() and v.name != POSITION_IDS:
            raise ValueError(f"the rotary table depends on the graph input {v.name!r}")
        if (node := v.producer()) is not None:
            cone.add(id(node))
            todo.extend(x for x in node.inputs if x is not None)
    proto = ir.to_proto(model)
    nodes = [n for n, node in zip(proto.graph.node, model.graph) if id(node) in cone]
    used = {name for n in nodes for name in n.input}
    graph = onnx.helper.make_graph(
        nodes, "rotary_table", [i for i in proto.graph.input if i.name == POSITION_IDS],
        [onnx.helper.make_tensor_value_info(value.name, onnx.TensorProto.FLOAT, None)],
        [t for t in proto.graph.initializer if t.name in used])
    small = onnx.helper.make_model(graph, opset_imports=proto.opset_import)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(small.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = session.run(None, {POSITION_IDS: np.arange(positions, dtype=np.int64).reshape(1, positions)})[0]
    return np.ascontiguousarray(out.reshape(positions, -1), dtype=np.float32)


def _to_bsh(graph: ir.Graph, v4: ir.Value, before: ir.Node) -> ir.Value:
    """[B, heads, S, D] -> [B, S, heads * D]: the Reshape input the exporter transposed from, or
    a Transpose + Reshape inserted here."""
    node = v4.producer()
    if node is not None and node.op_type == "Transpose" and _perm(node) == [0, 2, 1, 3]:
        src = node.inputs[0].producer()
        if src is not None and src.op_type == "Reshape" and src.inputs[0].shape is not None \
                and len(src.inputs[0].shape) == 3:
            return src.inputs[0]
    t = ir.node("Transpose", [v4], attributes={"perm": [0, 2, 1, 3]})
    shape = ir.Value(name=f"{v4.name}.bsh_shape", const_value=ir.tensor(np.array([0, 0, -1], np.int64)))
    graph.register_initializer(shape)
    r = ir.node("Reshape", [t.outputs[0], shape])
    before.graph.insert_before(before, [t, r])  # (a routed layer's nodes are in its If's run branch)
    return r.outputs[0]


def _packed_qkv(graph: ir.Graph, q3: ir.Value, k3: ir.Value, v3: ir.Value, before: ir.Node) -> ir.Value | None:
    """Q, K and V projected from the same input by three MatMuls with constant weights -> one
    MatMul with the weights side by side (what GQA takes as a packed query; one weight read
    per step instead of three). Three MatMulNBits (weight_quant) with the same quantisation are
    packed alike: their blocks run along K, so the output columns' blocks, scales and zero points
    just stack along N (the same numbers as the three ops). None where the projections are not
    of either form (biases, different quantisation)."""
    return _packed_projections(graph, [v.producer() for v in (q3, k3, v3)], before)


_PACKED = {2: "gate_up_packed", 3: "qkv_packed"}  # (the packed weights' and nodes' name suffix)


def _out_columns(node: ir.Node) -> int:
    """Output columns of a constant-weight MatMul / MatMulNBits (packable: _packed_projections)."""
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("N", 0)
    return node.inputs[1].const_value.shape[1]


def pack_shared_input_pairs(model: ir.Model) -> int:
    """Two constant-weight projections of the same input (a SwiGLU MLP's gate and up) -> one
    MatMul (or MatMulNBits) with the weights side by side and a Split of its output: one weight
    stream and one GEMV per step instead of two. In the main graph and routed layers' If
    branches; run after the dead projections are removed (Q/K/V are packed already). Returns how
    many pairs were packed."""
    count = 0
    for graph in [model.graph, *_branches(model.graph)]:
        by_input: dict[ir.Value, list[ir.Node]] = {}
        for node in graph:
            if (node.domain, node.op_type) in (("", "MatMul"), ("com.microsoft", "MatMulNBits")) \
                    and node.inputs[0] is not None:
                by_input.setdefault(node.inputs[0], []).append(node)
        for pair in by_input.values():
            nodes = _gate_first(pair) if len(pair) == 2 else None
            if nodes is None:
                continue
            packed = _packed_projections(model.graph, nodes, nodes[0])  # (constants in the main graph)
            if packed is None:
                continue
            sizes = [_out_columns(n) for n in nodes]
            split_sizes = _const(model.graph, f"optc.gate_up.split_sizes.{sizes[0]}_{sizes[1]}", sizes)
            split = ir.node("Split", [packed, split_sizes], attributes={"axis": -1}, num_outputs=2,
                            name=f"{nodes[0].name}.packed_split")
            packed.producer().graph.insert_after(packed.producer(), split)
            for node, out in zip(nodes, split.outputs):
                ir.convenience.replace_all_uses_with(node.outputs[0], out)
                out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
            count += 1
    return count


def _gate_first(nodes: list[ir.Node]) -> list[ir.Node] | None:
    """[gate, up] when the two projections' outputs form a gated MLP: the up projection multiplied
    by an activation of the gate (a Mul reading `up` and a value a few element-wise ops from
    `gate`); else None (e.g. token_dropping's score reads a layer's query and key projections)."""
    for gate, up in (nodes, nodes[::-1]):
        for use in up.outputs[0].uses():
            if use.node.op_type != "Mul" or len(use.node.inputs) != 2:
                continue
            other = use.node.inputs[1 - use.idx]
            for _ in range(4):  # (SiLU: Mul(g, Sigmoid(g)); GELU: a few element-wise ops)
                if other is gate.outputs[0]:
                    return [gate, up]
                node = other.producer() if other is not None else None
                if node is None or not node.inputs:
                    break
                other = node.inputs[0]
    return None


def _packed_projections(graph: ir.Graph, nodes: list[ir.Node | None], before: ir.Node) -> ir.Value | None:
    """Projections of one input by constant-weight MatMuls (or MatMulNBits of the same
    quantisation) -> one with the weights side by side, inserted before `before`; None where they
    are not all of one such form."""
    if any(n is None for n in nodes) or len({(n.domain, n.op_type) for n in nodes}) != 1:
        return None
    x = nodes[0].inputs[0]
    if any(n.inputs[0] is not x for n in nodes):
        return None
    if (nodes[0].domain, nodes[0].op_type) == ("com.microsoft", "MatMulNBits"):
        return _packed_nbits(graph, nodes, before)
    if (nodes[0].domain, nodes[0].op_type) != ("", "MatMul") or any(len(n.inputs) != 2 for n in nodes):
        return None
    weights = [n.inputs[1].const_value for n in nodes]
    if any(w is None or len(w.shape) != 2 for w in weights):
        return None
    arrays = [w.numpy() for w in weights]
    if len({a.shape[0] for a in arrays}) != 1 or len({a.dtype for a in arrays}) != 1:
        return None
    packed_w = ir.Value(name=f"{nodes[0].inputs[1].name}.{_PACKED[len(nodes)]}",
                        const_value=ir.tensor(np.ascontiguousarray(np.concatenate(arrays, axis=1))))
    graph.register_initializer(packed_w)
    matmul = ir.node("MatMul", [x, packed_w], name=f"{nodes[0].name}.{_PACKED[len(nodes)]}")
    before.graph.insert_before(before, matmul)
    return matmul.outputs[0]


def _packed_nbits(graph: ir.Graph, nodes: list[ir.Node], before: ir.Node) -> ir.Value | None:
    """_packed_qkv for three MatMulNBits (A, B [N, blocks, blob], scales [N, blocks][, zero points
    [N, packed blocks]]) with equal K, bits, block size and accuracy level: one with N summed."""
    attrs = [{k: n.attributes.get_int(k, -1) for k in ("K", "bits", "block_size", "accuracy_level")} for n in nodes]
    if any(a != attrs[0] for a in attrs) or len({len(n.inputs) for n in nodes}) != 1 or len(nodes[0].inputs) not in (3, 4):
        return None
    parts = [[v.const_value for v in n.inputs[1:]] for n in nodes]
    if any(c is None for cs in parts for c in cs):
        return None
    stacked = []
    for slot, tensors in enumerate(zip(*parts)):
        arrays = [t.numpy() for t in tensors]
        expect = 3 if slot == 0 else 2  # (2-D scales / zero points: rows are output columns)
        if any(a.ndim != expect for a in arrays) or len({(a.shape[1:], a.dtype) for a in arrays}) != 1:
            return None
        name = f"{nodes[0].inputs[1 + slot].name}.{_PACKED[len(nodes)]}"
        v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(np.concatenate(arrays, axis=0)), name=name))
        graph.register_initializer(v)
        stacked.append(v)
    n_total = sum(n.attributes.get_int("N", 0) for n in nodes)
    fused = ir.node("MatMulNBits", [nodes[0].inputs[0], *stacked], domain="com.microsoft",
                    attributes={**attrs[0], "N": n_total}, name=f"{nodes[0].name}.{_PACKED[len(nodes)]}")
    before.graph.insert_before(before, fused)
    return fused.outputs[0]


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """RMSNormalization(Add(residual, x)) whose sum is also the next residual ->
    com.microsoft.SkipSimplifiedLayerNormalization (one pass over the hidden state; its fourth
    output is the sum), in the main graph and in routed layers' If branches. Returns how many
    were fused."""
    return sum(_fuse_skip_rms_norm(g) for g in [model.graph, *_branches(model.graph)])


def _branches(graph: ir.Graph) -> list[ir.Graph]:
    """The If branches of `graph`'s nodes (layer_routing's: one level deep)."""
    return [a.as_graph() for node in graph if node.op_type == "If" for a in node.attributes.values()
            if a.type == ir.AttributeType.GRAPH]


def _fuse_skip_rms_norm(graph: ir.Graph) -> int:
    count = 0
    for norm in list(graph):
        if norm.op_type != "RMSNormalization" or norm.domain != "" or norm.attributes.get_int("axis", -1) != -1:
            continue
        add = norm.inputs[0].producer()
        # (an Add in another scope: a routed layer's first norm reads the previous layer's sum)
        if add is None or add.op_type != "Add" or add.graph is not graph or add.outputs[0] in graph.outputs:
            continue
        a, b = add.inputs
        if a.shape is None or b.shape is None or len(a.shape) != 3 or a.shape != b.shape:
            continue
        fused = ir.node("SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]],
                        attributes={"epsilon": norm.attributes.get_float("epsilon", 1e-5)},
                        domain="com.microsoft", num_outputs=4, name=f"{norm.name}.skip_fused")
        graph.insert_before(norm, fused)
        ir.convenience.replace_all_uses_with(norm.outputs[0], fused.outputs[0])
        ir.convenience.replace_all_uses_with(add.outputs[0], fused.outputs[3])
        fused.outputs[0].shape, fused.outputs[0].type = norm.outputs[0].shape, norm.outputs[0].type
        fused.outputs[3].shape, fused.outputs[3].type = add.outputs[0].shape, add.outputs[0].type
        count += 1
    return count


def _replace_attention(graph: ir.Graph, info, index: int, attn: ir.Node, catk: ir.Node, catv: ir.Node,
                       gqa: ir.Node) -> None:
    """GQA's outputs take the canonical Attention's and present Concats' places."""
    out, new_k, new_v = gqa.outputs
    # GQA's output is [B, S, heads * D]; the canonical Attention's [B, heads, S, D]
    users = attn.outputs[0].uses()
    merged = None
    if len(users) == 1 and users[0][0].op_type == "Transpose" and _perm(users[0][0]) == [0, 2, 1, 3]:
        after = users[0][0].outputs[0].uses()
        if len(after) == 1 and after[0][0].op_type == "Reshape":
            merged = after[0][0].outputs[0]
    if merged is not None:
        ir.convenience.replace_all_uses_with(merged, out)
    else:
        shape = ir.Value(name=f"optc.gqa.bhsd_shape.{index}",
                         const_value=ir.tensor(np.array([0, 0, info.num_heads, info.head_dim], np.int64)))
        graph.register_initializer(shape)
        r = ir.node("Reshape", [out, shape])
        t = ir.node("Transpose", [r.outputs[0]], attributes={"perm": [0, 2, 1, 3]})
        attn.graph.insert_before(attn, [r, t])
        ir.convenience.replace_all_uses_with(attn.outputs[0], t.outputs[0])
    for old, new in ((catk.outputs[0], new_k), (catv.outputs[0], new_v)):
        take_over(old, new)  # the present key/value output, by the manifest's name


class _PrunedLayers:
    """token_dropping (mode prefill) on the fused path. The layers from `start` on cache only the
    prompt tokens the graph kept, so their GQA gets lengths of its own, computed in the graph from
    an input that holds their cache length (PRUNED_PAST_INPUT) and the step's kept-token count.
    Their rotary stays the graph's RotaryEmbedding (the kept tokens keep their original
    positions; ONNX Runtime's CPU GQA ignores position_ids in a first prompt and rotates by slot,
    measured), so their GQA takes rotated Q and K (do_rotary 0). The runtime's buffers are
    capacity-sized, so the graph's other reads of these layers' cache (the dropping's "is the cache
    empty" Shape, the score's keys) read the valid rows through that input too."""

    def __init__(self, model: ir.Model, start: int, windowed: bool = False):
        self.start = start
        self.past = ir.Value(name=PRUNED_PAST_INPUT, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
        model.graph.inputs.append(self.past)
        # sink_window: their bias row (their buffer's hidden rows are not the early layers')
        self.bias_row = None
        if windowed:
            self.bias_row = ir.Value(name=PRUNED_BIAS_INPUT, shape=ir.Shape([1, 1, 1, "pruned_bias_rows"]),
                                     type=ir.TensorType(ir.DataType.FLOAT))
            model.graph.inputs.append(self.bias_row)
        # (seqlens_k [1], total) as int32, per scope: the main graph, or a routed layer's If branch
        self.lengths: dict[int, tuple[ir.Value, ir.Value]] = {}
        self._total64: dict[int, ir.Value] = {}  # the same total as int64 [1], per scope
        self._biases: dict[int, ir.Value] = {}

    def bias(self, graph: ir.Graph, q3: ir.Value, before: ir.Node) -> ir.Value:
        """sink_window: the pruned layers' attention bias [1, 1, S, total], their bias row cut to
        their total and repeated for the step's S query rows (one bias per scope)."""
        scope = id(before.graph)
        if scope not in self._biases:
            self._lengths(graph, q3, before)
            total = self._total64[scope]
            zero, axis, one = (_const(graph, f"optc.gqa.pruned.{n}", [v]) for n, v in (("zero", 0), ("bias_axis", 3),
                                                                                         ("one", 1)))
            row = ir.node("Slice", [self.bias_row, zero, total, axis])
            rows = ir.node("Shape", [q3], attributes={"start": 1, "end": 2})
            shape = ir.node("Concat", [one, one, rows.outputs[0], total], attributes={"axis": 0})
            full = ir.node("Expand", [row.outputs[0], shape.outputs[0]])
            nodes = [row, rows, shape, full]
            for j, node in enumerate(nodes):
                node.outputs[0].name = f"optc.gqa.pruned.bias.{len(self._biases)}.{j}"
            before.graph.insert_before(before, nodes)
            self._biases[scope] = full.outputs[0]
        return self._biases[scope]

    def _lengths(self, graph: ir.Graph, q3: ir.Value, before: ir.Node) -> tuple[ir.Value, ir.Value]:
        scope = id(before.graph)
        if scope not in self.lengths:
            one = _const(graph, "optc.gqa.pruned.one", [1])
            new = ir.node("Shape", [q3], attributes={"start": 1, "end": 2})  # this step's kept tokens
            total = ir.node("Add", [self.past, new.outputs[0]])
            seqlens = ir.node("Cast", [ir.node("Sub", [total.outputs[0], one]).outputs[0]],
                              attributes={"to": ir.DataType.INT32})
            total32 = ir.node("Cast", [ir.node("Squeeze", [total.outputs[0]]).outputs[0]],
                              attributes={"to": ir.DataType.INT32})
            nodes = [new, total, seqlens.inputs[0].producer(), seqlens, total32.inputs[0].producer(), total32]
            for j, node in enumerate(nodes):
                node.outputs[0].name = f"optc.gqa.pruned.lengths.{len(self.lengths)}.{j}"
            before.graph.insert_before(before, nodes)
            self.lengths[scope] = (seqlens.outputs[0], total32.outputs[0])
            self._total64[scope] = total.outputs[0]
        return self.lengths[scope]

    def lower(self, graph: ir.Graph, info, index: int, attn: ir.Node, catk: ir.Node, catv: ir.Node) -> None:
        q3, k3, v3 = (_to_bsh(graph, v, attn) for v in (attn.inputs[0], catk.inputs[1], catv.inputs[1]))
        seqlens, total = self._lengths(graph, q3, attn)
        scale = attn.attributes.get_float("scale", info.head_dim ** -0.5)
        gqa = ir.node(FUSED_OP, [q3, k3, v3, catk.inputs[0], catv.inputs[0], seqlens, total],
                      attributes={"num_heads": info.num_heads, "kv_num_heads": info.kv_heads, "do_rotary": 0,
                                  "scale": float(scale)},
                      domain="com.microsoft", num_outputs=3, name=f"optc_gqa_{index}")
        attn.graph.insert_before(attn, gqa)
        _replace_attention(graph, info, index, attn, catk, catv, gqa)

    def finish(self, graph: ir.Graph, n_layers: int) -> None:
        """The pruned layers' cache read other than by their GQA: a Shape of the cached tokens reads
        the input instead; a Concat with the step's keys (the score's) reads the valid rows."""
        inputs = {v.name: v for v in graph.inputs}
        for i in range(self.start, n_layers):
            for kind in ("key", "value"):
                past = inputs[past_name(i, kind)]
                for use in list(past.uses()):
                    node = use.node
                    if node.op_type == "Shape" and node.attributes.get_int("start", 0) == 2 \
                            and node.attributes.get_int("end", -1) == 3:
                        ir.convenience.replace_all_uses_with(node.outputs[0], self.past)
                    elif node.op_type == "Concat" and any(o.uses() for o in node.outputs):
                        rows = ir.node("Slice", [past, _const(graph, "optc.gqa.pruned.zero", [0]), self.past,
                                                 _const(graph, "optc.gqa.pruned.axis", [2])])
                        rows.outputs[0].name = f"{past.name}.valid_rows"
                        node.graph.insert_before(node, rows)
                        node.replace_input_with(use.idx, rows.outputs[0])


def _const(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    """An int64 initializer of the main graph (the same one for every caller of the name)."""
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(np.array(values, np.int64))))
    return graph.initializers[name]


def _check_cache_reads(graph: ir.Graph) -> None:
    """After the lowering, the cache buffers (capacity-sized) are read only by GQA and by the
    valid-row Slices: anything else would see rows that hold nothing."""
    for v in graph.inputs:
        if v.name.startswith("past_key_values."):
            for use in v.uses():
                node = use.node
                if node.op_type == "Shape":  # (the batch, head and head-dim axes are the same in a buffer)
                    start, end = (node.attributes.get_int(k, d) for k, d in (("start", 0), ("end", 4)))
                    if 2 not in range(4)[start:end]:
                        continue
                elif node.op_type in (FUSED_OP, "Slice", "If", "Identity"):
                    continue
                raise OptcError(f"onnxruntime: the fused lowering left {node.op_type} node {node.name!r} reading "
                                f"the cached tokens of the buffer {v.name!r} (an optc bug: compile with "
                                f"--no-fused-attention, and report it)")


def lower(model: ir.Model, info, context: int | None, log=print, kv_cache: dict | None = None) -> dict:
    """Rewrite every layer to GQA in place; returns the manifest's `kv_in_place` section.

    With a sink_window policy the keys are rotated by GQA at their slot in the runtime's bounded
    buffer (its default: the row it writes), and an additive attention bias input lets the
    runtime hide the rows the window has left until it compacts the buffer (runtime/cache/window.py)."""
    from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass

    graph = model.graph
    policy = (kv_cache or {}).get("policy")
    positions = min(MAX_TABLE, max(MIN_TABLE, 4 * (context or 0)))
    inv_freq = bias = None
    if policy:
        positions = _window_positions(info, policy)
        inv_freq = _inv_freq(model, _layer(model, info.layers[0].index)[0][0], positions)
        bias = ir.Value(name=ATTENTION_BIAS_INPUT, shape=ir.Shape(["batch", 1, "sequence_length", "total_sequence_length"]),
                        type=ir.TensorType(ir.DataType.FLOAT))
    seqlens = ir.Value(name=SEQLENS_INPUT, shape=ir.Shape(["batch"]), type=ir.TensorType(ir.DataType.INT32))
    total = ir.Value(name=TOTAL_INPUT, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT32))
    graph.inputs.extend([seqlens, total] + ([bias] if bias is not None else []))
    pruned = (kv_cache or {}).get(PRUNED_FROM_LAYER)
    late = _PrunedLayers(model, pruned, windowed=bias is not None) if pruned is not None else None
    tables: dict[int, tuple[ir.Value, ir.Value]] = {}
    packed_layers = quantized_layers = 0
    for layer in info.layers:
        (q_rope, k_rope, attn, catk, catv), _ = _layer(model, layer.index)
        in_pruned = late is not None and layer.index >= pruned
        if in_pruned and bias is None:
            late.lower(graph, info, layer.index, attn, catk, catv)
            continue
        angle = q_rope.inputs[1].producer()  # tables of the same angles are one table, whatever Cos node
        key = id(angle.inputs[0]) if angle is not None and angle.op_type == "Cos" else id(q_rope.inputs[1])
        if in_pruned:
            # token_dropping + sink_window: these layers are numbered by the slots of their own
            # cache, which is where GQA rotates (the row it writes); their rotary is the same
            # function of the slot as layer 0's (sink_window cloned it), so they share its table
            key = next(iter(tables))
        if key not in tables:
            cos, sin = (ir.Value(name=f"optc.gqa.{kind}_cache.{len(tables)}",
                                 const_value=ir.tensor(_rotary_table(model, q_rope.inputs[slot], positions)))
                        for kind, slot in (("cos", 1), ("sin", 2)))
            graph.register_initializer(cos)
            graph.register_initializer(sin)
            tables[key] = (cos, sin)
        cos, sin = tables[key]
        scale = attn.attributes.get_float("scale", info.head_dim ** -0.5)
        # (sink_window: the cache's Concat takes the key before RoPE; k_rope rotates the whole cache)
        past_k, stored_k, k_scale = _stored(catk)
        past_v, stored_v, v_scale = _stored(catv)
        new_key = stored_k if k_rope.inputs[0] is catk.outputs[0] else k_rope.inputs[0]
        q3, k3, v3 = (_to_bsh(graph, v, attn) for v in (q_rope.inputs[0], new_key, stored_v))
        packed = _packed_qkv(graph, q3, k3, v3, attn)
        qkv = [packed, None, None] if packed is not None else [q3, k3, v3]
        packed_layers += packed is not None
        lengths, layer_bias = (seqlens, total), bias
        if in_pruned:
            lengths, layer_bias = late._lengths(graph, q3, attn), late.bias(graph, q3, attn)
        extra = [None, layer_bias] if bias is not None else []  # (position_ids: GQA's default, the row it writes)
        attributes = {"num_heads": info.num_heads, "kv_num_heads": info.kv_heads, "do_rotary": 1,
                      "rotary_interleaved": 0, "scale": float(scale)}
        if k_scale is not None:  # kv_quantize scales: static: GQA's int8 cache, its fixed per-channel scales
            scales = []
            for kind, arr in (("k", k_scale), ("v", v_scale)):
                value = ir.Value(name=f"optc.gqa.{kind}_scale.{layer.index}", const_value=ir.tensor(arr))
                graph.register_initializer(value)
                scales.append(value)
            extra = [*(extra or [None, None]), None, *scales]  # (slot 11, between the bias and the scales)
            attributes.update(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
            quantized_layers += 1
        gqa = ir.node(FUSED_OP, [*qkv, past_k, past_v, *lengths, cos, sin, *extra], attributes=attributes,
                      domain="com.microsoft", num_outputs=3, name=f"optc_gqa_{layer.index}")
        attn.graph.insert_before(attn, gqa)  # (constants stay in the main graph; a routed layer's ops in its If)
        _replace_attention(graph, info, layer.index, attn, catk, catv, gqa)
        if k_scale is not None:  # (the present outputs took the float Concats' types: they are the int8 buffers)
            for present in gqa.outputs[1:]:
                present.type = ir.TensorType(ir.DataType.INT8)
    if late is not None:
        late.finish(graph, len(info.layers))
    routed = [n for n in graph if n.outputs and _routing_if(n.outputs[0]) is n]
    for node in routed:  # the generic path's new-key/value outputs: read by nobody now
        _drop_unused_if_outputs(model, node)
    model.opset_imports.setdefault("com.microsoft", 1)
    skip_norms = fuse_skip_rms_norm(model)
    # the Concats, Attentions, rotary and mask arithmetic, the unpacked projections are dead now
    RemoveUnusedNodesPass()(model)
    pairs = pack_shared_input_pairs(model)  # (after: the unpacked Q/K/V no longer share an input)
    RemoveUnusedNodesPass()(model)
    _check_cache_reads(graph)
    if routed:  # values made inside a branch were named by the branch's own counter (val_N): unique again
        NameFixPass()(model)
    # and so are the mask and position inputs (GQA takes lengths): one less thing to feed a step
    for v in [v for v in graph.inputs if v.name in (POSITION_IDS, ATTENTION_MASK, KEY_POSITION_IDS) and not v.uses()]:
        graph.inputs.remove(v)
    log(f"onnxruntime: {len(info.layers)} attention layer(s) lowered to com.microsoft.{FUSED_OP} (rotary inside, "
        f"cache written in place; rotary tables for {positions} positions); Q/K/V packed into one MatMul in "
        f"{packed_layers}, {pairs} pair(s) of projections of one input packed (gate/up), {skip_norms} residual "
        f"Add + RMSNorm fused")
    if quantized_layers:
        log(f"onnxruntime: kv_quantize scales: static on the fused path: GQA keeps the int8 cache in place "
            f"(kv_cache_bit_width 8, fixed per-channel scales) in {quantized_layers} layer(s)")
    if routed:
        log(f"onnxruntime: layer_routing on the fused path: {len(routed)} routed layer(s) run GQA inside their If "
            f"(the cache buffer is the If's bound output, written in place; a skipped layer passes it through)")
    section = {"op": f"com.microsoft.{FUSED_OP}", "seqlens_input": SEQLENS_INPUT, "total_input": TOTAL_INPUT,
               "max_positions": positions,
               "cache_inputs": [[past_name(i, "key"), past_name(i, "value")] for i in range(len(info.layers))]}
    if late is not None:
        rotary = ("rotated by GQA at the slots of their own buffer, which the runtime compacts by their own length and "
                  "hides with their own attention bias" if bias is not None
                  else "with the graph's rotary at the kept tokens' positions")
        log(f"onnxruntime: token_dropping on the fused path: layers {pruned}-{len(info.layers) - 1} run GQA on their "
            f"own cache length (the kept prompt tokens), {rotary}")
        section["pruned_past_input"] = PRUNED_PAST_INPUT
        if bias is not None:
            section["pruned_attention_bias_input"] = PRUNED_BIAS_INPUT
    if bias is not None:
        log(f"onnxruntime: sink_window on the fused path: keys rotated once at their slot in a bounded buffer; the "
            f"runtime hides rows that left the window (attention bias) and compacts the buffer in batches, moving "
            f"the kept keys to their new slots")
        section.update({"attention_bias_input": ATTENTION_BIAS_INPUT, "rotary_inv_freq": inv_freq})
    return section
