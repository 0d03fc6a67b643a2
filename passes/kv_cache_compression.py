"""kv_cache_compression: store the KV cache as int8 / int4 (KIVI), dequantised inside the graph.

The pass replaces each float cache input `past_key_values.{i}.{key,value}` by the compressed
tensors the runtime keeps (see optc/runtime/kv_quant.py for their layout) and a dequantisation
subgraph whose result feeds the same Concat as before, so attention is unchanged apart from the
quantisation error of cached tokens. It records the cache layout for the manifest (`kv_cache`),
which tells the runtime to store the cache compressed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir import tape
from pydantic import Field, field_validator, model_validator

from optc.config import PassOptions, Strict
from optc.passes.base import OptcPass, PassConfigError


class EvictionOptions(Strict):
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


class KVCacheCompressionOptions(PassOptions):
    bits: Literal[4, 8] | None = Field(None, description="bits per cached key/value element (None: keep fp32)")
    eviction: EvictionOptions | None = Field(None, description="evict low-attention tokens (H2O)")
    group_size: int = Field(64, gt=0, description="tokens per key-scale group; channels per value-scale group "
                                                  "(capped at head_dim)")
    residual: int = Field(32, ge=0, description="newest tokens kept in full precision")
    symmetric: bool | None = Field(None, description="symmetric quantisation (default: yes for 8 bits, no for 4)")
    key_quant: Literal["per_channel", "per_token"] = Field(
        "per_channel", description="key scales per channel over token groups (KIVI) or per token; per_token "
                                   "keys can be evicted one by one (needed with sparse_attention sink_window)")

    @model_validator(mode="after")
    def _something_to_do(self):
        if self.bits is None and self.eviction is None:
            raise ValueError("set bits (quantisation), eviction, or both")
        return self


def _const(t: tape.Tape, array) -> ir.Value:
    return t.op("Constant", [], {"value": ir.tensor(np.asarray(array))})


class KVCacheCompression(OptcPass):
    """Quantise the KV cache to int8/int4 (keys per channel, values per token, KIVI)."""

    name = "kv_cache_compression"

    @classmethod
    def declared_perplexity_budget(cls, options) -> float | None:
        # the budgets: int8 <= +1%, int4 <= +5%; eviction <= +5%
        return {8: 0.01, 4: 0.05, None: 0.0}[options.bits] + (0.05 if options.eviction else 0.0)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: KVCacheCompressionOptions = self.options
        if o.bits is not None and o.eviction is not None:
            raise PassConfigError("eviction", "eviction over a quantised cache is not supported yet "
                                              "(use bits or eviction)")
        if o.eviction is not None:
            return self._expose_attention(model, o.eviction)
        return self._quantize(model, o)

    def _expose_attention(self, model: ir.Model, ev: EvictionOptions) -> ir.passes.PassResult:
        """Make each layer's attention probabilities a graph output (Attention's qk_matmul_output,
        mode 3 = after softmax) so that the runtime can score cached tokens."""
        graph = model.graph
        outputs = {v.name for v in graph.outputs}
        todo = [layer for layer in self.context.decoder.layers if f"optc.attn.{layer.index}" not in outputs]
        if not todo:
            return ir.passes.PassResult(model, False)  # already rewritten
        kv = self.context.runtime.setdefault("kv_cache", {})
        if "policy" in kv:
            raise PassConfigError("eviction", f"the cache already has a {kv['policy']['kind']} policy")
        nodes = {n.name: n for n in graph}
        for layer in todo:
            name = f"optc.attn.{layer.index}"
            old = nodes[layer.attention]
            attrs = [a for k, a in old.attributes.items() if k != "qk_matmul_output_mode"]
            attrs.append(ir.AttrInt64("qk_matmul_output_mode", 3))
            new = ir.Node("", "Attention", list(old.inputs), attributes=attrs, num_outputs=4, name=old.name)
            ir.convenience.replace_all_uses_with(old.outputs[0], new.outputs[0])
            out_name, out_shape, out_type = old.outputs[0].name, old.outputs[0].shape, old.outputs[0].type
            graph.insert_after(old, new)
            graph.remove(old, safe=True)
            new.outputs[0].name, new.outputs[0].shape, new.outputs[0].type = out_name, out_shape, out_type
            new.outputs[3].name = name
            new.outputs[3].type = ir.TensorType(ir.DataType.FLOAT)
            new.outputs[3].shape = ir.Shape(["batch", self.context.decoder.num_heads, "sequence_length",
                                             "total_sequence_length"])
            graph.outputs.append(new.outputs[3])
        kv["policy"] = {"kind": "h2o", **ev.model_dump(exclude={"score"}), "score": ev.score}
        return ir.passes.PassResult(model, True)

    def _quantize(self, model: ir.Model, o: KVCacheCompressionOptions) -> ir.passes.PassResult:
        info = self.context.decoder
        D, H = info.head_dim, info.kv_heads
        if o.bits == 4 and D % 2:
            raise PassConfigError("bits", f"int4 packing needs an even head_dim (model has {D})")
        channel_group = min(o.group_size, D)
        if D % channel_group:
            raise PassConfigError("group_size", f"{o.group_size} does not divide head_dim {D}")
        symmetric = o.bits == 8 if o.symmetric is None else o.symmetric
        policy = self.context.runtime.get("kv_cache", {}).get("policy")
        if policy and policy["kind"] != "sink_window":
            raise PassConfigError("bits", f"compressing a cache with a {policy['kind']} eviction policy is "
                                          f"not supported yet")
        if policy and o.key_quant != "per_token":
            raise PassConfigError("key_quant", "sink_window evicts single tokens, which per-channel key groups "
                                               "cannot give up: set key_quant: per_token")
        per_channel_keys = o.key_quant == "per_channel"
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        changed = 0
        for layer in range(info.n_layers):
            for kind in ("key", "value"):
                past = inputs.get(f"past_key_values.{layer}.{kind}")
                if past is None:
                    continue  # already compressed (a second run) or not a float cache
                full = self._dequant_subgraph(graph, past.name, kind == "key" and per_channel_keys, H, D, o.bits,
                                              o.group_size, channel_group, symmetric)
                ir.convenience.replace_all_uses_with(past, full)
                graph.inputs.remove(past)
                changed += 1
        if not changed:
            return ir.passes.PassResult(model, False)
        ir.passes.common.TopologicalSortPass()(model)
        kv = self.context.runtime.setdefault("kv_cache", {})
        kv.update({"layout": "kivi", "bits": o.bits, "group_size": o.group_size, "residual": o.residual,
                   "symmetric": symmetric, "key_quant": o.key_quant})
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _dequant_subgraph(graph, base, per_channel, H, D, bits, group, channel_group, symmetric) -> ir.Value:
        """Dequantisation of one cache tensor; `per_channel`: scales per channel over groups of
        `group` tokens (KIVI keys), else per token over groups of `channel_group` channels."""
        dq = D if bits == 8 else D // 2
        q_len = f"{base}.q_len"
        q = ir.val(f"{base}.q", ir.DataType.UINT8, ["batch", H, q_len, dq])
        scale_shape = (["batch", H, f"{base}.groups", D] if per_channel
                       else ["batch", H, q_len, D // channel_group])
        scale = ir.val(f"{base}.scale", ir.DataType.FLOAT16, scale_shape)
        zero = None if symmetric else ir.val(f"{base}.zero", ir.DataType.FLOAT16, scale_shape)
        residual = ir.val(f"{base}.residual", ir.DataType.FLOAT, ["batch", H, f"{base}.residual_len", D])
        graph.inputs.extend([v for v in (q, scale, zero, residual) if v is not None])

        t = tape.Tape()
        x = q
        if bits == 4:  # two values per byte: element 2j in the low nibble, 2j+1 in the high one
            lo = t.op("BitwiseAnd", [q, _const(t, np.uint8(15))])
            hi = t.op("BitShift", [q, _const(t, np.uint8(4))], {"direction": "RIGHT"})
            axis = _const(t, np.array([-1], np.int64))
            pairs = t.op("Concat", [t.op("Unsqueeze", [lo, axis]), t.op("Unsqueeze", [hi, axis])], {"axis": -1})
            x = t.op("Reshape", [pairs, _const(t, np.array([0, 0, 0, D], np.int64))])
        x = t.op("Cast", [x], {"to": ir.DataType.FLOAT})
        if symmetric:
            x = t.op("Sub", [x, _const(t, np.float32(1 << (bits - 1)))])
        if per_channel:  # [B,H,Q,D] -> [B,H,Q/G,G,D]; scale [B,H,Q/G,D] -> [B,H,Q/G,1,D]
            grouped = t.op("Reshape", [x, _const(t, np.array([0, 0, -1, group, D], np.int64))])
            expand_axis = _const(t, np.array([3], np.int64))
        else:  # [B,H,Q,D] -> [B,H,Q,D/Gc,Gc]; scale [B,H,Q,D/Gc] -> [B,H,Q,D/Gc,1]
            grouped = t.op("Reshape", [x, _const(t, np.array([0, 0, 0, D // channel_group, channel_group], np.int64))])
            expand_axis = _const(t, np.array([4], np.int64))
        s = t.op("Unsqueeze", [t.op("Cast", [scale], {"to": ir.DataType.FLOAT}), expand_axis])
        y = t.op("Mul", [grouped, s])
        if zero is not None:
            y = t.op("Add", [y, t.op("Unsqueeze", [t.op("Cast", [zero], {"to": ir.DataType.FLOAT}), expand_axis])])
        deq = t.op("Reshape", [y, _const(t, np.array([0, 0, -1, D], np.int64))])
        full = t.op("Concat", [deq, residual], {"axis": 2})
        full.name = f"{base}.dequantized"
        for i, node in enumerate(t.nodes):
            node.name = f"{base}/kv_dequant/{i}"
        graph.extend(t.nodes)
        return full
