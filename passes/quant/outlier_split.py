"""outlier_split: W8A8 MatMuls with the activation-outlier channels computed in float beside them
(LLM.int8()'s mixed-precision decomposition; mllm-NPU's "shadow outlier execution").

A few input channels of a transformer's linear layers carry activations tens of times larger than
the rest. Quantising such an activation per tensor to int8 spends the whole code range on those
channels, and every other channel loses its precision. Split them off:

    Y = A @ W  =  A[..., R] @ W[R, :]   (int8 x int8: the NPU's part)
               +  A[..., O] @ W[O, :]   (float: the few outlier channels, a separate branch)

`O` are the channels whose calibrated absmax exceeds `outlier_threshold`, or the top
`outlier_fraction` of them by absmax (default: the top 1%); `R` the rest. With `min_range_share`,
only activations whose outliers take at least that share of the calibrated range are split (the
others are naive W8A8: on the CPU each float branch costs kernels per decode step). Calibration runs the graph on shipped text
(`optc.calibration`) and records every quantised MatMul input's per-channel absmax.

The int8 part is in the standard QDQ form that ONNX Runtime's CPU EP and NPU execution providers
(QNN) recognise:

    QuantizeLinear(A, s_a, 128:uint8) -> DequantizeLinear ------------\\
    W_q:int8 [K, N] (rows O zero) -> DequantizeLinear(s_w [N], axis 1) -> MatMul -> Add -> Y
    Gather(A, O, axis=-1) -> MatMul(W[O, :] float) -----------------------------------/

with int8 weights symmetric per output channel (the scale from the R rows only) and int8
activations symmetric per tensor, with a static scale from the calibrated absmax over R (stored as
uint8 with zero point 128: the same values, in the form ONNX Runtime's x86 kernels fuse into
MatMulIntegerToFloat and QNN's HTP prefers). The
outlier channels of A saturate in QuantizeLinear, but meet zero weight rows, so they contribute
nothing there: no mask is needed, and with every channel an outlier the split equals the float
MatMul exactly. `outlier_fraction: 0` is naive W8A8 (no split), the baseline the split is
measured against.

`activations: per_token` quantises each token's row with its own scale, computed at run time over
the R channels, and multiplies with `MatMulInteger` (int8 x int8 -> int32) before rescaling.

MatMuls that read the same activation (q/k/v, gate/up) share its outlier set, its QuantizeLinear
and its Gather. What is not touched, and how `skip` works, is as in weight_quant: the embedding
Gather, MatMuls between activations, `skip: [lm_head]` or fnmatch globs on node/weight names, and a
skip entry that matches nothing is an error.

Report (logged; the compile writes it into the manifest's `pass_reports`): per activation, the
outlier channels and their share of the activation range (how much larger the per-tensor scale
would be with them), and per MatMul the relative error of its output on calibration rows with
and without the split.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator, model_validator

from optc.calibration import CalibrationOptions
from optc.config import PassOptions
from optc.passes.base import LAYERS_ROUTED, ROUTED_MATMULS, Contract, OptcPass
from optc.passes.quant.weight_quant import (WEIGHTS_QUANTIZED, _constant_weight, _rank_ok,
                                             apply_skip, check_skip_patterns)
from optc.passes.rules.builders import replace_keeping_output
from optc.runtime.manifest import FLOAT_BRANCH_KEY

OUTLIER_SPLIT = "weights.qdq_int8"
QMAX = 127
# Activation codes are symmetric int8 values stored as uint8 with zero point 128 (code = q + 128),
# the same numbers: ONNX Runtime's x86 kernels take uint8 activations (its S8->U8 rewrite of an
# int8 QuantizeLinear gives up on one read by several MatMuls: q/k/v stayed float), and QNN's HTP
# prefers uint8 activations too.
ACTIVATION_ZERO_POINT = 128
# activation_bits: 8 as above; 16 as uint16 around 32768 (QNN HTP's A16W8)
ACTIVATION_QMAX = {8: QMAX, 16: 32767}
ACTIVATION_ZERO_POINTS = {8: np.asarray(ACTIVATION_ZERO_POINT, np.uint8), 16: np.asarray(32768, np.uint16)}
# Neither option given: the top 1% of each activation's channels. Measured (docs/benchmarks.md):
# LLM.int8()'s absolute threshold 6 sends 60-98% of pycoder-v2's MLP-down inputs to float (they are
# large everywhere), which costs the speed; 1% met the accuracy goals on both reference models.
DEFAULT_FRACTION = 0.01


class OutlierSplitOptions(PassOptions):
    weights: Literal["int8"] = Field("int8", description="weight codes (int8, symmetric per output channel)")
    activations: Literal["per_tensor", "per_token"] = Field(
        "per_tensor", description="activation scales: per_tensor (static, calibrated; what NPUs want) or "
                                  "per_token (computed per row at run time)")
    outlier_threshold: float | None = Field(
        None, ge=0, description="channels whose calibrated absmax exceeds this run in float (LLM.int8(): 6)")
    outlier_fraction: float | None = Field(
        None, ge=0, le=1, description=f"or: this fraction of each activation's channels, largest absmax first, "
                                      f"runs in float (0 = naive W8A8, no split; default {DEFAULT_FRACTION} when "
                                      f"neither is given)")
    min_range_share: float = Field(
        0.0, ge=0, lt=1, description="split an activation only where its outlier channels take at least this share "
                                     "of its calibrated range (fewer float branches: each costs kernels per step on "
                                     "the CPU); the others are naive W8A8. 0 = split every activation")
    skip: list[str] = Field([], description="MatMuls to keep in float: 'lm_head' or fnmatch globs on node or "
                                            "weight names")
    quantize_outputs: bool = Field(
        False, description="also quantise each int8 MatMul's output per tensor (calibrated scale): a whole QDQ "
                           "unit DQ -> MatMul -> Q, which NPU execution providers (QNN HTP) need to run it in int8")
    activation_bits: Literal[8, 16] = Field(
        8, description="per_tensor activation (and output) codes: 8 bits (uint8 around 128) or 16 (uint16 around "
                       "32768: QNN HTP's A16W8 units, which keep encoders' wide output ranges)")
    calibration: CalibrationOptions = Field(CalibrationOptions(), description="text, samples, length")

    @model_validator(mode="after")
    def _one_selector(self):
        if self.outlier_threshold is not None and self.outlier_fraction is not None:
            raise ValueError("give outlier_threshold or outlier_fraction, not both")
        if self.activation_bits != 8 and self.activations != "per_tensor":
            raise ValueError("activation_bits: 16 needs activations: per_tensor (per_token codes are int8)")
        if self.quantize_outputs and self.activations != "per_tensor":
            raise ValueError("quantize_outputs needs activations: per_tensor (a per-token MatMul is not a QDQ unit)")
        return self

    @field_validator("skip")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return check_skip_patterns(v)


def outlier_channels(absmax: np.ndarray, threshold: float | None, fraction: float | None) -> np.ndarray:
    """Sorted indices of the outlier channels."""
    if threshold is not None:
        return np.flatnonzero(absmax > threshold).astype(np.int64)
    fraction = DEFAULT_FRACTION if fraction is None else fraction
    n = math.ceil(fraction * len(absmax) - 1e-9)
    return np.sort(np.argsort(-absmax, kind="stable")[:n]).astype(np.int64)


def quantize_weight(w: np.ndarray, outliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (int8 codes [K, N] with the outlier rows zero, scales [N]), symmetric per output
    channel over the other rows. A column with nothing left gets scale 1 (its codes are 0)."""
    w = np.asarray(w, np.float32).copy()
    w[outliers] = 0
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    codes = np.clip(np.round(w / scale), -QMAX, QMAX).astype(np.int8)
    return codes, scale


