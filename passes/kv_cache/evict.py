"""h2o_eviction: heavy-hitter eviction (H2O / Keyformer style) by accumulated attention.

The graph change is small: each layer's Attention op also outputs its probabilities
(qk_matmul_output_mode 3, after softmax) as `optc.attn.{i}`. The runtime adds them up per cached
token and, when the cache exceeds its budget, drops the middle tokens that received the least
attention so far (per layer); `sinks` first and `recent` newest tokens are never dropped.
"""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir
from pydantic import Field, field_validator, model_validator

from optc.config import PassOptions, Strict
from optc.passes.base import (ATTENTION_PROBABILITIES, CACHE_POLICY, CACHE_QUANTIZED, EVICTS_ALL_LAYERS_ALIKE,
                              EVICTS_SINGLE_TOKENS, MODEL_DECODER, SPARSE_PREFILL, Contract, OptcPass, PassConfigError)
from optc.passes.rules.builders import replace_keeping_output
from optc.runtime.manifest import H2OPolicy, attention_output

PERPLEXITY_BUDGET = 0.05


class EvictionSettings(Strict):
    """H2O / Keyformer-style eviction: when the cache exceeds the budget, drop the middle tokens
    that have received the least attention so far (per layer)."""

    sinks: int = Field(4, ge=0, description="initial tokens never evicted")
    recent: int = Field(32, ge=0, description="newest tokens never evicted")
    budget: int | None = Field(None, gt=0, description="tokens kept (absolute budget)")
    ratio: float | None = Field(None, gt=0, lt=1, description="tokens kept as a fraction of the tokens seen")
    score: Literal["accumulated_attention"] = "accumulated_attention"

    @field_validator("budget")
    @classmethod
    def _budget_fits(cls, v, info):
        floor = info.data.get("sinks", 0) + info.data.get("recent", 0)
        if v is not None and v <= floor:
            raise ValueError(f"budget ({v}) must exceed sinks + recent ({floor})")
        return v

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.budget is None) == (self.ratio is None):
            raise ValueError("give exactly one of budget (tokens) or ratio")
        return self


class H2OEvictionOptions(PassOptions, EvictionSettings):
    """h2o_eviction's options: the eviction settings plus allow_noop."""


class H2OEviction(OptcPass):
    """Evict the least-attended cached tokens (H2O): a bounded cache scored by accumulated attention."""

    name = "h2o_eviction"

    @classmethod
    def contract(cls, options) -> Contract:
        return Contract(
            requires=frozenset({MODEL_DECODER}),
            ensures=frozenset({CACHE_POLICY, EVICTS_SINGLE_TOKENS, EVICTS_ALL_LAYERS_ALIKE, ATTENTION_PROBABILITIES}),
            conflicts={CACHE_QUANTIZED: "eviction over a quantised cache is not supported yet",
                       SPARSE_PREFILL: "block_sparse prefill cannot report the attention scores that H2O eviction "
                                       "needs"})

    @classmethod
    def declared_perplexity_budget(cls, options) -> float | None:
        return PERPLEXITY_BUDGET

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Make each layer's attention probabilities a graph output (Attention's qk_matmul_output,
        mode 3 = after softmax) so that the runtime can score cached tokens."""
        o = self.options
        graph = model.graph
        outputs = {v.name for v in graph.outputs}
        info = self.context.decoder
        if info.context and o.budget is not None and o.budget >= info.context:
            raise PassConfigError("budget", f"budget ({o.budget}) is not below the model's trained context "
                                            f"({info.context}): within it nothing would ever be evicted")
        todo = [layer for layer in info.layers if attention_output(layer.index) not in outputs]
        if not todo:
            return ir.passes.PassResult(model, False)  # already rewritten
        nodes = {n.name: n for n in graph}
        for layer in todo:
            old = nodes[layer.attention]
            attrs = [a for k, a in old.attributes.items() if k != "qk_matmul_output_mode"]
            attrs.append(ir.AttrInt64("qk_matmul_output_mode", 3))
            query = old.inputs[0]
            if query.shape is None and old.inputs[1].shape is not None and old.inputs[1].shape.rank() == 4:
                # onnx's Attention shape inference gives the probabilities output rank 0 when the
                # query's shape is unknown (GPT-J's exports: Q comes from an untyped Cast), which
                # then clashes with the declared rank-4 output: the query is [batch, heads, seq, head_dim]
                query.type = query.type or old.inputs[1].type
                query.shape = ir.Shape(["batch", info.num_heads, "sequence_length", info.head_dim])
            new = ir.Node("", "Attention", list(old.inputs), attributes=attrs, num_outputs=4, name=old.name)
            replace_keeping_output(graph, old, new)
            new.outputs[3].name = attention_output(layer.index)
            new.outputs[3].type = ir.TensorType(ir.DataType.FLOAT)
            new.outputs[3].shape = ir.Shape(["batch", info.num_heads, "sequence_length", "total_sequence_length"])
            graph.outputs.append(new.outputs[3])
        self.context.runtime.update_cache(policy=H2OPolicy(o.sinks, o.recent, o.budget, o.ratio, o.score))
        return ir.passes.PassResult(model, True)
