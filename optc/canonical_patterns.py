"""Exporter patterns the canonicaliser rewrites, as onnxscript rewriter rules.

The TorchScript exporter (what optimum uses) and older opsets leave attention decomposed:

    MatMul(Q, Transpose(K, perm=[0,1,3,2])) -> Mul(scale) -> Add(mask) -> Softmax(-1) [-> Cast]* -> MatMul(., V)

which is exactly ONNX `Attention(Q, K, V, attn_mask=mask, scale=scale)` (opset 23) with an additive
float mask. transformers' SDPA attention (optimum-cli's default export) splits the scale over Q and
Kᵀ and guards the softmax against NaN; `_SdpaAttention` matches that form. Such graphs also carry the cache through `Concat(<empty constant>, past)`, which is
`past` itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import get_const_tensor
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchResult, MatchStatus

CANONICAL_OPSET = 23


def _scalar(value: ir.Value) -> float | None:
    tensor = get_const_tensor(value)
    if tensor is None:
        return None
    arr = tensor.numpy()
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


class _DecomposedAttention(pattern.RewriteRuleClassBase):
    """softmax(Q·Kᵀ·scale + mask)·V -> Attention."""

    def __init__(self, casts: int, divide: bool):
        super().__init__(name=f"attention_cast{casts}{'_div' if divide else ''}")
        self.casts, self.divide = casts, divide

    def pattern(self, op, q, k, v, scale, mask):
        scores = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))
        scores = op.Div(scores, scale) if self.divide else op.Mul(scores, scale)
        probs = op.Softmax(op.Add(scores, mask), axis=-1)
        for _ in range(self.casts):  # softmax(dtype=float32).to(float32) leaves float->float Casts
            probs = op.Cast(probs, to=ir.DataType.FLOAT)
        return op.MatMul(probs, v)

    def check(self, context, q, k, v, scale, mask, **_) -> MatchResult:
        result = MatchResult()
        s = _scalar(scale)
        if s is None or s == 0:
            return result.fail("the attention scale is not a constant scalar", scale)
        if q.shape is not None and len(q.shape) != 4:
            return result.fail("Q is not a 4-D [batch, heads, seq, head_dim] tensor", q)
        return result

    def rewrite(self, op, q, k, v, scale, mask, **_):
        s = _scalar(scale)
        return op.Attention(q, k, v, mask, scale=1.0 / s if self.divide else s)


class _SdpaAttention(pattern.RewriteRuleClassBase):
    """transformers' SDPA attention as the TorchScript exporter writes it (optimum-cli's default):

        softmax((Q·c)·(Kᵀ·c) + mask) [-> Where(IsNaN(.), 0, .)] · V   with c = sqrt(1/sqrt(head_dim))

    -> Attention(Q, K, V, mask, scale=c·c). The NaN guard zeroes rows whose every key is masked;
    a causal decoder's row always sees its own token, so no row is fully masked and the guard
    never fires (the Attention op would give NaN there instead of 0)."""

    def __init__(self, nan_guard: bool, flat_transpose: bool = False):
        super().__init__(name=f"sdpa_attention{'_nan_guard' if nan_guard else ''}{'_flat' if flat_transpose else ''}")
        self.nan_guard, self.flat_transpose = nan_guard, flat_transpose

    def pattern(self, op, q, k, v, q_scale, k_scale, mask, zero, flat_shape, kt_shape):
        if self.flat_transpose:
            # torch dynamo at opset 18 transposes K as [B·H, S, D] -> [B·H, D, S] between two Reshapes
            kt = op.Reshape(op.Transpose(op.Reshape(k, flat_shape), perm=[0, 2, 1]), kt_shape)
        else:
            kt = op.Transpose(k, perm=[0, 1, 3, 2])
        scores = op.MatMul(op.Mul(q, q_scale), op.Mul(kt, k_scale))
        probs = op.Softmax(op.Add(scores, mask), axis=-1)
        if self.nan_guard:
            probs = op.Where(op.IsNaN(probs), zero, probs)
        return op.MatMul(probs, v)

    def check(self, context, q, k, v, q_scale, k_scale, mask, zero=None, **_) -> MatchResult:
        result = MatchResult()
        for name, value in (("Q", q_scale), ("Kᵀ", k_scale)):
            s = _scalar(value)
            if s is None or s == 0:
                return result.fail(f"the scale applied to {name} is not a constant non-zero scalar "
                                   f"(a scale computed from the runtime shape is not matched yet)", value)
        if self.nan_guard and _scalar(zero) != 0:
            return result.fail("the NaN guard does not replace NaN by 0", zero)
        if q.shape is not None and len(q.shape) != 4:
            return result.fail("Q is not a 4-D [batch, heads, seq, head_dim] tensor", q)
        return result

    def rewrite(self, op, q, k, v, q_scale, k_scale, mask, **_):
        return op.Attention(q, k, v, mask, scale=_scalar(q_scale) * _scalar(k_scale))



# ------------------------------------------------------------------ rotary
def _static_int(value: ir.Value | None, x: ir.Value, head_dim: int) -> int | None:
    """The integer a small shape computation yields, if it is known before running: a constant, or
    `x.shape[-1] // 2`-style arithmetic on x's last dimension (= head_dim) as TorchScript exports it."""
    if value is None:
        return None
    tensor = get_const_tensor(value)
    if tensor is not None:
        arr = np.asarray(tensor.numpy()).reshape(-1)
        return int(arr[0]) if arr.size == 1 else None
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("Cast", "Unsqueeze", "Squeeze", "Identity", "Reshape"):
        return _static_int(node.inputs[0], x, head_dim)
    if node.op_type == "Div":
        a, b = (_static_int(v, x, head_dim) for v in node.inputs[:2])
        return a // b if a is not None and b else None
    if node.op_type == "Gather" and node.inputs[0].producer() is not None:
        shape = node.inputs[0].producer()
        index = _static_int(node.inputs[1], x, head_dim)
        if (shape.op_type == "Shape" and shape.inputs[0] is x and not shape.attributes
                and index in (3, -1)):
            return head_dim
    return None


