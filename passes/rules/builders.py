"""Small graph builders every pass family uses: constants on a tape (any value, int64 vectors;
defined in optc.ir, which the backends share), unique node names, copying a computation onto
another input, and replacing a node while its outputs keep their names."""

from __future__ import annotations

import onnx_ir as ir

from optc.ir import const, ints, take_over  # noqa: F401  (re-exported: the passes' builders)


def name_nodes(nodes, prefix: str) -> None:
    """Unique node and value names: values in If branches share one SSA namespace with the graph."""
    for n, node in enumerate(nodes):
        node.name = f"{prefix}/{n}"
        for j, out in enumerate(node.outputs):
            out.name = f"{prefix}/{n}:{j}"


def clone_cone(value: ir.Value, source: ir.Value, replacement: ir.Value, graph: ir.Graph, memo: dict,
               suffix: str) -> ir.Value:
    """Copy the nodes that compute `value` from `source`, reading `replacement` instead.
    Nodes that do not depend on `source` (constants, initialisers) are shared, not copied."""
    if value is source:
        return replacement
    if value in memo:
        return memo[value]
    node = value.producer()
    if node is None:
        return value
    inputs = [None if v is None else clone_cone(v, source, replacement, graph, memo, suffix) for v in node.inputs]
    if all(a is b for a, b in zip(inputs, node.inputs)):
        memo[value] = value
        return value
    clone = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                    num_outputs=len(node.outputs), name=f"{node.name}{suffix}")
    graph.append(clone)
    for old, new in zip(node.outputs, clone.outputs):
        new.name = f"{old.name}{suffix}"
        memo[old] = new
    return memo[value]


def replace_keeping_output(graph: ir.Graph, old: ir.Node, new: ir.Node, *, before: bool = False) -> None:
    """Put `new` in place of `old`: its first output takes over the uses, name, shape and type of
    `old`'s first output, as a graph output too (the LM head's is `logits`), so graph outputs and
    later passes see the same value name. `new` is inserted beside `old` unless already in a graph."""
    if new.graph is None:
        if before:
            graph.insert_before(old, new)
        else:
            graph.insert_after(old, new)
    take_over(old.outputs[0], new.outputs[0])  # after the insertion, which names the new output
    graph.remove(old, safe=True)
