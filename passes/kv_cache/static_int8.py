"""kv_quantize `scales: static`: an int8 KV cache with one fixed scale per layer, KV head and
channel, calibrated on text (absmax / 127 of the rotated keys and of the values), the layout
ONNX Runtime's GroupQueryAttention stores its quantised cache in (kv_cache_bit_width 8,
PER_CHANNEL scales), so that on the fused path the cache stays int8 in place and attention reads
it directly.

The canonical graph, which the generic path runs, per layer and kind:

    past (int8 [B, H, T, D]) -> Cast -> Mul(scale [1, H, 1, D])                   cached tokens
    new (float; keys after RoPE) -> Div(scale) -> Round -> Clip(-128, 127) -> Cast(int8)
                                                  the step's tokens as stored (the runtime appends them)
                               -> Cast -> Mul(scale)                         the step's tokens as read
    present = Concat(cached tokens, the step's tokens as read)

so attention reads every token as stored, the step's own included: what GQA does (it attends over
its quantised cache; measured to 6e-8). Round is half to even and the clip saturates, as GQA's
quantisation does (measured). backends/onnxruntime_fused.py reads this pattern back (`fake_quant`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optc.passes.base import PassConfigError
from optc.passes.rules.builders import const, name_nodes
from optc.runtime.manifest import KV_KINDS, past_name, present_name

QMIN, QMAX = -128, 127
SCALE_FLOOR = 1e-6  # a channel that never moved on the calibration text still gets a usable scale
NODE_TAG = "kv_int8"  # in the names of the nodes this rewrite adds (fake_quant recognises them)


def calibration_values(model: ir.Model, info) -> dict[tuple[int, str], ir.Value]:
    """The value each layer's cache stores, by (layer, kind): the second input of the present
    Concat (the step's keys after RoPE, its values). Unnamed ones are named here."""
    outputs = {v.name: v for v in model.graph.outputs}
    names = {}
    for layer in info.layers:
        for kind in KV_KINDS:
            present = outputs.get(present_name(layer.index, kind))
            concat = present.producer() if present is not None else None
            if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 \
                    or concat.inputs[0] is None or concat.inputs[0].name != past_name(layer.index, kind):
                raise PassConfigError(None, f"layer {layer.index}: the present {kind}s are not Concat(past, new) "
                                            f"over the float cache input (scales: static quantises that cache)")
            new = concat.inputs[1]
            if not new.name:
                new.name = f"optc.kv_int8.stored.{layer.index}.{kind}"
            names[(layer.index, kind)] = new
    return names


def rotary_partner(rope: ir.Node | None, head_dim: int) -> np.ndarray | None:
    """For keys rotated by `rope` (a RotaryEmbedding), the channel each channel is rotated with
    (itself where unrotated); None when `rope` is not one."""
    if rope is None or rope.op_type != "RotaryEmbedding":
        return None
    dim = rope.attributes.get_int("rotary_embedding_dim", 0) or head_dim
    partner = np.arange(head_dim)
    if rope.attributes.get_int("interleaved", 0):
        partner[:dim] = partner[:dim] ^ 1
    else:
        half = dim // 2
        partner[:half], partner[half:dim] = np.arange(half, dim), np.arange(half)
    return partner


def scales_from_absmax(absmax: np.ndarray, heads: int, head_dim: int, partner: np.ndarray | None = None) -> np.ndarray:
    """Per (head, channel) absmax -> the scale [1, H, 1, D] that maps it to 127. For rotated keys
    (`partner`: the channel each is rotated with) the bound is the pair's norm,
    sqrt(absmax_i^2 + absmax_j^2): RoPE moves magnitude between the two channels of a pair as the
    position grows, so a key at a position the calibration text never reached stays in range."""
    a = absmax.reshape(heads, head_dim).astype(np.float64)
    if partner is not None:
        paired = np.sqrt(a ** 2 + a[:, partner] ** 2)
        a = np.where(partner == np.arange(head_dim), a, paired)
    return (np.maximum(a.reshape(1, heads, 1, head_dim), SCALE_FLOOR * QMAX) / QMAX).astype(np.float32)


def rewrite_static(model: ir.Model, info, scales: dict[tuple[int, str], np.ndarray]) -> int:
    """Quantise each layer's cache with its fixed scales (see the module docstring); returns the
    number of cache tensors rewritten. Records the stored values as the layers' new keys/values
    (what the runtime appends)."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    changed = 0
    for layer in info.layers:
        for kind in KV_KINDS:
            base = past_name(layer.index, kind)
            past = inputs[base]
            concat = outputs[present_name(layer.index, kind)].producer()
            new = concat.inputs[1]
            scale = scales[(layer.index, kind)]
            t = tape.Tape()
            s = const(t, scale)
            stored_past = ir.val(f"{base}.int8", ir.DataType.INT8, past.shape)
            cached = t.op("Mul", [t.op("Cast", [stored_past], {"to": ir.DataType.FLOAT}), s])
            rounded = t.op("Round", [t.op("Div", [new, s])])
            clipped = t.op("Clip", [rounded, const(t, np.float32(QMIN)), const(t, np.float32(QMAX))])
            stored = t.op("Cast", [clipped], {"to": ir.DataType.INT8})
            read = t.op("Mul", [t.op("Cast", [stored], {"to": ir.DataType.FLOAT}), s])
            name_nodes(t.nodes, f"{base}/{NODE_TAG}")
            stored.name = f"{base}.{NODE_TAG}.new"
            graph.insert_before(concat, t.nodes)
            concat.replace_input_with(0, cached)
            concat.replace_input_with(1, read)
            ir.convenience.replace_all_uses_with(past, cached)  # (e.g. a Shape of the cached tokens)
            graph.inputs[graph.inputs.index(past)] = stored_past
            stored_past.name = base
            if kind == "key":
                layer.new_key = stored.name
            else:
                layer.new_value = stored.name
            changed += 1
    return changed


def fake_quant(value: ir.Value) -> tuple[ir.Value, np.ndarray] | None:
    """(the float value, its scale [1, H, 1, D]) when `value` is rewrite_static's "the step's tokens
    as read" (Mul(Cast(Cast(Clip(Round(Div(x, s))))), s)); else None."""
    node = value.producer()
    chain = []
    for op in ("Mul", "Cast", "Cast", "Clip", "Round", "Div"):
        if node is None or node.op_type != op or NODE_TAG not in node.name:
            return None
        chain.append(node)
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    scale = ir.convenience.get_const_tensor(chain[0].inputs[1])
    if scale is None or chain[-1].inputs[1] is not chain[0].inputs[1]:
        return None
    return chain[-1].inputs[0], scale.numpy()


def dequantized_past(value: ir.Value) -> tuple[ir.Value, np.ndarray] | None:
    """(the int8 cache input, its scale) when `value` is rewrite_static's "cached tokens"
    (Mul(Cast(past), s)); else None."""
    mul = value.producer()
    if mul is None or mul.op_type != "Mul" or NODE_TAG not in mul.name:
        return None
    cast = mul.inputs[0].producer()
    scale = ir.convenience.get_const_tensor(mul.inputs[1])
    if cast is None or cast.op_type != "Cast" or scale is None or not cast.inputs[0].is_graph_input():
        return None
    return cast.inputs[0], scale.numpy()
