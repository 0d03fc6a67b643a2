"""sparse_attention: attention sinks + a recent window (StreamingLLM, Xiao et al. 2023).

`mode: sink_window` keeps the first `sinks` tokens and the last `window` tokens in the KV cache;
the runtime evicts everything in between, so the cache, and a decode step's cost, stay bounded
however long the stream gets.

Positions: evicting tokens from a cache of keys rotated at their *text* positions would leave the
query thousands of positions away from the sinks — far outside the trained context. As in
StreamingLLM, positions are assigned within the cache instead: the rewritten graph caches keys
*before* RoPE and rotates the whole cache at every step by cache slot (0..len-1, fed as the new
input `optc.key_position_ids`); queries are rotated at their slot too (the runtime feeds
`position_ids` = slot). The relative distance between a query and any cached key is therefore
at most sinks + window, inside the trained context.

Other modes from the design (block_sparse prefill) are not implemented yet and are rejected by
the config schema rather than accepted and ignored.
"""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir
from pydantic import Field, field_validator

from optc.config import PassOptions
from optc.passes.base import OptcPass, PassConfigError

KEY_POSITIONS = "optc.key_position_ids"


class SparseAttentionOptions(PassOptions):
    mode: Literal["sink_window"] = Field(description="sink_window: first `sinks` + last `window` tokens")
    window: int = Field(252, gt=0, description="most recent tokens kept")
    sinks: int = Field(4, ge=0, description="initial tokens kept for good (attention sinks)")

    @field_validator("sinks")
    @classmethod
    def _sinks_fit(cls, v, info):
        window = info.data.get("window")
        if window is not None and v > window:
            raise ValueError(f"sinks ({v}) must not exceed window ({window})")
        return v


def _clone_cone(value: ir.Value, source: ir.Value, replacement: ir.Value, graph: ir.Graph, memo: dict,
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
    inputs = [None if v is None else _clone_cone(v, source, replacement, graph, memo, suffix) for v in node.inputs]
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


class SparseAttention(OptcPass):
    """Attention sinks + recent window: bounded KV cache, positions assigned within the cache."""

    name = "sparse_attention"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: SparseAttentionOptions = self.options
        info = self.context.decoder
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        if KEY_POSITIONS in inputs:
            return ir.passes.PassResult(model, False)  # already rewritten
        kv = self.context.runtime.get("kv_cache", {})
        if kv.get("policy"):
            raise PassConfigError("mode", f"the cache already has a {kv['policy']['kind']} policy")
        if kv.get("layout", "float") != "float" and kv.get("key_quant") != "per_token":
            raise PassConfigError("mode", "sink_window evicts single tokens, which per-channel key groups of a "
                                          "compressed cache cannot give up: use kv_cache_compression key_quant: "
                                          "per_token")
        position_ids = inputs.get("position_ids")
        if position_ids is None:
            raise PassConfigError("mode", "sink_window needs a position_ids graph input")
        outputs = {v.name: v for v in graph.outputs}
        nodes = {n.name: n for n in graph}
        key_pos = ir.val(KEY_POSITIONS, ir.DataType.INT64, ["batch", "total_sequence_length"])
        memo: dict = {}
        for layer in info.layers:
            concat = outputs[f"present.{layer.index}.key"].producer()
            rotated = concat.inputs[1]
            rope = rotated.producer()
            if rope is None or rope.op_type != "RotaryEmbedding" or len([i for i in rope.inputs if i]) != 3:
                raise PassConfigError("mode", f"layer {layer.index}: sink_window needs the new keys to come from an "
                                              f"ONNX RotaryEmbedding(x, cos, sin) op (found "
                                              f"{rope.op_type if rope else 'a graph input'}); rotary: {info.rotary}")
            pre_rope = rope.inputs[0]
            concat.replace_input_with(1, pre_rope)  # the cache now holds keys before RoPE
            cos = _clone_cone(rope.inputs[1], position_ids, key_pos, graph, memo, "/key_slots")
            sin = _clone_cone(rope.inputs[2], position_ids, key_pos, graph, memo, "/key_slots")
            attrs = [a for name, a in rope.attributes.items() if name != "num_heads"]
            rotate_all = ir.Node("", "RotaryEmbedding", [concat.outputs[0], cos, sin], attributes=attrs,
                                 name=f"{rope.name}/cache_slots")
            rotate_all.outputs[0].name = f"present.{layer.index}.key.rotated"
            graph.append(rotate_all)
            nodes[layer.attention].replace_input_with(1, rotate_all.outputs[0])
            layer.new_key = pre_rope.name
        graph.inputs.append(key_pos)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.TopologicalSortPass()(model)
        kv = self.context.runtime.setdefault("kv_cache", {"layout": "float"})
        kv["positions"] = "cache_slot"
        kv["policy"] = {"kind": "sink_window", "sinks": o.sinks, "window": o.window}
        return ir.passes.PassResult(model, True)
