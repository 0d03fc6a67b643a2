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

The result runs on ONNX Runtime only: MatMulNBits is a contrib op, and the TVM backend refuses it.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from optc.config import PassOptions, no_float
from optc.passes.base import Contract, OptcPass, PassConfigError
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
        return Contract(ensures=frozenset({WEIGHTS_QUANTIZED}))

    @classmethod
    def declared_perplexity_budget(cls, options: WeightQuantOptions) -> float | None:
        return perplexity_budget(options.bits, options.block_size)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: WeightQuantOptions = self.options
        graph = model.graph
        candidates = [(n, w) for n in graph if n.op_type == "MatMul" and n.domain == ""
                      and (w := _constant_weight(graph, n)) is not None and _rank_ok(n.inputs[0])]
        todo = apply_skip(graph, candidates, o.skip, "constant-weight MatMul (node or weight names; this pass "
                                                     "quantises MatMul weights only, never the embedding Gather)")
        if not todo:
            return ir.passes.PassResult(model, False)

        packed: dict[tuple[str, bool], tuple[ir.Value, ...]] = {}  # a weight shared by MatMuls is packed once
        replaced = []
        for node, (source, transposed, transpose_node) in todo:
            key = (source.name, transposed)
            if key not in packed:
                packed[key] = self._pack(graph, source, transposed)
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
        for name in {source for source, _ in packed}:
            v = graph.initializers[name]
            if not v.uses() and v not in graph.outputs:
                del graph.initializers[name]
        model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        return ir.passes.PassResult(model, True)

    def _pack(self, graph: ir.Graph, source: ir.Value, transposed: bool) -> tuple[ir.Value, ...]:
        o: WeightQuantOptions = self.options
        w = source.const_value.numpy()
        w = w.T if transposed else w  # [K, N]
        B, scales, zero_points = quantize_blockwise(np.asarray(w, FLOAT_TYPES[source.dtype]), o.bits,
                                                    o.block_size, o.symmetric)
        base = f"{source.name}{'.T' if transposed else ''}.q{o.bits}b{o.block_size}"
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
