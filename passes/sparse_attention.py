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

import numpy as np
import onnx_ir as ir
from onnx_ir import tape
from pydantic import Field, field_validator, model_validator

from optc.config import PassOptions
from optc.passes.base import OptcPass, PassConfigError

KEY_POSITIONS = "optc.key_position_ids"


SINK_WINDOW_KEYS = {"window", "sinks"}
BLOCK_SPARSE_KEYS = {"block_size", "sink_blocks", "local_blocks", "budget_blocks"}


class SparseAttentionOptions(PassOptions):
    mode: Literal["sink_window", "block_sparse"] = Field(
        description="sink_window: keep first `sinks` + last `window` tokens; block_sparse: prefill attends to "
                    "selected key blocks only")
    window: int = Field(252, gt=0, description="sink_window: most recent tokens kept")
    sinks: int = Field(4, ge=0, description="sink_window: initial tokens kept for good (attention sinks)")
    block_size: int = Field(64, gt=1, description="block_sparse: tokens per block")
    sink_blocks: int = Field(1, ge=0, description="block_sparse: initial key blocks every query block sees")
    local_blocks: int = Field(2, ge=1, description="block_sparse: key blocks up to and including the query's own")
    budget_blocks: int = Field(8, gt=0, description="block_sparse: key blocks per query block in all "
                                                    "(the rest chosen by pooled block scores)")

    @field_validator("sinks")
    @classmethod
    def _sinks_fit(cls, v, info):
        window = info.data.get("window")
        if window is not None and v > window:
            raise ValueError(f"sinks ({v}) must not exceed window ({window})")
        return v

    @field_validator("budget_blocks")
    @classmethod
    def _budget_fits(cls, v, info):
        forced = info.data.get("sink_blocks", 0) + info.data.get("local_blocks", 0)
        if v < forced:
            raise ValueError(f"budget_blocks ({v}) must be at least sink_blocks + local_blocks ({forced})")
        return v

    @model_validator(mode="after")
    def _keys_match_mode(self):
        other = BLOCK_SPARSE_KEYS if self.mode == "sink_window" else SINK_WINDOW_KEYS
        stray = sorted(self.model_fields_set & other)
        if stray:
            raise ValueError(f"{stray[0]} does not apply to mode {self.mode}")
        return self


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

    @classmethod
    def declared_perplexity_budget(cls, options) -> float | None:
        return 0.05 if options.mode == "sink_window" else 0.03

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.options.mode == "block_sparse":
            return self._block_sparse(model)
        return self._sink_window(model)

    def _block_sparse(self, model: ir.Model) -> ir.passes.PassResult:
        from optc.passes.block_sparse import block_sparse_branch, name_nodes

        o: SparseAttentionOptions = self.options
        info = self.context.decoder
        if (self.context.runtime.get("kv_cache", {}).get("policy") or {}).get("kind") == "h2o":
            raise PassConfigError("mode", "block_sparse prefill cannot report the attention scores that H2O eviction "
                                          "needs")
        graph = model.graph
        nodes = {n.name: n for n in graph}
        mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
        changed = False
        for layer in info.layers:
            attn = nodes.get(layer.attention)
            if attn is None or attn.op_type != "Attention":
                continue  # already wrapped in an If (a second run)
            q, k, v = attn.inputs[0], attn.inputs[1], attn.inputs[2]
            scale = attn.attributes.get_float("scale", 0.0) or 1.0 / np.sqrt(info.head_dim)
            t = tape.Tape()
            i64 = lambda *xs: t.op("Constant", [], {"value": ir.tensor(np.array(xs, np.int64))})  # noqa: E731
            q_len = t.op("Slice", [t.op("Shape", [q]), i64(2), i64(3)])
            kv_len = t.op("Slice", [t.op("Shape", [k]), i64(2), i64(3)])
            cond = t.op("And", [t.op("Equal", [q_len, kv_len]),
                                t.op("GreaterOrEqual", [q_len, i64(2 * o.block_size)])])
            cond = t.op("Squeeze", [cond, i64(0)])
            then = block_sparse_branch(q, k, v, q_heads=info.num_heads, kv_heads=info.kv_heads,
                                       head_dim=info.head_dim, scale=float(scale), block=o.block_size,
                                       sink_blocks=o.sink_blocks, local_blocks=o.local_blocks,
                                       budget_blocks=o.budget_blocks, prefix=attn.name, mask=mask)
            dense = ir.Node("", "Attention", list(attn.inputs), attributes=list(attn.attributes.values()),
                            num_outputs=1, name=f"{attn.name}/dense")
            dense.outputs[0].name = f"{attn.name}/dense/out"
            els = ir.Graph([], [dense.outputs[0]], nodes=[dense], name=f"{attn.name}_dense")
            wrapped = ir.Node("", "If", [cond], attributes=[ir.AttrGraph("then_branch", then),
                                                             ir.AttrGraph("else_branch", els)],
                              num_outputs=1, name=f"{attn.name}/block_sparse_if")
            name_nodes(t.nodes, f"{attn.name}/prefill_test")
            graph.insert_before(attn, [*t.nodes, wrapped])
            out_name, out_shape, out_type = attn.outputs[0].name, attn.outputs[0].shape, attn.outputs[0].type
            ir.convenience.replace_all_uses_with(attn.outputs[0], wrapped.outputs[0])
            graph.remove(attn, safe=True)
            wrapped.outputs[0].name, wrapped.outputs[0].shape, wrapped.outputs[0].type = out_name, out_shape, out_type
            layer.attention = wrapped.name
            changed = True
        # static-shape backends compile the sparse and the dense prefill separately and pick by
        # the real prompt length (the If tests the padded one)
        self.context.runtime["block_sparse"] = {"min_prefill_tokens": 2 * o.block_size}
        return ir.passes.PassResult(model, changed)

    def _sink_window(self, model: ir.Model) -> ir.passes.PassResult:
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
