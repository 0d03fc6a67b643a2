"""kv_quantize: store the KV cache as int8 / int4, dequantised inside the graph.

`scales: dynamic` (default, KIVI): the pass replaces each float cache input
`past_key_values.{i}.{key,value}` by the compressed tensors the runtime keeps (see
optc/runtime/cache/kivi.py for their layout: scales computed per group as tokens arrive) and a
dequantisation subgraph whose result feeds the same Concat as before, so attention is unchanged
apart from the quantisation error of cached tokens.

`scales: static` (int8 only): one fixed scale per layer, KV head and channel, calibrated on text;
the cache is int8 per element, the layout ONNX Runtime's GroupQueryAttention keeps in place on the
fused path (passes/kv_cache/static_int8.py). Either way the pass asks the runtime (manifest
`kv_cache`) to store the cache compressed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir import tape
from pydantic import Field, field_validator, model_validator

from optc.calibration import CalibrationOptions
from optc.config import PassOptions, no_float
from optc.passes.base import (CACHE_POLICY, CACHE_QUANTIZED, EVICTS_SINGLE_TOKENS, KEY_GROUPS_SPAN_TOKENS,
                              LAYERS_ROUTED, MODEL_DECODER, TOKENS_DROPPED, Contract, OptcPass, PassConfigError)
from optc.passes.rules.builders import const
from optc.passes.rules.layers import dequantized_name
from optc.runtime.manifest import (KEY_QUANT_PER_CHANNEL, KV_KINDS, LAYOUT_INT8, LAYOUT_KIVI, KiviSpec,
                                   kivi_input, past_name)

# the budgets: int8 <= +1%, int4 <= +5%
PERPLEXITY_BUDGET = {8: 0.01, 4: 0.05}


class KVQuantizeOptions(PassOptions):
    bits: Literal[4, 8] = Field(description="bits per cached key/value element")
    bits_is_an_integer = field_validator("bits", mode="before")(no_float)
    group_size: int = Field(64, gt=0, description="tokens per key-scale group; channels per value-scale group "
                                                  "(capped at head_dim)")
    residual: int = Field(32, ge=0, description="newest tokens kept in full precision")
    symmetric: bool | None = Field(None, description="symmetric quantisation (default: yes for 8 bits, no for 4)")
    key_quant: Literal["per_channel", "per_token"] = Field(
        KEY_QUANT_PER_CHANNEL, description="key scales per channel over token groups (KIVI) or per token; per_token "
                                           "keys can be evicted one by one (needed with sink_window)")
    scales: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: KIVI, scales computed per group as tokens arrive (int8/int4, any cache "
                               "policy); static: int8 with a fixed scale per layer, KV head and channel calibrated on "
                               "text, which ONNX Runtime's fused path keeps in place (a plain cache only)")
    calibration: CalibrationOptions = Field(CalibrationOptions(), description="scales: static: text, samples, length")

    @model_validator(mode="after")
    def _static_takes_its_own_options(self):
        kivi_only = {"group_size", "residual", "symmetric", "key_quant"} & self.model_fields_set
        if self.scales == "static":
            if self.bits != 8:
                raise ValueError("scales: static stores int8 (bits: 8)")
            if kivi_only:
                raise ValueError(f"{', '.join(sorted(kivi_only))}: KIVI's options (scales: dynamic); a static cache "
                                 f"has one scale per layer, KV head and channel")
        elif "calibration" in self.model_fields_set:
            raise ValueError("calibration: only scales: static calibrates")
        return self


class KVQuantize(OptcPass):
    """Quantise the KV cache: KIVI int8/int4 (keys per channel, values per token), or int8 with static scales."""

    name = "kv_quantize"

    @classmethod
    def contract(cls, options: KVQuantizeOptions) -> Contract:
        if options.scales == "static":
            why = "scales: static keeps a plain int8 cache, in place on ONNX Runtime's fused path (use scales: dynamic)"
            return Contract(requires=frozenset({MODEL_DECODER}), ensures=frozenset({CACHE_QUANTIZED}),
                            conflicts={CACHE_POLICY: f"the policy evicts or moves cached tokens; {why}",
                                       TOKENS_DROPPED: f"its later layers keep caches of their own length; {why}",
                                       LAYERS_ROUTED: f"a skipped layer's cache stops; {why}"})
        ensures = {CACHE_QUANTIZED}
        conflicts = {}
        if options.key_quant == KEY_QUANT_PER_CHANNEL:
            ensures.add(KEY_GROUPS_SPAN_TOKENS)
            conflicts[EVICTS_SINGLE_TOKENS] = ("one evicts single tokens, which the other's per-channel key groups "
                                               "cannot give up (set key_quant: per_token)")
        # the runtime quantises a group once the float residual reaches residual + group_size tokens
        return Contract(requires=frozenset({MODEL_DECODER}), ensures=frozenset(ensures), conflicts=conflicts,
                        cache_needs=options.residual + options.group_size)

    @classmethod
    def declared_perplexity_budget(cls, options: KVQuantizeOptions) -> float | None:
        return PERPLEXITY_BUDGET[options.bits]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: KVQuantizeOptions = self.options
        if o.scales == "static":
            return self._static(model)
        info = self.context.decoder
        D, H = info.head_dim, info.kv_heads
        if o.bits == 4 and D % 2:
            raise PassConfigError("bits", f"int4 packing needs an even head_dim (model has {D})")
        channel_group = min(o.group_size, D)
        if D % channel_group:
            raise PassConfigError("group_size", f"{o.group_size} does not divide head_dim {D}")
        if info.context and o.residual + o.group_size > info.context:
            # the cache would never hold a quantised group: it would claim KIVI and store float
            raise PassConfigError("residual", f"residual + group_size ({o.residual + o.group_size}) exceeds the "
                                              f"model's trained context ({info.context}): nothing would ever be "
                                              f"stored quantised")
        symmetric = o.bits == 8 if o.symmetric is None else o.symmetric
        per_channel_keys = o.key_quant == KEY_QUANT_PER_CHANNEL
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        changed = 0
        for layer in range(info.n_layers):
            for kind in KV_KINDS:
                past = inputs.get(past_name(layer, kind))
                if past is None:
                    continue  # already compressed (a second run) or not a float cache
                full = dequant_subgraph(graph, past.name, kind == "key" and per_channel_keys, H, D, o.bits,
                                        o.group_size, channel_group, symmetric)
                ir.convenience.replace_all_uses_with(past, full)
                graph.inputs.remove(past)
                changed += 1
        if not changed:
            return ir.passes.PassResult(model, False)
        ir.passes.common.TopologicalSortPass()(model)
        self.context.runtime.update_cache(layout=LAYOUT_KIVI,
                                          kivi=KiviSpec(o.bits, o.group_size, o.residual, symmetric, o.key_quant))
        return ir.passes.PassResult(model, True)

    def _static(self, model: ir.Model) -> ir.passes.PassResult:
        from optc.calibration import calibration_windows, channel_stats
        from optc.passes.kv_cache.static_int8 import (calibration_values, rewrite_static, rotary_partner,
                                                      scales_from_absmax)

        o: KVQuantizeOptions = self.options
        info = self.context.decoder
        graph = model.graph
        float_cache = {past_name(layer.index, kind) for layer in info.layers for kind in KV_KINDS}
        if not any(v.name in float_cache and v.dtype == ir.DataType.FLOAT for v in graph.inputs):
            return ir.passes.PassResult(model, False)  # already quantised (a second run)
        stored = calibration_values(model, info)
        names = {key: v.name for key, v in stored.items()}
        windows = calibration_windows("kv_quantize (scales: static)", self.context.tokenizer, o.calibration.text,
                                      samples=o.calibration.samples, length=o.calibration.length,
                                      bos=self.context.bos_token_id)
        self.context.log(f"  kv_quantize: calibrating {len(names)} cache tensors' scales on {len(windows)} windows "
                         f"({sum(len(w) for w in windows):,} tokens)")
        stats = channel_stats(model, sorted(set(names.values())), windows, label="kv_quantize calibration",
                              sample=set(), channel_axes=(1, 3))
        scales = {key: scales_from_absmax(stats[name].absmax, info.kv_heads, info.head_dim,
                                          rotary_partner(stored[key].producer(), info.head_dim) if key[1] == "key"
                                          else None)
                  for key, name in names.items()}
        changed = rewrite_static(model, info, scales)
        ir.passes.common.TopologicalSortPass()(model)
        self.context.runtime.update_cache(layout=LAYOUT_INT8)
        self.context.reports.setdefault(self.name, []).append({
            "scales": "static", "calibration_tokens": sum(len(w) for w in windows),
            "absmax": {f"{layer}.{kind}": round(float(stats[names[(layer, kind)]].absmax.max()), 4)
                       for layer, kind in sorted(names)}})
        return ir.passes.PassResult(model, changed > 0)


def dequant_subgraph(graph, base, per_channel, H, D, bits, group, channel_group, symmetric) -> ir.Value:
    """Dequantisation of one cache tensor; `per_channel`: scales per channel over groups of
    `group` tokens (KIVI keys), else per token over groups of `channel_group` channels."""
    dq = D if bits == 8 else D // 2
    q_len = f"{base}.q_len"
    q = ir.val(kivi_input(base, "q"), ir.DataType.UINT8, ["batch", H, q_len, dq])
    scale_shape = (["batch", H, f"{base}.groups", D] if per_channel
                   else ["batch", H, q_len, D // channel_group])
    scale = ir.val(kivi_input(base, "scale"), ir.DataType.FLOAT16, scale_shape)
    zero = None if symmetric else ir.val(kivi_input(base, "zero"), ir.DataType.FLOAT16, scale_shape)
    residual = ir.val(kivi_input(base, "residual"), ir.DataType.FLOAT, ["batch", H, f"{base}.residual_len", D])
    graph.inputs.extend([v for v in (q, scale, zero, residual) if v is not None])

    t = tape.Tape()
    x = q
    if bits == 4:  # two values per byte: element 2j in the low nibble, 2j+1 in the high one
        lo = t.op("BitwiseAnd", [q, const(t, np.uint8(15))])
        hi = t.op("BitShift", [q, const(t, np.uint8(4))], {"direction": "RIGHT"})
        axis = const(t, np.array([-1], np.int64))
        pairs = t.op("Concat", [t.op("Unsqueeze", [lo, axis]), t.op("Unsqueeze", [hi, axis])], {"axis": -1})
        x = t.op("Reshape", [pairs, const(t, np.array([0, 0, 0, D], np.int64))])
    x = t.op("Cast", [x], {"to": ir.DataType.FLOAT})
    if symmetric:
        x = t.op("Sub", [x, const(t, np.float32(1 << (bits - 1)))])
    if per_channel:  # [B,H,Q,D] -> [B,H,Q/G,G,D]; scale [B,H,Q/G,D] -> [B,H,Q/G,1,D]
        grouped = t.op("Reshape", [x, const(t, np.array([0, 0, -1, group, D], np.int64))])
        expand_axis = const(t, np.array([3], np.int64))
    else:  # [B,H,Q,D] -> [B,H,Q,D/Gc,Gc]; scale [B,H,Q,D/Gc] -> [B,H,Q,D/Gc,1]
        grouped = t.op("Reshape", [x, const(t, np.array([0, 0, 0, D // channel_group, channel_group], np.int64))])
        expand_axis = const(t, np.array([4], np.int64))
    s = t.op("Unsqueeze", [t.op("Cast", [scale], {"to": ir.DataType.FLOAT}), expand_axis])
    y = t.op("Mul", [grouped, s])
    if zero is not None:
        y = t.op("Add", [y, t.op("Unsqueeze", [t.op("Cast", [zero], {"to": ir.DataType.FLOAT}), expand_axis])])
    deq = t.op("Reshape", [y, const(t, np.array([0, 0, -1, D], np.int64))])
    full = t.op("Concat", [deq, residual], {"axis": 2})
    full.name = dequantized_name(base)
    for i, node in enumerate(t.nodes):
        node.name = f"{base}/kv_dequant/{i}"
    graph.extend(t.nodes)
    return full
