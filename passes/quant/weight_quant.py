"""weight_quant: weight-only int8/int4 MatMuls, lowered to ONNX Runtime's `com.microsoft::MatMulNBits`.

Every MatMul whose right-hand side is a constant weight W [K, N] (an initializer, or the
transpose of one: a LM head tied to the embedding reads `Transpose(E)`) becomes
`MatMulNBits(A, B, scales[, zero_points])` holding W quantised round-to-nearest in blocks of
`block_size` along K (calibration-free; layout and quantiser in `blockwise.py`). Activations stay
float; `accuracy_level` lets ONNX Runtime compute with A downcast (4: int8 blocks).

What it does not touch: the embedding table (its Gather keeps the float matrix; a tied LM head gets
its own quantised copy, so the float table stays for the Gather), MatMuls between activations
(attention), MatMuls inside subgraphs, and whatever `skip` names:

    skip: [lm_head]              the MatMul that produces the logits
    skip: ["node_linear_5*"]     fnmatch globs on the MatMul's node name or its weight's name

A skip entry that matches nothing is an error (a typo must not silently quantise what it meant to
keep), and a pass that quantises nothing fails the compile like every other pass.

`method: awq` scales each quantised MatMul's input channels by calibrated activation magnitudes
before rounding and folds the inverse into the op before it (AWQ; `awq.py`: the search, the folds,
the per-activation report that goes into the manifest's `pass_reports`). `method: rtn`, the
default, is the plain round-to-nearest above; its options and artifacts are as before AWQ existed
(the awq-only keys are left out of its normal form).

The result runs on ONNX Runtime only: MatMulNBits is a contrib op, and the TVM backend refuses it.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator, model_serializer, model_validator

from optc.calibration import CalibrationOptions
from optc.config import PassOptions, no_float
from optc.passes.base import LAYERS_ROUTED, ROUTED_MATMULS, Contract, OptcPass, PassConfigError
from optc.passes.quant.awq import DEFAULT_ALPHAS, clip_to
from optc.passes.quant.blockwise import quantize_blockwise
from optc.passes.rules.builders import replace_keeping_output
from optc.runtime.manifest import LOGITS

CONTRIB_DOMAIN = "com.microsoft"
OP = "MatMulNBits"
LM_HEAD = "lm_head"
# what the pass establishes (no other pass conflicts with it yet; outlier splitting will)
WEIGHTS_QUANTIZED = "weights.matmul_nbits"
# Declared perplexity budgets (relative), from the measurement on pycoder-v2 (docs/benchmarks.md,
# "weight-only quantisation"): int8 +0.02%, int4 +4.6% at block 32 and +7.2% at block 128
# (pycoder-5m: +0.4% either way). Larger blocks share a scale over more weights and cost more.
def perplexity_budget(bits: int, block_size: int) -> float:
    if bits == 8:
        return 0.01
    return 0.05 if block_size <= 32 else 0.10


FLOAT_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


class WeightQuantOptions(PassOptions):
    bits: Literal[4, 8] = Field(description="bits per weight")
    bits_is_an_integer = field_validator("bits", mode="before")(no_float)
    block_size: int = Field(32, description="weights per scale along K (a power of two >= 16; "
                                            "MatMulNBits' block_size)")
    block_size_is_an_integer = field_validator("block_size", mode="before")(no_float)
    symmetric: bool = Field(False, description="symmetric codes, no zero points (asymmetric keeps zero exact "
                                               "and fits skewed blocks better)")
    # 4 by default: on ONNX Runtime 1.32's CPU kernels int8 compute made pycoder-v2's decode ~1.3x
    # (int4) and ~14x (int8) faster than 0, where int8 weights decoded 6x slower than fp32, for
    # <= 0.15 points of perplexity (docs/benchmarks.md)
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits' accuracy_level: the lowest precision ONNX Runtime may compute with "
                       "(0 unset: A as is, 1 fp32, 2 fp16, 3 bf16, 4 int8: A quantised per block)")
    accuracy_level_is_an_integer = field_validator("accuracy_level", mode="before")(no_float)
    skip: list[str] = Field([], description="MatMuls to keep in float: 'lm_head' (the one producing the "
                                            "logits) or fnmatch globs on node or weight names")
    method: Literal["rtn", "awq"] = Field(
        "rtn", description="rtn: round-to-nearest, no calibration; awq: per-input-channel scales from calibrated "
                           "activations (AWQ), alpha searched per activation, 1/s folded into the op before")
    alphas: list[float] | None = Field(
        None, description="awq only: the alpha grid searched per activation, s = mean|x|^alpha (each in [0, 1]; "
                          "0 is round-to-nearest); default 0, 0.05, ..., 0.95")
    clip: bool | None = Field(
        None, description="awq only: also search, per block and output column, how far to shrink the block's range "
                          "before rounding (AWQ's auto-clip; ratios 1.0 down to 0.55); default false")
    calibration: CalibrationOptions | None = Field(
        None, description="awq only: text, samples, length (default: models/data/calibration.jsonl, 16, 256)")
    embedding: bool = Field(False, description="also store the token embedding table with `bits` per weight "
                                               "(symmetric, blocks along the hidden axis; ONNX Runtime's "
                                               "GatherBlockQuantized): its float copy no longer takes memory and cache")

    @model_validator(mode="before")
    @classmethod
    def _awq_defaults(cls, data):
        if isinstance(data, dict) and data.get("method") == "awq":
            data = dict(data)
            if data.get("alphas") is None:
                data["alphas"] = list(DEFAULT_ALPHAS)
            if data.get("calibration") is None:
                data["calibration"] = {}
            if data.get("clip") is None:
                data["clip"] = False
        return data

    @model_validator(mode="after")
    def _awq_only(self):
        if self.method != "awq":
            for key in ("alphas", "clip", "calibration"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is an option of method: awq (method is {self.method})")
        return self

    @model_serializer(mode="wrap")
    def _normal_form(self, handler):
        # round-to-nearest prints (and records in manifests) exactly the keys it had before awq
        d = handler(self)
        if self.method == "rtn":
            for key in ("method", "alphas", "clip", "calibration"):
                d.pop(key, None)
        if not self.embedding:  # (likewise: a float embedding table records no key)
            d.pop("embedding", None)
        return d

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty grid searches nothing")
        bad = [a for a in v if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"each alpha must be in [0, 1], got {bad[0]!r}")
        if len(set(v)) != len(v):
            raise ValueError("an alpha is given twice")
        return v

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError(f"must be a power of two >= 16 (MatMulNBits' block_size), got {v}")
        return v

    @field_validator("skip")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return check_skip_patterns(v)


class WeightQuant(OptcPass):
    """Weight-only int8/int4 quantisation of constant-weight MatMuls (ONNX Runtime MatMulNBits)."""

    name = "weight_quant"

    @classmethod
    def contract(cls, options: WeightQuantOptions) -> Contract:
        return Contract(ensures=frozenset({WEIGHTS_QUANTIZED}), precedes={LAYERS_ROUTED: ROUTED_MATMULS})

    @classmethod
    def declared_perplexity_budget(cls, options: WeightQuantOptions) -> float | None:
        return perplexity_budget(options.bits, options.block_size)

    @classmethod
    def declared_embedding_budget(cls, options: WeightQuantOptions) -> dict[str, float] | None:
        """On an encoder (pooled-embedding cosine, retrieval agreement; docs/benchmarks.md)."""
        if options.bits == 8:
            return {"min_embedding_cosine": 0.995, "min_retrieval_agreement": 0.95}
        return {"min_embedding_cosine": 0.98, "min_retrieval_agreement": 0.9}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: WeightQuantOptions = self.options
        graph = model.graph
        todo = self.select(graph)
        if not todo:
            return ir.passes.PassResult(model, False)

        self._clip: dict[ir.Node, np.ndarray] = {}  # awq clip: ratios [k_blocks, N] per MatMul
        scales: dict[ir.Node, np.ndarray] = self.awq_scales(model, todo) if o.method == "awq" else {}
        packed: dict[tuple, tuple[ir.Value, ...]] = {}  # a weight shared by MatMuls is packed once
        replaced = []
        for node, (source, transposed, transpose_node) in todo:
            s = scales.get(node)
            own = s is not None or node in self._clip
            key = (source.name, transposed, node.name) if own else (source.name, transposed)
            if key not in packed:
                packed[key] = self._pack(graph, source, transposed, s, self._clip.get(node))
            w = source.const_value.numpy()
            K, N = (w.shape[1], w.shape[0]) if transposed else w.shape
            new = ir.Node(CONTRIB_DOMAIN, OP, [node.inputs[0], *packed[key]],
                          attributes=[ir.AttrInt64("K", K), ir.AttrInt64("N", N), ir.AttrInt64("bits", o.bits),
                                      ir.AttrInt64("block_size", o.block_size),
                                      ir.AttrInt64("accuracy_level", o.accuracy_level)],
                          name=f"{node.name}/weight_quant")
            replace_keeping_output(graph, node, new)
            replaced.append(transpose_node)
        # the float weights (and a tied head's Transpose) go when nothing else reads them; an
        # embedding table stays for its Gather
        for t in replaced:
            if t is not None and t.graph is graph and not t.outputs[0].uses():
                graph.remove(t, safe=True)
        if o.embedding:
            self._quantize_embedding(graph)
        for name in {key[0] for key in packed}:
            v = graph.initializers.get(name)
            if v is not None and not v.uses() and v not in graph.outputs:
                del graph.initializers[name]
        model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        return ir.passes.PassResult(model, True)

    def _quantize_embedding(self, graph: ir.Graph) -> None:
        """Gather(table [vocab, hidden], input_ids) -> GatherBlockQuantized of the table quantised
        symmetrically in blocks of `block_size` along the hidden axis (the layout MatMulNBits gives
        a transposed weight, so the blocks come from the same quantiser)."""
        o: WeightQuantOptions = self.options
        gathers = [n for n in graph if n.op_type == "Gather" and n.domain == "" and len(n.inputs) == 2
                   and n.inputs[1] is not None and n.inputs[1].is_graph_input() and n.inputs[1].name == "input_ids"
                   and n.inputs[0] is not None and n.inputs[0].const_value is not None
                   and len(n.inputs[0].const_value.shape) == 2 and n.attributes.get_int("axis", 0) == 0]
        if len(gathers) != 1:
            raise PassConfigError("embedding", f"expected one Gather of a constant table by input_ids, found "
                                               f"{len(gathers)}")
        gather = gathers[0]
        table = gather.inputs[0]
        w = table.const_value.numpy()
        if w.shape[1] % o.block_size:
            raise PassConfigError("embedding", f"block_size {o.block_size} does not divide the hidden size "
                                               f"{w.shape[1]}")
        B, scales, _ = quantize_blockwise(np.ascontiguousarray(w.T), o.bits, o.block_size, symmetric=True)
        data = ir.Value(name=f"{table.name}.q{o.bits}", const_value=ir.tensor(B.reshape(w.shape[0], -1)))
        scale = ir.Value(name=f"{table.name}.q{o.bits}_scales", const_value=ir.tensor(scales))
        graph.register_initializer(data)
        graph.register_initializer(scale)
        new = ir.Node(CONTRIB_DOMAIN, "GatherBlockQuantized", [data, gather.inputs[1], scale],
                      attributes=[ir.AttrInt64("bits", o.bits), ir.AttrInt64("block_size", o.block_size),
                                  ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1)],
                      name=f"{gather.name}/weight_quant")
        replace_keeping_output(graph, gather, new)
        if not table.uses() and table not in graph.outputs and table.name in graph.initializers:
            del graph.initializers[table.name]

    def _pack(self, graph: ir.Graph, source: ir.Value, transposed: bool,
              row_scale: np.ndarray | None = None, clip: np.ndarray | None = None) -> tuple[ir.Value, ...]:
        o: WeightQuantOptions = self.options
        w = source.const_value.numpy()
        w = w.T if transposed else w  # [K, N]
        w = np.asarray(w, FLOAT_TYPES[source.dtype])
        if row_scale is not None:  # awq: diag(s) W (the input is divided by s before it)
            w = (w * row_scale.astype(w.dtype)[:, None]).astype(w.dtype)
        if clip is not None:  # awq clip: each block's range shrunk to the searched ratio of its max |w|
            w = clip_to(w, clip, o.block_size)
        B, scales, zero_points = quantize_blockwise(w, o.bits, o.block_size, o.symmetric)
        base = f"{source.name}{'.T' if transposed else ''}.q{o.bits}b{o.block_size}"
        while base in graph.initializers:  # a weight shared by MatMuls that awq scaled differently
            base += ".awq"
        out = []
        for suffix, arr in (("", B), (".scales", scales), (".zero_points", zero_points)):
            if arr is None:
                continue
            v = ir.Value(name=base + suffix, shape=ir.Shape(arr.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                         const_value=ir.tensor(arr, name=base + suffix))
            graph.register_initializer(v)
            out.append(v)
        return tuple(out)


    def select(self, graph: ir.Graph) -> list:
        """The (MatMul, (weight, transposed, Transpose node)) pairs this pass quantises."""
        candidates = [(n, w) for n in graph if n.op_type == "MatMul" and n.domain == ""
                      and (w := _constant_weight(graph, n)) is not None and _rank_ok(n.inputs[0])]
        return apply_skip(graph, candidates, self.options.skip, "constant-weight MatMul (node or weight names; this "
                                                                "pass quantises MatMul weights only, never the "
                                                                "embedding Gather)")

    def awq_scales(self, model: ir.Model, todo: list) -> dict[ir.Node, np.ndarray]:
        """Calibrate, search alpha per activation and fold 1/s into the graph (awq.py); returns
        each MatMul's s where it is not 1 (its weight is then quantised as diag(s) W). Without
        the quantisation that follows, the graph with diag(s) W in float computes what it did."""
        from optc.calibration import calibration_windows, channel_stats
        from optc.passes.quant import awq

        o: WeightQuantOptions = self.options
        graph = model.graph
        cal = o.calibration
        windows = calibration_windows("weight_quant (method awq)", self.context.tokenizer, cal.text,
                                      samples=cal.samples, length=cal.length, bos=self.context.bos_token_id)
        groups: dict[ir.Value, awq.Group] = {}
        for node, weight in todo:
            groups.setdefault(node.inputs[0], awq.Group(node.inputs[0], [])).members.append((node, weight))
        taken = {v.name for v in graph.inputs} | set(graph.initializers) | \
            {v.name for n in graph for v in n.outputs if v.name} | {n.name for n in graph if n.name}

        def unique(name: str) -> str:
            out, n = name, 1
            while out in taken:
                n += 1
                out = f"{name}.{n}"
            taken.add(out)
            return out

        for i, a in enumerate(groups):
            if not a.name:
                a.name = unique(f"optc.weight_quant.input.{i}")
        tokens = sum(len(w) for w in windows)
        self.context.log(f"  weight_quant awq: calibrating {len(groups)} activations on {len(windows)} windows "
                         f"({tokens:,} tokens)")
        stats = channel_stats(model, [a.name for a in groups], windows, label="weight_quant awq calibration",
                              sample_rows=awq.SAMPLE_ROWS)
        report = {"method": "awq", "clip": o.clip, "calibration_tokens": tokens,
                  "rows": int(next(iter(stats.values())).rows.shape[0]), "alphas": list(o.alphas), "groups": []}
        for a, g in groups.items():
            st = stats[a.name]
            K = st.absmax.shape[0]
            awq.find_fold(graph, g, K, self.context.decoder)
            ws = []
            for node, (source, transposed, _) in g.members:
                w = source.const_value.numpy().astype(np.float32)
                ws.append(w.T if transposed else w)
            alpha, s, e0, e1 = awq.search(st.rows, st.absmean, ws, o.alphas, g.tie, bits=o.bits,
                                          block_size=o.block_size, symmetric=o.symmetric,
                                          accuracy_level=o.accuracy_level)
            g.scale = None if alpha == 0 else s
            entry = {"input": a.name, "matmuls": [n.name for n, _ in g.members], "fold": g.fold if alpha else "none",
                     "target": g.target.name if alpha and g.target is not None else "", "alpha": alpha,
                     "rel_error_rtn": round(e0, 6), "rel_error_awq": round(e1, 6)}
            final = e1
            if o.clip:  # per block and column, on the weights as scaled and the input as divided
                x = st.rows[np.linspace(0, len(st.rows) - 1, min(len(st.rows), awq.CLIP_ROWS)).astype(int)] / s
                qs, means = [], []
                for (node, _), w in zip(g.members, ws):
                    ratios = awq.clip_search(x, w * s[:, None], bits=o.bits, block_size=o.block_size,
                                             symmetric=o.symmetric)
                    self._clip[node] = ratios
                    means.append(float(ratios.mean()))
                    qs.append(awq.quantized(awq.clip_to(w * s[:, None], ratios, o.block_size), o.bits, o.block_size,
                                            o.symmetric))
                final = awq.group_error(st.rows, ws, qs, s, block_size=o.block_size, accuracy_level=o.accuracy_level)
                entry["rel_error_clip"] = round(final, 6)
                entry["clip_ratio_mean"] = round(float(np.mean(means)), 4)
            entry["error_reduction"] = round(1 - final / e0, 4) if e0 > 0 else 0.0
            report["groups"].append(entry)
        # folds after every search: a fold changes W_v / W_up, which their own group searched as exported
        scales = {}
        for g in groups.values():
            if g.scale is not None:
                awq.apply_fold(graph, g, unique)
                for node, _ in g.members:
                    scales[node] = g.scale
        self.context.reports.setdefault(self.name, []).append(report)
        for line in awq.format_report(report):
            self.context.log(line)
        return scales


def check_skip_patterns(v: list[str]) -> list[str]:
    """A `skip` option's entries (the quantisation passes share them): none empty, none twice."""
    for s in v:
        if not s.strip():
            raise ValueError("an empty entry matches nothing")
    if len(set(v)) != len(v):
        raise ValueError("an entry is given twice")
    return v


