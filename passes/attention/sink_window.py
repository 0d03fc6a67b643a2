"""sink_window: attention sinks + a recent window (StreamingLLM, Xiao et al. 2023).

The runtime keeps the first `sinks` tokens and the last `window` tokens in the KV cache and
evicts everything in between, so the cache, and a decode step's cost, stay bounded however long
the stream gets.

Positions: evicting tokens from a cache of keys rotated at their *text* positions would leave the
query thousands of positions away from the sinks — far outside the trained context. As in
StreamingLLM, positions are assigned within the cache instead: the rewritten graph caches keys
*before* RoPE and rotates the whole cache at every step by cache slot (0..len-1, fed as the new
input `optc.key_position_ids`); queries are rotated at their slot too (the runtime feeds
`position_ids` = slot). The relative distance between a query and any cached key is therefore
at most sinks + window, inside the trained context.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir import tape
from pydantic import Field, field_validator

from optc.config import PassOptions
from optc.passes.base import (CACHE_POLICY, CACHE_SLOT_POSITIONS, EVICTS_SINGLE_TOKENS, LAYERS_ROUTED,
                              MODEL_DECODER, MODEL_POSITION_IDS, MODEL_ROTARY_OP, SPARSE_PREFILL, Contract, OptcPass,
                              PassConfigError)
from optc.passes.rules.builders import clone_cone, ints, name_nodes
from optc.passes.token_dropping.prefill import late_slots
from optc.runtime.manifest import (KEY_POSITION_IDS, POSITION_IDS, POSITIONS_CACHE_SLOT, SinkWindowPolicy,
                                   present_name)

PERPLEXITY_BUDGET = 0.05


def sinks_fit(v, info):
    """sinks <= window (a validator; sparse_attention's options use it too)."""
    window = info.data.get("window")
    if window is not None and v > window:
        raise ValueError(f"sinks ({v}) must not exceed window ({window})")
    return v


class SinkWindowOptions(PassOptions):
    window: int = Field(252, gt=0, description="most recent tokens kept")
    sinks: int = Field(4, ge=0, description="initial tokens kept for good (attention sinks)")

    sinks_fit = field_validator("sinks")(sinks_fit)


class SinkWindow(OptcPass):
    """Attention sinks + recent window: bounded KV cache, positions assigned within the cache."""

    name = "sink_window"

    @classmethod
    def contract(cls, options) -> Contract:
        return Contract(
            requires=frozenset({MODEL_DECODER, MODEL_POSITION_IDS, MODEL_ROTARY_OP}),
            ensures=frozenset({CACHE_POLICY, EVICTS_SINGLE_TOKENS, CACHE_SLOT_POSITIONS}),
            cache_bound=options.sinks + options.window,
            conflicts={SPARSE_PREFILL: "sink_window fills its bounded cache chunk by chunk, while block_sparse "
                                       "prefill needs the whole prompt in one step over an empty cache"},
            precedes={LAYERS_ROUTED: "layer_routing moves each routable layer into an If, out of reach of "
                                     "sink_window's rewrite of the layer's cache rotation"})

    @classmethod
    def declared_perplexity_budget(cls, options) -> float | None:
        return PERPLEXITY_BUDGET

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        info = self.context.decoder
        if info.context and o.sinks + o.window > info.context:
            # query-key distances up to sinks + window: past the trained context the positions
            # were never trained, which is what sink_window exists to avoid
            raise PassConfigError("window", f"sinks + window ({o.sinks + o.window}) exceeds the model's trained "
                                            f"context ({info.context})")
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        if KEY_POSITION_IDS in inputs:
            return ir.passes.PassResult(model, False)  # already rewritten
        position_ids = inputs.get(POSITION_IDS)
        if position_ids is None:
            raise PassConfigError(None, "sink_window needs a position_ids graph input")
        outputs = {v.name: v for v in graph.outputs}
        nodes = {n.name: n for n in graph}
        key_pos = ir.val(KEY_POSITION_IDS, ir.DataType.INT64, ["batch", "total_sequence_length"])
        memo: dict = {}
        pruned_from, late = self._late_layers(graph)
        late_memo: dict = {}
        for layer in info.layers:
            concat = outputs[present_name(layer.index, "key")].producer()
            rotated = concat.inputs[1]
            rope = rotated.producer()
            if rope is None or rope.op_type != "RotaryEmbedding" or len([i for i in rope.inputs if i]) != 3:
                raise PassConfigError(None, f"layer {layer.index}: sink_window needs the new keys to come from an "
                                              f"ONNX RotaryEmbedding(x, cos, sin) op (found "
                                              f"{rope.op_type if rope else 'a graph input'}); rotary: {info.rotary}")
            pre_rope = rope.inputs[0]
            concat.replace_input_with(1, pre_rope)  # the cache now holds keys before RoPE
            if late is not None and layer.index >= pruned_from:  # its cache numbered by its own slots
                pos_kept, _, key_slots = late
                cos = clone_cone(rope.inputs[1], pos_kept, key_slots, graph, late_memo, "/key_slots")
                sin = clone_cone(rope.inputs[2], pos_kept, key_slots, graph, late_memo, "/key_slots")
            else:
                cos = clone_cone(rope.inputs[1], position_ids, key_pos, graph, memo, "/key_slots")
                sin = clone_cone(rope.inputs[2], position_ids, key_pos, graph, memo, "/key_slots")
            attrs = [a for name, a in rope.attributes.items() if name != "num_heads"]
            rotate_all = ir.Node("", "RotaryEmbedding", [concat.outputs[0], cos, sin], attributes=attrs,
                                 name=f"{rope.name}/cache_slots")
            rotate_all.outputs[0].name = f"{present_name(layer.index, 'key')}.rotated"
            graph.append(rotate_all)
            nodes[layer.attention].replace_input_with(1, rotate_all.outputs[0])
            layer.new_key = pre_rope.name
        if late is not None:  # the later layers' queries at their slots too (a step's: past + 0..k-1)
            pos_kept, query_slots, _ = late
            for use in list(pos_kept.uses()):
                use.node.replace_input_with(use.idx, query_slots)
        graph.inputs.append(key_pos)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.TopologicalSortPass()(model)
        self.context.runtime.update_cache(positions=POSITIONS_CACHE_SLOT, policy=SinkWindowPolicy(o.sinks, o.window))
        return ir.passes.PassResult(model, True)

    def _late_layers(self, graph: ir.Graph):
        """(first pruned layer, (kept position ids, query slots [1, k], key slots [1, T])) where
        token_dropping (run before) made the later layers cache only the kept prompt tokens; else
        (None, None). Those layers' caches are shorter than the early layers', so their keys and
        queries are numbered by the slots of their own cache, not by `optc.key_position_ids`."""
        pruned_from = self.context.runtime.kv_cache.pruned_from_layer
        if pruned_from is None:
            return None, None
        found = late_slots(graph)
        if found is None:
            raise PassConfigError(None, f"layers from {pruned_from} cache only kept tokens, but the graph has no "
                                        f"token_dropping slots to number their positions by")
        pos_kept, query_slots, key_slots = found
        t = tape.Tape()
        rows = [t.op("Unsqueeze", [v, ints(t, 0)]) for v in (query_slots, key_slots)]  # [1, k], [1, T]
        name_nodes(t.nodes, "optc/sink_window/late_slots")
        graph.insert_after(key_slots.producer(), t.nodes)  # (sorted topologically at the end)
        return pruned_from, (pos_kept, *rows)
