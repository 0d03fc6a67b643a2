"""Static shapes for the NPU: a prefill graph for chunks of `chunk` tokens and a decode graph for
one token, both against a cache of a fixed `max_cache` slots (mllm-NPU's shared chunk graph).

The canonical decoder already takes everything a padded step needs: the runtime hands it the
cache padded to `max_cache` slots and the new tokens padded to the graph's token count, and
`attention_mask` marks which cache slots and which new tokens are real. Causality keeps real
tokens from seeing the padded ones; padded outputs are dropped. So the same graph with its input
dimensions fixed serves every chunk, and with the shape arithmetic folded (Shape -> constants)
every tensor in it has a static shape, which the NPU compiler needs.

Each step's new keys/values are graph outputs (`optc.new.{i}.key|value`, [1, kv_heads, tokens,
head_dim]); the `present` outputs (cache + new) are dropped: the runtime owns the cache.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from optc.backends.base import expose_new_kv
from optc.errors import OptcError
from optc.ir import copy_model
from optc.runtime.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_name, present_name


FOLD_ROUNDS = 6


def input_dims(info, tokens: int, max_cache: int) -> dict[str, list[int]]:
    dims = {INPUT_IDS: [1, tokens], POSITION_IDS: [1, tokens], ATTENTION_MASK: [1, max_cache + tokens]}
    for layer in info.layers:
        for kind in ("key", "value"):
            dims[past_name(layer.index, kind)] = [1, info.kv_heads, max_cache, info.head_dim]
    return dims


def make_static(model: ir.Model, info, tokens: int, max_cache: int) -> tuple[ir.Model, list[list[str]]]:
    """A copy of the canonical `model` with static shapes for `tokens` new tokens over a cache of
    `max_cache` slots, its shape arithmetic folded. Returns it and the new-KV output names."""
    model = copy_model(model)
    kv_outputs = expose_new_kv(model, info)
    presents = {present_name(layer.index, kind) for layer in info.layers for kind in ("key", "value")}
    keep = [v for v in model.graph.outputs if v.name not in presents]
    model.graph.outputs.clear()
    model.graph.outputs.extend(keep)
    dims = input_dims(info, tokens, max_cache)
    unknown = sorted(v.name for v in model.graph.inputs if v.name not in dims)
    if unknown:
        raise OptcError(f"--target npu: the graph takes {unknown[0]!r}, which static-shape prefill does not feed "
                        f"(the NPU target runs a plain float or QDQ decoder: no cache policy, no extra inputs)")
    static = fix_shapes(model, dims)
    logits = next(v for v in static.graph.outputs if v.name == LOGITS)
    assert list(logits.shape)[:2] == [1, tokens], logits.shape
    return static, kv_outputs


def make_static_encoder(model: ir.Model, info, batch: int, length: int) -> ir.Model:
    """A copy of the encoder `model` taking `batch` texts of exactly `length` tokens (its token
    inputs fixed to [batch, length]), its shape arithmetic folded. The runtime pads each text to
    `length` with attention_mask 0 there: padded keys get the mask's large negative score, and the
    padded rows are left out of the mean pooling, so one graph serves every text up to `length`."""
    static = fix_shapes(copy_model(model), {name: [batch, length] for name in info.inputs})
    out = next(v for v in static.graph.outputs if v.name == info.output)
    assert list(out.shape)[:2] == [batch, length], out.shape
    return static


def fix_shapes(model: ir.Model, dims: dict[str, list[int]]) -> ir.Model:
    """`model` with its inputs fixed to `dims`, every shape inferred again and the shape
    arithmetic folded; an OptcError names a tensor whose shape stays unknown."""
    for v in model.graph.inputs:
        v.shape = ir.Shape(dims[v.name])
    proto = ir.to_proto(model)
    # forget every inferred shape (they hold the dynamic dims) and infer them again from the inputs
    del proto.graph.value_info[:]
    for out in proto.graph.output:
        out.type.tensor_type.ClearField("shape")
    static = ir.from_proto(onnx.shape_inference.infer_shapes(proto, data_prop=True))
    for _ in range(FOLD_ROUNDS):  # folding makes shapes known, which lets the next round fold more
        before = sum(1 for _ in static.graph)
        _fold(static)
        static = ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(static), data_prop=True))
        if sum(1 for _ in static.graph) == before:
            break
    dynamic = [(v.name, list(v.shape)) for n in static.graph for v in n.outputs
               if v.shape is not None and not all(isinstance(d, int) for d in v.shape)]
    dynamic += [(v.name, None) for n in static.graph for v in n.outputs if v.shape is None]
    if dynamic:
        name, shape = dynamic[0]
        raise OptcError(f"--target npu: {name!r} keeps a dynamic shape {shape} after folding the shape arithmetic "
                        f"({len(dynamic)} tensors; static NPU graphs need every shape known)")
    return static


def _fold(model: ir.Model) -> None:
    """Constant-fold in place (onnxscript's optimizer: Shape of a static tensor is a constant)."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize(model, num_iterations=3)
    _fold_small_constants(model)
    # nodes without names cannot be partitioned by name: name them after their first output
    seen = set()
    for i, node in enumerate(model.graph):
        name = node.name or (node.outputs[0].name if node.outputs else f"node_{i}")
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


FOLD_MAX_ELEMENTS = 1 << 16
NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}  # QDQ units must stay whole


def _fold_small_constants(model: ir.Model) -> None:
    """Evaluate every node whose inputs are all constant and whose outputs are small (the mask
    and shape arithmetic onnxscript's folder leaves, e.g. ConstantOfShape of a folded shape)
    with ONNX's reference evaluator, and use the results as initializers."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    for node in list(graph):
        if node.op_type in NEVER_FOLD or node.domain not in ("", "ai.onnx") or not node.inputs or _has_subgraph(node):
            continue
        if any(v is not None and v.const_value is None for v in node.inputs):
            continue
        if any(v.is_graph_output() for v in node.outputs):
            continue
        if sum(v.const_value.size for v in node.inputs if v is not None) > FOLD_MAX_ELEMENTS:
            continue
        proto_node = ir.serde.serialize_node(node)
        inits = [onnx.numpy_helper.from_array(v.const_value.numpy(), v.name) for v in node.inputs if v is not None]
        g = helper.make_graph([proto_node], "fold", [], [helper.make_empty_tensor_value_info(v.name)
                                                         for v in node.outputs], inits)
        try:
            results = ReferenceEvaluator(helper.make_model(g, opset_imports=opsets)).run(None, {})
        except Exception:  # an op the reference evaluator lacks: leave it to the runtime
            continue
        if any(getattr(r, "size", FOLD_MAX_ELEMENTS + 1) > FOLD_MAX_ELEMENTS for r in results):
            continue
        for out, arr in zip(node.outputs, results):
            value = ir.Value(name=out.name + ".folded", const_value=ir.tensor(np.asarray(arr)))
            value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
            graph.register_initializer(value)
            ir.convenience.replace_all_uses_with(out, value)
        graph.remove(node, safe=True)


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