def apply_skip(graph: ir.Graph, candidates: list, skip: list[str], what: str) -> list:
    """The (node, weight) candidates that no `skip` entry names: 'lm_head' is the MatMul producing
    the logits, anything else an fnmatch glob on the node's or the weight's name. An entry that
    names nothing is an error ("... matches no <what>"): a typo must not quantise what it meant
    to keep."""
    lm_head = _lm_head(graph)
    if LM_HEAD in skip and lm_head is None:
        raise PassConfigError("skip", "'lm_head': no MatMul produces the logits in this graph")
    used, todo = set(), []
    for node, weight in candidates:
        hit = [s for s in skip if (s == LM_HEAD and node is lm_head) or
               (s != LM_HEAD and any(fnmatch.fnmatchcase(name, s) for name in (node.name, weight[0].name)))]
        used.update(hit)
        if not hit:
            todo.append((node, weight))
    unused = [s for s in skip if s not in used]
    if unused:
        raise PassConfigError("skip", f"{unused[0]!r} matches no {what}")
    return todo


def _constant_weight(graph: ir.Graph, node: ir.Node):
    """(initializer, transposed, Transpose node or None) when the MatMul's B is a constant float
    [K, N] weight or Transpose(perm=[1, 0]) of a constant [N, K] one; else None."""
    b = node.inputs[1]
    transpose = None
    if b is not None and b.const_value is None and (p := b.producer()) is not None and p.op_type == "Transpose" \
            and p.domain == "" and p.graph is graph:
        perm = p.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) == [1, 0]:
            transpose, b = p, p.inputs[0]
    if b is None or b.const_value is None or not b.is_initializer() or b in graph.inputs:
        return None  # a graph input with a default may be overridden at run time: not a constant
    if b.dtype not in FLOAT_TYPES or len(b.const_value.shape) != 2:
        return None
    return b, transpose is not None, transpose


def _rank_ok(a: ir.Value) -> bool:
    """MatMulNBits takes A [..., K] with rank >= 2 (a 1-D A changes MatMul's semantics). A rank
    the graph does not record (TorchScript exports carry no intermediate shapes) is a decoder's
    activation [batch, seq, hidden]; the compile's verification runs the result either way."""
    return a is not None and (a.shape is None or len(a.shape) >= 2)


def _lm_head(graph: ir.Graph) -> ir.Node | None:
    """The MatMul that produces the logits (directly, or through shape-only ops)."""
    out = next((v for v in graph.outputs if v.name == LOGITS), None)
    node = out.producer() if out is not None else None
    while node is not None and node.op_type in ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze"):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node if node is not None and node.op_type == "MatMul" else None