def _duplicated_halves(value: ir.Value, trig: str) -> str | None:
    """None if `value` is trig(cat(f, f)) (through casts and a constant scale, as transformers
    computes cos/sin with `attention_scaling`); otherwise why not."""
    cur, seen = value, False
    while cur is not None and cur.producer() is not None:
        node = cur.producer()
        if node.op_type == "Cast":
            cur = node.inputs[0]
        elif node.op_type == "Mul" and _scalar(node.inputs[1]) is not None:
            cur = node.inputs[0]
        elif node.op_type == trig and not seen:
            cur, seen = node.inputs[0], True
        elif node.op_type == "Concat" and seen:
            halves = list(node.inputs)
            axis = node.attributes.get_int("axis", 0)
            if len(halves) == 2 and halves[0] is halves[1] and axis in (-1, 2):
                return None
            return f"{trig.lower()} is not {trig}(cat(freqs, freqs)) along the last axis"
        else:
            break
    return f"{trig.lower()} is not computed as {trig}(cat(freqs, freqs)) (stopped at " \
           f"{cur.producer().op_type if cur is not None and cur.producer() else 'a graph input'})"


class _DecomposedRotary(pattern.RewriteRuleClassBase):
    """transformers' `apply_rotary_pos_emb` as the TorchScript exporter writes it:

        x·unsqueeze(cos, 1) + cat(-x[..., d/2:], x[..., :d/2])·unsqueeze(sin, 1)
        with cos = cos(cat(freqs, freqs)), sin likewise  ([batch, seq, head_dim])

    -> RotaryEmbedding(x, cos[..., :d/2], sin[..., :d/2]) (opset 23, half-split, whole head).
    The position-rewriting passes (sink_window) need this op: they re-rotate the cache through it."""

    def __init__(self, head_dim: int):
        super().__init__(name="decomposed_rotary")
        self.head_dim = head_dim

    def pattern(self, op, x, cos_u, sin_u, lo_start, lo_end, lo_axes, lo_steps, hi_start, hi_end, hi_axes,
                hi_steps):
        lo = op.Slice(x, lo_start, lo_end, lo_axes, lo_steps)
        hi = op.Slice(x, hi_start, hi_end, hi_axes, hi_steps)
        return op.Add(op.Mul(x, cos_u), op.Mul(op.Concat(op.Neg(hi), lo, axis=-1), sin_u))

    def check(self, context, x, cos_u, sin_u, lo_start, lo_end, lo_axes, lo_steps, hi_start, hi_end, hi_axes,
              hi_steps, **_) -> MatchResult:
        result = MatchResult()
        d = self.head_dim
        if x.shape is not None and len(x.shape) != 4:
            return result.fail("the rotated tensor is not 4-D [batch, heads, seq, head_dim]", x)
        static = {name: _static_int(v, x, d) for name, v in (
            ("lo_start", lo_start), ("lo_end", lo_end), ("lo_axes", lo_axes), ("lo_steps", lo_steps),
            ("hi_start", hi_start), ("hi_end", hi_end), ("hi_axes", hi_axes), ("hi_steps", hi_steps))}
        if static["lo_axes"] not in (3, -1) or static["hi_axes"] not in (3, -1):
            return result.fail("rotate_half does not slice the last axis", lo_axes)
        if static["lo_steps"] != 1 or static["hi_steps"] != 1:
            return result.fail("rotate_half slices with a step other than 1 (interleaved rotary is not matched)",
                               lo_steps)
        if static["lo_start"] != 0 or static["lo_end"] != d // 2 or static["hi_start"] != d // 2:
            # Phi3/NeoX rotate only part of the head (partial rotary): not matched yet
            return result.fail(f"rotate_half does not split head_dim {d} in two halves "
                               f"(x[..., {static['lo_start']}:{static['lo_end']}], "
                               f"x[..., {static['hi_start']}:]); partial rotary is not matched yet", lo_end)
        if static["hi_end"] is None or static["hi_end"] < d:
            return result.fail("the upper half of rotate_half does not run to the end of the head", hi_end)
        for name, value, trig in (("cos", cos_u, "Cos"), ("sin", sin_u, "Sin")):
            unsq = value.producer()
            if unsq is None or unsq.op_type != "Unsqueeze" or _static_int(unsq.inputs[1], x, d) != 1:
                return result.fail(f"{name} is not unsqueezed at the heads axis (axis 1)", value)
            if (why := _duplicated_halves(unsq.inputs[0], trig)) is not None:
                return result.fail(why, value)
        return result

    def rewrite(self, op, x, cos_u, sin_u, **_):
        zero, half, last = (op.Constant(value_ints=[v]) for v in (0, self.head_dim // 2, -1))
        cos = op.Slice(cos_u.producer().inputs[0], zero, half, last)
        sin = op.Slice(sin_u.producer().inputs[0], zero, half, last)
        return op.RotaryEmbedding(x, cos, sin, interleaved=0)


def rewrite_decomposed_rotary(model: ir.Model, head_dim: int) -> tuple[dict[str, int], str | None]:
    """Decomposed RoPE -> ONNX RotaryEmbedding, where the exporter left it as Sin/Cos arithmetic.
    Returns the rewrites done and, if none, why the rule missed where it came closest."""
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass

    done: dict[str, int] = {}
    if upgrade_opset(model):
        done["opset_upgraded_to_23"] = 1
    rules = pattern.RewriteRuleSet([_DecomposedRotary.rule(head_dim)], commute=True)
    n = rules.apply_to_model(model)
    if n:
        done["decomposed_rotary_to_RotaryEmbedding"] = n
        # every layer's rewrite sliced the same shared cos/sin: keep one slice of each
        CommonSubexpressionEliminationPass()(model)
    return done, None if n else closest_miss(rules, model)


ATTENTION_RULES = pattern.RewriteRuleSet(
    [_DecomposedAttention.rule(c, d) for c in (2, 1, 0) for d in (False, True)]
    + [_SdpaAttention.rule(g, f) for g in (True, False) for f in (False, True)])


def closest_miss(rules: pattern.RewriteRuleSet, model: ir.Model) -> str | None:
    """Why `rules` do not fire on `model`, from the nearest miss onnxscript's tracer sees: the
    failing check()'s reason (or the pattern step that did not match) and the node it was tried
    at. With a tracer the rewriter only matches and logs; the model is left as it is."""
    tracer = MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)
    best = None
    for matches in tracer.best_matches_map.values():
        for m in matches:
            if m.status != MatchStatus.SUCCESS and (best is None or m.score() > best.score()):
                best = m
    if best is None:
        return None
    reason = best.match_result.reason or "the pattern did not match"
    return f"{reason} (at node {best.root_node.name!r})"


def simplify_trivial_concats(model: ir.Model) -> int:
    """Concat(x) and Concat(<0-element constant>, x) -> x: how the TorchScript exporter seeds the cache."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Concat" or node.domain != "":
            continue
        live = []
        for v in node.inputs:
            t = get_const_tensor(v) if v is not None else None
            if t is None or np.asarray(t.numpy()).size != 0:
                live.append(v)
        if len(live) == 1 and node.outputs[0] not in model.graph.outputs:
            ir.convenience.replace_all_uses_with(node.outputs[0], live[0])
            count += 1
    return count


def upgrade_opset(model: ir.Model) -> bool:
    """Bring the default-domain opset to 23 (needed for Attention / RMSNormalization / RotaryEmbedding)."""
    current = model.opset_imports.get("", 0)
    if current >= CANONICAL_OPSET:
        return False
    import logging

    from onnxscript.version_converter import convert_version

    # onnxscript logs a warning whenever it falls back to the onnx C API converter; the
    # canonicaliser reports the upgrade itself (rewrites["opset_upgraded_to_23"]).
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        convert_version(model, target_version=CANONICAL_OPSET, fallback=True)
    finally:
        logger.setLevel(level)
    model.opset_imports[""] = CANONICAL_OPSET
    return True


def rewrite_decomposed_attention(model: ir.Model) -> dict[str, int]:
    done: dict[str, int] = {}
    if upgrade_opset(model):
        done["opset_upgraded_to_23"] = 1
    n = ATTENTION_RULES.apply_to_model(model)
    if n:
        done["decomposed_attention_to_Attention"] = n
    return done