def activation_scale(absmax: np.ndarray, outliers: np.ndarray, qmax: int = QMAX) -> np.float32:
    keep = np.ones(len(absmax), bool)
    keep[outliers] = False
    amax = float(absmax[keep].max()) if keep.any() else 0.0
    return np.float32(amax / qmax if amax > 0 else 1.0)


def simulate(x: np.ndarray, w: np.ndarray, outliers: np.ndarray, scale_a: np.float32 | None,
             qmax: int = QMAX) -> np.ndarray:
    """What the rewritten MatMul computes on rows x [r, K] (numpy, for the report): per-tensor
    scale_a, or per-row scales when scale_a is None."""
    codes, sw = quantize_weight(w, outliers)
    keep = np.ones(x.shape[1], bool)
    keep[outliers] = False
    if scale_a is None:
        amax = np.abs(np.where(keep, x, 0)).max(axis=1, keepdims=True)
        sa = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    else:
        sa = scale_a
    qa = np.clip(np.round(x / sa), -qmax, qmax) * sa
    y = (qa * keep) @ (codes.astype(np.float32) * sw)
    if len(outliers):
        y = y + x[:, outliers] @ w[outliers]
    return y


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(y - ref) / den) if den > 0 else float(np.linalg.norm(y))


class OutlierSplit(OptcPass):
    """W8A8 QDQ MatMuls with calibrated activation-outlier channels split off in float (LLM.int8())."""

    name = "outlier_split"

    @classmethod
    def contract(cls, options: OutlierSplitOptions) -> Contract:
        return Contract(ensures=frozenset({OUTLIER_SPLIT}),
                        conflicts={WEIGHTS_QUANTIZED: "both quantise the MatMul weights"},
                        precedes={LAYERS_ROUTED: ROUTED_MATMULS})

    @classmethod
    def declared_perplexity_budget(cls, options: OutlierSplitOptions) -> float | None:
        return 0.02

    @classmethod
    def declared_embedding_budget(cls, options: OutlierSplitOptions) -> dict[str, float] | None:
        return {"min_embedding_cosine": 0.995, "min_retrieval_agreement": 0.95}  # issue 19's MiniLM goal

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from optc.calibration import calibration_windows, channel_stats

        o: OutlierSplitOptions = self.options
        graph = model.graph
        todo = self._select(graph)
        self._taken = {v.name for v in graph.inputs} | set(graph.initializers) | \
            {v.name for n in graph for v in n.outputs if v.name} | {n.name for n in graph if n.name}
        if not todo:
            return ir.passes.PassResult(model, False)
        windows = calibration_windows("outlier_split", self.context.tokenizer, o.calibration.text,
                                      samples=o.calibration.samples, length=o.calibration.length,
                                      bos=self.context.bos_token_id)
        groups: dict[ir.Value, list] = {}
        for node, weight in todo:
            groups.setdefault(node.inputs[0], []).append((node, weight))
        for n, a in enumerate(groups):
            if not a.name:
                a.name = f"optc.outlier_split.input.{n}"
        log = self.context.log
        log(f"  outlier_split: calibrating {len(groups)} activations on {len(windows)} windows "
            f"({sum(len(w) for w in windows):,} tokens)")
        outputs = [node.outputs[0].name for node, _ in todo] if o.quantize_outputs else []
        stats = channel_stats(model, [a.name for a in groups] + outputs, windows, label="outlier_split calibration",
                              sample={a.name for a in groups})

        report = {"activations": o.activations, "calibration_tokens": sum(len(w) for w in windows), "layers": []}
        replaced_transposes = []
        sources = set()
        for a, users in groups.items():
            st = stats[a.name]
            outliers = outlier_channels(st.absmax, o.outlier_threshold, o.outlier_fraction)
            qa = ACTIVATION_QMAX[o.activation_bits]
            scale_a = activation_scale(st.absmax, outliers, qa)
            amax_all = float(st.absmax.max())
            entry = {"input": a.name, "channels": int(len(st.absmax)), "outlier_channels": outliers.tolist(),
                     "absmax": round(amax_all, 4),
                     "absmax_without_outliers": round(float(scale_a) * qa, 4) if len(outliers) < len(st.absmax)
                     else 0.0,
                     "matmuls": []}
            # their share of the range: how much of the per-tensor int8 range the outliers take
            share = 1.0 - float(scale_a) * qa / amax_all if amax_all > 0 and len(outliers) < len(st.absmax) else 1.0
            entry["outlier_range_share"] = round(share, 4) if amax_all > 0 and len(outliers) else 0.0
            if len(outliers) and share < o.min_range_share:  # not worth a float branch: naive W8A8 here
                entry["kept_in_int8"] = entry.pop("outlier_channels")
                entry["outlier_channels"] = []
                outliers = np.zeros(0, np.int64)
                scale_a = activation_scale(st.absmax, outliers, qa)
            shared = self._activation_nodes(graph, a, len(st.absmax), outliers, scale_a)
            for node, (source, transposed, transpose_node) in users:
                w = source.const_value.numpy().astype(np.float32)
                w = w.T if transposed else w
                x = st.rows
                ref = x @ w
                naive_scale = np.float32(amax_all / qa if amax_all > 0 else 1.0)
                none = np.zeros(0, np.int64)
                err_split = relative_error(simulate(x, w, outliers, None if o.activations == "per_token" else scale_a,
                                                    qa), ref)
                err_naive = relative_error(simulate(x, w, none, None if o.activations == "per_token" else naive_scale,
                                                    qa), ref)
                entry["matmuls"].append({"node": node.name, "weight": source.name, "shape": list(w.shape),
                                         "rel_error_split": round(err_split, 6),
                                         "rel_error_naive": round(err_naive, 6)})
                out_scale = None
                if o.quantize_outputs:  # the int8 part's range: the calibrated output's, or more on the sample
                    y_r = simulate(x, w, outliers, scale_a, qa) - (x[:, outliers] @ w[outliers] if len(outliers) else 0)
                    amax = max(float(stats[node.outputs[0].name].absmax.max()), float(np.abs(y_r).max(initial=0)))
                    out_scale = np.float32(amax / qa if amax > 0 else 1.0)
                self._rewrite(graph, node, w, source.name + (".T" if transposed else ""), outliers, shared, out_scale)
                replaced_transposes.append(transpose_node)
                sources.add(source.name)
            report["layers"].append(entry)
        for t in replaced_transposes:
            if t is not None and t.graph is graph and not t.outputs[0].uses():
                graph.remove(t, safe=True)
        for name in sources:
            v = graph.initializers[name]
            if not v.uses() and v not in graph.outputs:
                del graph.initializers[name]
        self.context.reports.setdefault(self.name, []).append(report)
        for line in format_report(report):
            log(line)
        return ir.passes.PassResult(model, True)

    # -------------------------------------------------------------- selection
    def _select(self, graph: ir.Graph) -> list:
        o: OutlierSplitOptions = self.options
        candidates = [(n, w) for n in graph if n.op_type == "MatMul" and n.domain == ""
                      and FLOAT_BRANCH_KEY not in n.metadata_props
                      and (w := _constant_weight(graph, n)) is not None and w[0].dtype == ir.DataType.FLOAT
                      and _rank_ok(n.inputs[0])]
        return apply_skip(graph, candidates, o.skip, "constant-weight float MatMul (node or weight names)")

    # -------------------------------------------------------------- graph building
    def _unique(self, name: str) -> str:
        out, n = name, 1
        while out in self._taken:
            n += 1
            out = f"{name}.{n}"
        self._taken.add(out)
        return out

    def _init(self, graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
        name = self._unique(name)
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr, name=name))
        graph.register_initializer(v)
        return v

    def _node(self, graph: ir.Graph, anchor: ir.Node, op: str, inputs, name: str, attributes=()):
        node = ir.Node("", op, inputs, attributes=list(attributes), name=self._unique(name))
        graph.insert_before(anchor, node)
        node.outputs[0].name = self._unique(node.name + ":0")
        return node.outputs[0]

    def _activation_nodes(self, graph, a: ir.Value, channels: int, outliers: np.ndarray, scale_a) -> dict:
        """What the MatMuls reading `a` share: its quantised codes (per tensor) or its per-row
        codes and scales (per token), and the Gather of its outlier channels."""
        o: OutlierSplitOptions = self.options
        base = f"{a.name}/outlier_split"
        out: dict = {}
        # nodes go before the first user of `a` in graph order, which every user follows
        first = next(n for n in graph if any(v is a for v in n.inputs))
        if o.activations == "per_tensor":
            s = self._init(graph, f"{base}.scale", np.asarray(scale_a, np.float32))
            zp = self._init(graph, f"{base}.zero_point", ACTIVATION_ZERO_POINTS[o.activation_bits])
            out["q"] = self._node(graph, first, "QuantizeLinear", [a, s, zp], f"{base}/quantize")
            out["s"], out["zp"] = s, zp
        else:
            keep = np.ones(channels, np.float32)
            keep[outliers] = 0
            mask = self._init(graph, f"{base}.keep", keep)
            masked = self._node(graph, first, "Mul", [a, mask], f"{base}/mask")
            absx = self._node(graph, first, "Abs", [masked], f"{base}/abs")
            axes = self._init(graph, f"{base}.axes", np.asarray([-1], np.int64))
            amax = self._node(graph, first, "ReduceMax", [absx, axes], f"{base}/amax",
                              [ir.AttrInt64("keepdims", 1)])
            inv = self._init(graph, f"{base}.inv_qmax", np.asarray(1.0 / QMAX, np.float32))
            scale = self._node(graph, first, "Mul", [amax, inv], f"{base}/scale_raw")
            tiny = self._init(graph, f"{base}.tiny", np.asarray(1e-30, np.float32))
            scale = self._node(graph, first, "Max", [scale, tiny], f"{base}/scale")
            ratio = self._node(graph, first, "Div", [masked, scale], f"{base}/div")
            rounded = self._node(graph, first, "Round", [ratio], f"{base}/round")
            lo = self._init(graph, f"{base}.lo", np.asarray(-QMAX, np.float32))
            hi = self._init(graph, f"{base}.hi", np.asarray(QMAX, np.float32))
            clipped = self._node(graph, first, "Clip", [rounded, lo, hi], f"{base}/clip")
            out["q"] = self._node(graph, first, "Cast", [clipped], f"{base}/codes",
                                  [ir.AttrInt64("to", ir.DataType.INT8)])
            out["row_scale"] = scale
        if len(outliers):
            idx = self._init(graph, f"{base}.outlier_channels", outliers)
            out["gather"] = self._node(graph, first, "Gather", [a, idx], f"{base}/outliers",
                                       [ir.AttrInt64("axis", -1)])
        return out

    def _rewrite(self, graph, node: ir.Node, w: np.ndarray, wname: str, outliers: np.ndarray, shared: dict,
                 out_scale=None) -> None:
        o: OutlierSplitOptions = self.options
        codes, sw = quantize_weight(w, outliers)
        base = f"{node.name}/outlier_split"
        wq = self._init(graph, f"{wname}.int8", codes)
        if o.activations == "per_tensor":
            ws = self._init(graph, f"{wname}.int8.scale", sw)
            wz = self._init(graph, f"{wname}.int8.zero_point", np.zeros(len(sw), np.int8))
            adq = self._node(graph, node, "DequantizeLinear", [shared["q"], shared["s"], shared["zp"]],
                             f"{base}/dequantize_input")
            wdq = self._node(graph, node, "DequantizeLinear", [wq, ws, wz], f"{base}/dequantize_weight",
                             [ir.AttrInt64("axis", 1)])
            y = self._node(graph, node, "MatMul", [adq, wdq], f"{base}/int8_matmul")
            if out_scale is not None:
                so = self._init(graph, f"{base}.output_scale", np.asarray(out_scale, np.float32))
                zo = self._init(graph, f"{base}.output_zero_point", ACTIVATION_ZERO_POINTS[o.activation_bits])
                yq = self._node(graph, node, "QuantizeLinear", [y, so, zo], f"{base}/quantize_output")
                y = self._node(graph, node, "DequantizeLinear", [yq, so, zo], f"{base}/dequantize_output")
        else:
            acc = self._node(graph, node, "MatMulInteger", [shared["q"], wq], f"{base}/int8_matmul")
            accf = self._node(graph, node, "Cast", [acc], f"{base}/to_float", [ir.AttrInt64("to", ir.DataType.FLOAT)])
            ws = self._init(graph, f"{wname}.int8.scale", sw)
            y = self._node(graph, node, "Mul", [accf, ws], f"{base}/weight_scale")
            y = self._node(graph, node, "Mul", [y, shared["row_scale"]], f"{base}/row_scale")
        if len(outliers):
            wo = self._init(graph, f"{wname}.outlier_rows", np.ascontiguousarray(w[outliers]))
            yo = self._node(graph, node, "MatMul", [shared["gather"], wo], f"{base}/outlier_matmul")
            yo.producer().metadata_props[FLOAT_BRANCH_KEY] = "outlier channels"  # not quantised by a rerun
            final = ir.Node("", "Add", [y, yo], name=self._unique(f"{base}/add"))
        else:
            final = y.producer()
        replace_keeping_output(graph, node, final, before=True)


def format_report(report: dict) -> list[str]:
    """The per-layer report as log lines."""
    lines = [f"  outlier_split report ({report['activations']} activations, {report['calibration_tokens']:,} "
             f"calibration tokens): input | outliers/channels | share of range | MatMul rel. error split vs naive"]
    for e in report["layers"]:
        chans = e["outlier_channels"]
        shown = ",".join(map(str, chans[:8])) + (",..." if len(chans) > 8 else "")
        errs = "; ".join(f"{m['node'].rsplit('/', 1)[-1] or m['node']} {m['rel_error_split']:.2e} vs "
                         f"{m['rel_error_naive']:.2e}" for m in e["matmuls"])
        if e.get("kept_in_int8"):
            shown = "not split: below min_range_share"
        lines.append(f"    {e['input']}: {len(chans)}/{e['channels']} [{shown}] | {e['outlier_range_share']:.0%} | "
                     f"{errs}")
    return lines
