"""ONNX Runtime CPU lowering of `outlier_split`'s int8 units: the MatMuls that read one activation
(Q/K/V, gate/up) become one wider unit, so a decode step dispatches fewer kernels.

What the pass writes per MatMul (standard QDQ, so the NPU path can take it as it is):

    Q(A) -> DQ --------------------------\\
    W_q:int8 -> DQ(s_w, axis 1) ----------> MatMul -> Add -> Y
    Gather(A, O) -> MatMul(W[O, :]) ------------------/      (the float outlier branch; absent when naive)

ONNX Runtime's CPU EP fuses Q/DQ/MatMul into `com.microsoft.MatMulIntegerToFloat`, but not the
branch, and not units side by side: on pycoder-v2 a decode step ran 57 int8 MatMuls, 57 float
outlier MatMuls and 57 Adds (the float graph: 41 MatMuls, Q/K/V packed by the fused attention
path). At one token per step these kernels are dispatch-bound, not weight-bound.

The lowering (CPU target only, after the attention lowering): units that share their activation
codes and outlier Gather are stacked along N, which is exact (weights are quantised per output
channel and the outlier rows are the same channels):

    Q(A) -> DQ -> MatMul(DQ([W_q1 | W_q2 | ...], [s_1 | s_2 | ...]))  +  Gather(A, O) @ [W_O1 | W_O2 | ...]

One int8 MatMul, one outlier MatMul and one Add per activation instead of one each per MatMul.
When the units are a GroupQueryAttention's query, key and value (in that order), its packed-query
form takes the stacked output; otherwise a Split gives each user its columns back. The result is
still QDQ (ONNX Runtime fuses it as before); units with an output Q/DQ (`quantize_outputs`, for
NPUs) are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optc.runtime.manifest import FLOAT_BRANCH_KEY

GQA = ("com.microsoft", "GroupQueryAttention")


class _Unit:
    """One rewritten MatMul: codes (the activation's Q output), its DQ node, the weight's
    (codes, scale, zero point) constants, the optional outlier branch, and the output value."""

    def __init__(self, matmul: ir.Node, adq: ir.Node, wdq: ir.Node, add: ir.Node | None, branch: ir.Node | None):
        self.matmul, self.adq, self.wdq, self.add, self.branch = matmul, adq, wdq, add, branch
        self.output = (add or matmul).outputs[0]
        self.weight = [wdq.inputs[i].const_value.numpy() for i in range(3)]
        self.n = self.weight[0].shape[1]

    def key(self):
        """Units with the same key read the same activation the same way and can be stacked."""
        a = self.adq
        return (id(a.inputs[0]), id(a.inputs[1]), id(a.inputs[2]),
                id(self.branch.inputs[0]) if self.branch is not None else None)


def _const(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is not None


def _unit(node: ir.Node) -> _Unit | None:
    """The outlier_split unit whose int8 MatMul is `node`, or None."""
    if node.op_type != "MatMul" or node.domain != "" or FLOAT_BRANCH_KEY in node.metadata_props:
        return None
    adq, wdq = (v.producer() for v in node.inputs)
    if adq is None or wdq is None or adq.op_type != "DequantizeLinear" or wdq.op_type != "DequantizeLinear":
        return None
    if len(wdq.inputs) < 3 or not all(_const(v) for v in wdq.inputs) or wdq.attributes.get_int("axis", 1) != 1:
        return None
    if len(wdq.inputs[0].const_value.shape) != 2 or wdq.inputs[1].const_value.shape != \
            (wdq.inputs[0].const_value.shape[1],) or len(wdq.outputs[0].uses()) != 1:
        return None
    uses = node.outputs[0].uses()
    if not uses or node.outputs[0] in node.graph.outputs or any(u.op_type == "QuantizeLinear" for u, _ in uses):
        return None  # (quantize_outputs: a whole QDQ unit DQ -> MatMul -> Q, left as it is)
    add, branch = uses[0][0], None
    if len(uses) == 1 and add.op_type == "Add" and add.domain == "":
        other = add.inputs[1 - uses[0][1]].producer()
        if other is not None and FLOAT_BRANCH_KEY in other.metadata_props:
            if not _const(other.inputs[1]) or other.inputs[0].producer() is None \
                    or other.inputs[0].producer().op_type != "Gather":
                return None
            return _Unit(node, adq, wdq, add, other)
    return _Unit(node, adq, wdq, None, branch)


def _init(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    n, k = name, 1
    while n in graph.initializers:
        k += 1
        n = f"{name}.{k}"
    v = ir.Value(name=n, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                 const_value=ir.tensor(np.ascontiguousarray(arr), name=n))
    graph.register_initializer(v)
    return v


def _gqa_slots(units: list[_Unit]) -> ir.Node | None:
    """The GroupQueryAttention whose query, key and value are these three outputs, in order."""
    if len(units) != 3:
        return None
    users = [u.output.uses() for u in units]
    if any(len(us) != 1 for us in users):
        return None
    nodes = {id(us[0][0]) for us in users}
    node = users[0][0][0]
    if len(nodes) != 1 or (node.domain, node.op_type) != GQA or [us[0][1] for us in users] != [0, 1, 2]:
        return None
    return node


def _stack(graph: ir.Graph, units: list[_Unit]) -> str:
    first = units[0]
    order = {id(n): i for i, n in enumerate(graph)}
    # every input of the stacked nodes (activation codes, outlier Gather) comes before each unit
    anchor = min((n for u in units for n in (u.matmul, u.branch) if n is not None), key=lambda n: order[id(n)])
    base = first.matmul.name or "int8_unit"
    codes = np.concatenate([u.weight[0] for u in units], axis=1)
    scale = np.concatenate([u.weight[1] for u in units])
    zp = np.concatenate([u.weight[2] for u in units])
    names = [u.wdq.inputs[0].name for u in units]
    wq, ws, wz = (_init(graph, f"{names[0]}.stacked{suffix}", a)
                  for suffix, a in (("", codes), (".scale", scale), (".zero_point", zp)))
    nodes = [ir.node("DequantizeLinear", [wq, ws, wz], attributes={"axis": 1}, name=f"{base}/stacked_dequantize")]
    nodes.append(ir.node("MatMul", [first.adq.outputs[0], nodes[-1].outputs[0]], name=f"{base}/stacked_int8_matmul"))
    y = nodes[-1].outputs[0]
    if first.branch is not None:
        wo = np.concatenate([u.branch.inputs[1].const_value.numpy() for u in units], axis=1)
        wo_v = _init(graph, f"{names[0]}.stacked.outlier_rows", wo)
        branch = ir.node("MatMul", [first.branch.inputs[0], wo_v], name=f"{base}/stacked_outlier_matmul")
        branch.metadata_props[FLOAT_BRANCH_KEY] = "outlier channels"
        nodes += [branch, ir.node("Add", [y, branch.outputs[0]], name=f"{base}/stacked_add")]
        y = nodes[-1].outputs[0]
    gqa = _gqa_slots(units)
    if gqa is not None:  # GQA's packed query [B, S, (heads + 2 kv_heads) * D]: no Split
        graph.insert_before(gqa, nodes)
        gqa.replace_input_with(0, y)
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        return "packed GroupQueryAttention query"
    sizes = _init(graph, f"{names[0]}.stacked.split", np.asarray([u.n for u in units], np.int64))
    split = ir.node("Split", [y, sizes], attributes={"axis": -1}, num_outputs=len(units), name=f"{base}/stacked_split")
    nodes.append(split)
    graph.insert_before(anchor, nodes)
    for u, out in zip(units, split.outputs):
        out.name, u.output.name = u.output.name, f"{u.output.name}.unstacked"
        out.type, out.shape = u.output.type, u.output.shape
        ir.convenience.replace_all_uses_with(u.output, out)
        if u.output in graph.outputs:
            graph.outputs[graph.outputs.index(u.output)] = out
    return "Split"


def lower(model: ir.Model, log=print) -> int:
    """Stack the int8 units that share an activation (see the module doc); returns how many groups
    were stacked. A graph without outlier_split units is left as it is."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    groups: dict[tuple, list[_Unit]] = {}
    for node in graph:
        u = _unit(node)
        if u is not None:
            groups.setdefault(u.key(), []).append(u)
    stacked = {"packed GroupQueryAttention query": 0, "Split": 0}
    units = 0
    for members in groups.values():
        if len(members) < 2 or len({u.weight[0].shape[0] for u in members}) != 1 \
                or len({u.weight[0].dtype for u in members}) != 1:
            continue
        stacked[_stack(graph, members)] += 1
        units += len(members)
    if not units:
        return 0
    RemoveUnusedNodesPass()(model)
    log(f"onnxruntime: {units} int8 MatMuls (outlier_split) stacked into {sum(stacked.values())} by shared input "
        f"({stacked['packed GroupQueryAttention query']} as GroupQueryAttention's packed query, "
        f"{stacked['Split']} split back); their outlier branches alike")
    return sum(stacked.values())
