"""Finding a layer's parts in a canonical graph, shared by the passes that cut into the residual
stream (token_dropping's prefill and encoder modes, layer_routing): weights versus computed
values, the nodes downstream of a value, each layer's Attention op and the hidden state it adds
to, and the Reshapes that must follow a row count that a pass changed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optc.passes.base import PassConfigError
from optc.passes.rules.builders import ints, name_nodes

# ops between an Attention output and the residual Add of a pre-norm layer
# (MatMulNBits: o_proj after weight_quant, which may run first)
_TO_RESIDUAL = ("Transpose", "Reshape", "MatMul", "MatMulNBits", "Cast")


def dequantized_name(past: str) -> str:
    """The value kv_quantize computes a layer's float cache as, in place of the `past` input."""
    return f"{past}.dequantized"


def cache_value(graph: ir.Graph, past: str) -> ir.Value | None:
    """A layer's cached keys or values as the graph reads them: the `past` input, or after
    kv_quantize its dequantisation (so a pass finds the cache in either order); None if neither."""
    for v in graph.inputs:
        if v.name == past:
            return v
    name = dequantized_name(past)
    return next((o for node in graph for o in node.outputs if o.name == name), None)


def is_weight(v: ir.Value | None) -> bool:
    """A value fixed at compile time: an initializer, a constant, or a Constant node's output."""
    return v is not None and (v.const_value is not None or v.is_initializer()
                              or (v.producer() is not None and v.producer().op_type == "Constant"))


def downstream(graph: ir.Graph, starts) -> list[ir.Node]:
    """Every node that reads `starts` directly or indirectly, in graph order (not set order:
    rewrites walk this list and name what they add, and the artifact must be byte-identical run
    to run). A read inside an If's branch is also a read by the If (its outputs are followed)."""
    enclosing = {inner: node for node in graph for attr in node.attributes.values()
                 if attr.type == ir.AttributeType.GRAPH
                 for inner in ir.traversal.RecursiveGraphIterator(attr.as_graph())}
    seen: set[ir.Node] = set()
    todo = list(starts)
    while todo:
        v = todo.pop()
        for use in v.uses():
            for node in (use.node, enclosing.get(use.node)):
                if node is not None and node not in seen:
                    seen.add(node)
                    todo.extend(node.outputs)
    return [node for node in ir.traversal.RecursiveGraphIterator(graph) if node in seen]


def attention_nodes(graph: ir.Graph, info) -> list[ir.Node]:
    """Each layer's Attention op, by the names the canonicaliser recorded."""
    by_name = {n.name: n for n in graph if n.op_type == "Attention"}
    nodes = [by_name.get(layer.attention) for layer in info.layers]
    if any(n is None for n in nodes):
        raise PassConfigError(None, "a layer's Attention op (from the canonicaliser) is no longer in the graph "
                                    "(did an earlier pass replace it?)")
    return nodes


def residual_input(attn: ir.Node) -> ir.Value | None:
    """The hidden state a pre-norm layer adds its attention output to: walk from the Attention
    output through Transpose/Reshape/o_proj to the residual Add; its other input."""
    v = attn.outputs[0]
    for _ in range(8):
        uses = list(v.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if node.op_type == "Add":
            other = node.inputs[1 - uses[0].idx]
            if not is_weight(other):
                return other
            v = node.outputs[0]  # a bias
            continue
        if node.op_type not in _TO_RESIDUAL or (node.op_type in ("MatMul", "MatMulNBits")
                                                and not is_weight(node.inputs[1])):
            return None
        v = node.outputs[0]
    return None


def reshape_rows_to(graph: ir.Graph, region: list[ir.Node], in_region: set[ir.Value], rows: ir.Value,
                    prefix: str) -> set[ir.Node]:
    """After a pass keeps `rows` tokens of axis 1: every Reshape in `region` whose target shape
    was computed outside the region (from the full sequence) gets that shape with axis 1
    replaced by `rows`. One replacement per distinct shape value; returns the nodes added."""
    memo: dict[ir.Value, ir.Value] = {}
    added: set[ir.Node] = set()
    for node in region:
        if node.op_type != "Reshape" or node.inputs[1] in in_region or is_weight(node.inputs[1]):
            continue
        old = node.inputs[1]
        if old not in memo:
            t = tape.Tape()
            head = t.op("Slice", [old, ints(t, 0), ints(t, 1)])
            tail = t.op("Slice", [old, ints(t, 2), ints(t, np.iinfo(np.int64).max)])
            memo[old] = t.op("Concat", [head, rows, tail], {"axis": 0})
            name_nodes(t.nodes, f"{prefix}/shape_{len(memo)}")
            graph.insert_before(node, t.nodes)
            added |= set(t.nodes)
        node.replace_input_with(1, memo[old])
    return added
