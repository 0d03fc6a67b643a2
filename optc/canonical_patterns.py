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
from onnxscript.rewriter._basics import MatchResult

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

    def __init__(self, nan_guard: bool):
        super().__init__(name=f"sdpa_attention{'_nan_guard' if nan_guard else ''}")
        self.nan_guard = nan_guard

    def pattern(self, op, q, k, v, q_scale, k_scale, mask, zero):
        scores = op.MatMul(op.Mul(q, q_scale), op.Mul(op.Transpose(k, perm=[0, 1, 3, 2]), k_scale))
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


ATTENTION_RULES = pattern.RewriteRuleSet(
    [_DecomposedAttention.rule(c, d) for c in (2, 1, 0) for d in (False, True)]
    + [_SdpaAttention.rule(g) for g in (True, False)])


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
