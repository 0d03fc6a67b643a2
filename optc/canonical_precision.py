"""Half-precision exports (optimum `--dtype fp16`) are brought to float32 for the canonical form.

optc's passes, runtime caches (dense, KIVI, H2O) and TVM lowering are written for float32 graphs;
an fp16 export differs from an fp32 one only in its element type and in the casts the exporter put
around the parts it keeps in float32 (softmax, RMSNorm). So the canonicaliser computes such a graph
in float32 instead of teaching every pass two precisions:

  * every float16 initializer, Constant / ConstantOfShape value and graph input/output
    becomes float32, as does every value typed float16;
  * `Cast(to=float16)` becomes `Cast(to=float32)`, and casts that are then float32 -> float32 are
    removed (which lets the attention rules see the same graph as in an fp32 export).

The artifact then takes float32 inputs, keeps a float32 KV cache and has float32 weights (twice the
export's weight bytes). Its logits differ from ONNX Runtime's on the fp16 graph by fp16 rounding,
not by a rewrite: the compile log says that the model was upcast, and verification measures it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# bfloat16 is left out: ONNX Runtime's Python API cannot feed bf16 arrays to verify against
HALF = (ir.DataType.FLOAT16,)


def _to_float32(tensor) -> ir.Tensor:
    return ir.Tensor(np.asarray(tensor.numpy(), dtype=np.float32), name=tensor.name)


def _upcast_value_type(value: ir.Value) -> bool:
    if value.dtype in HALF:
        value.dtype = ir.DataType.FLOAT
        return True
    return False


def upcast_half_precision(model: ir.Model) -> int:
    """Rewrite a float16 graph to float32 in place; returns the number of tensors whose
    precision changed (0: the graph had no half-precision tensors, nothing was touched)."""
    graph = model.graph
    if not any(v.dtype in HALF for v in [*graph.inputs, *graph.initializers.values()]):
        return 0
    # TorchScript exports leave most intermediate types unset; infer them first, so that every
    # half-precision value is known (and retyped) and the float32 -> float32 casts can be found
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass()(model)
    changed = 0
    for value in list(graph.initializers.values()):
        if value.const_value is not None and value.const_value.dtype in HALF:
            value.const_value = _to_float32(value.const_value)
            value.dtype = ir.DataType.FLOAT
            changed += 1
    for value in [*graph.inputs, *graph.outputs]:
        changed += _upcast_value_type(value)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype in HALF:
                node.attributes[name] = ir.AttrTensor(name, _to_float32(attr.value))
                changed += 1
            elif name in ("to", "dtype") and attr.type == ir.AttributeType.INT and attr.value in HALF:
                node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT)
                changed += 1
        for value in node.outputs:
            changed += _upcast_value_type(value)
    if changed:
        _drop_float_to_float_casts(graph)
    return changed


def _drop_float_to_float_casts(graph: ir.Graph) -> None:
    outputs = set(graph.outputs)
    for node in list(graph):
        if (node.op_type == "Cast" and node.domain == "" and node.attributes.get_int("to") == ir.DataType.FLOAT
                and node.inputs[0] is not None and node.inputs[0].dtype == ir.DataType.FLOAT
                and node.outputs[0] not in outputs):
            ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
            graph.remove(node, safe=True)
