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
from onnxscript.rewriter._basics import MatchInfo, MatchingTracer, MatchResult, MatchStatus

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

    def __init__(self, nan_guard: bool, flat_transpose: bool = False, head_dim: int | None = None):
        super().__init__(name=f"sdpa_attention{'_nan_guard' if nan_guard else ''}{'_flat' if flat_transpose else ''}")
        self.nan_guard, self.flat_transpose, self.head_dim = nan_guard, flat_transpose, head_dim

    def _scale(self, value: ir.Value, q: ir.Value, k: ir.Value) -> float | None:
        """A constant, or (GPT-2) sqrt(1/sqrt(d)) computed from `Shape(Q)[-1:]` at run time: d is
        the head dimension, known from the KV-cache inputs."""
        s = _scalar(value)
        if s is None and self.head_dim:
            s = _shape_float(value, (q, k), self.head_dim)
        return s

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
            s = self._scale(value, q, k)
            if s is None or s == 0:
                return result.fail(f"the scale applied to {name} is neither a constant non-zero scalar nor "
                                   f"computed from the head dimension (Shape(Q)[-1])", value)
        if self.nan_guard and _scalar(zero) != 0:
            return result.fail("the NaN guard does not replace NaN by 0", zero)
        if q.shape is not None and len(q.shape) != 4:
            return result.fail("Q is not a 4-D [batch, heads, seq, head_dim] tensor", q)
        return result

    def rewrite(self, op, q, k, v, q_scale, k_scale, mask, **_):
        return op.Attention(q, k, v, mask, scale=self._scale(q_scale, q, k) * self._scale(k_scale, q, k))


def _shape_float(value: ir.Value | None, tensors: tuple, last_dim: int, depth: int = 0) -> float | None:
    """The float a scalar computation on `Shape(t)[-1:]` (t one of `tensors`, whose last dimension
    is `last_dim`) yields: Cast / Sqrt / Div / Mul of such values and constants."""
    if value is None or depth > 12:
        return None
    s = _scalar(value)
    if s is not None:
        return s
    node = value.producer()
    if node is None:
        return None
    args = [_shape_float(v, tensors, last_dim, depth + 1) for v in node.inputs[:2] if v is not None]
    if node.op_type in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape") and args and args[0] is not None:
        return args[0]
    if node.op_type == "Sqrt" and args[0] is not None and args[0] >= 0:
        return float(np.sqrt(args[0]))
    if node.op_type in ("Div", "Mul") and len(args) == 2 and None not in args:
        return args[0] / args[1] if node.op_type == "Div" and args[1] else args[0] * args[1]
    if node.op_type in ("Slice", "Gather") and node.inputs[0].producer() is not None:
        shape = node.inputs[0].producer()
        start = _scalar(node.inputs[1])
        if shape.op_type == "Shape" and not shape.attributes and shape.inputs[0] in tensors and start in (-1, 3):
            return float(last_dim)
    return None



# ------------------------------------------------------------------ repeat_kv
def const_ints(value: ir.Value | None) -> list[int] | None:
    """The integers of a constant tensor (flattened), or None where `value` is not constant."""
    tensor = get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in tensor.numpy().reshape(-1)]


class _RepeatKv(pattern.PatternBase):
    """transformers' `repeat_kv` (grouped-query attention), as every exporter writes it between the
    cache and attention:

        kv[:, :, None].expand(b, kv_heads, n_rep, s, d).reshape(b, kv_heads·n_rep, s, d)
        = Reshape(Expand(Unsqueeze(kv, axes=[2]), [b, kv_heads, n_rep, s, d]), [b, heads, s, d])

    The standard Attention op repeats the KV heads itself, so the canonical Attention reads `kv`.
    A pattern, not a rewrite rule: the canonicaliser rewires the Attention's input in place, where
    a replacement would create a new Attention node (a new name, the rule's metadata stamp)."""

    def __init__(self) -> None:
        super().__init__(name="repeat_kv")

    def pattern(self, op, kv, axes, expanded_shape, heads_shape):
        return op.Reshape(op.Expand(op.Unsqueeze(kv, axes), expanded_shape), heads_shape)

    def check(self, context, kv, axes, expanded_shape, heads_shape, **_) -> MatchResult:
        result = MatchResult()
        if const_ints(axes) != [2]:
            return result.fail("the Unsqueeze does not add the repeat axis after the KV heads (axes [2])", axes)
        reshape = context.root
        ranks = {"kv": kv, "the Expand": reshape.inputs[0], "the Reshape": reshape.outputs[0]}
        for (name, value), rank in zip(ranks.items(), (4, 5, 4)):
            if value is not None and value.shape is not None and len(value.shape) != rank:
                return result.fail(f"{name} is not {rank}-D ({value.shape})", value)
        target = const_ints(expanded_shape)
        if target is not None and (len(target) != 5 or (kv.shape is not None and isinstance(kv.shape[1], int)
                                                        and target[1] not in (kv.shape[1], 1, -1))):
            return result.fail(f"the Expand target {target} is not [batch, kv_heads, n_rep, seq, head_dim]",
                               expanded_shape)
        return result


_REPEAT_KV = _RepeatKv()


class _Outcome(MatchingTracer):
    """The result of one match attempt, failed or not (onnxscript's tracer keeps scored ones only)."""

    def __init__(self) -> None:
        super().__init__()
        self.result: MatchResult | None = None

    def log(self, rule, container, node, match_result, status) -> None:
        self.result = match_result


def read_through_repeat_kv(model: ir.Model, value: ir.Value) -> tuple[ir.Value, str | None]:
    """What an Attention key/value input reads: (kv, None) where `value` is repeat_kv(kv);
    otherwise (`value` itself, why it is not repeat_kv and at which node)."""
    node = value.producer()
    if node is None:
        return value, f"{value.name!r} is a graph input, not repeat_kv of the cache"
    tracer = _Outcome()
    match = _REPEAT_KV.match(model, model.graph, node, check_nodes_are_removable=False, tracer=tracer)
    if match:
        return match.bindings["kv"], None
    reason = tracer.result.reason if tracer.result is not None else ""
    return value, f"{reason or 'the repeat_kv pattern did not match'} (at node {node.name!r})"


# ------------------------------------------------------------------ rotary
def _static_int(value: ir.Value | None, last_dim) -> int | None:
    """The integer a small shape computation yields, if it is known before running: a constant, or
    arithmetic on `Shape(v)[-1]` as TorchScript exports `x.shape[-1] // 2`, where `last_dim(v)`
    knows v's last dimension."""
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
        return _static_int(node.inputs[0], last_dim)
    if node.op_type == "Div":
        a, b = (_static_int(v, last_dim) for v in node.inputs[:2])
        return a // b if a is not None and b else None
    if node.op_type == "Gather" and node.inputs[0].producer() is not None:
        shape = node.inputs[0].producer()
        if (shape.op_type == "Shape" and not shape.attributes
                and _static_int(node.inputs[1], last_dim) in (3, -1)):
            return last_dim(shape.inputs[0])
    return None


def _rotary_table(value: ir.Value, trig: str) -> tuple[int | None, str | None]:
    """If `value` is trig(cat(f, f)) (through casts and a constant scale, as transformers computes
    cos/sin with `attention_scaling`), its last dimension, the rotary dimension r: f is
    Transpose(MatMul(inv_freq[1, r/2, 1], positions)). Returns (r, None), or (None, why not)."""
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
            if len(halves) != 2 or halves[0] is not halves[1] or node.attributes.get_int("axis", 0) not in (-1, 2):
                return None, f"{trig.lower()} is not {trig}(cat(freqs, freqs)) along the last axis"
            half = _inv_freq_length(halves[0])
            if half is None:
                return None, f"{trig.lower()}: cannot tell the rotary dimension (freqs is not " \
                             f"Transpose(MatMul(<constant inv_freq>, positions)))"
            return 2 * half, None
        else:
            break
    return None, f"{trig.lower()} is not computed as {trig}(cat(freqs, freqs)) (stopped at " \
                 f"{cur.producer().op_type if cur is not None and cur.producer() else 'a graph input'})"


def _inv_freq_length(freqs: ir.Value) -> int | None:
    """r/2 for freqs = Transpose(MatMul(Cast*(Expand(inv_freq[1, r/2, 1])), positions), [0, 2, 1])
    (TorchScript) or Mul(positions, inv_freq[r/2]) (torch dynamo)."""
    node = freqs.producer()
    if node is not None and node.op_type == "Mul":  # torch dynamo: positions[..., None] * inv_freq[r/2]
        for operand in node.inputs:
            tensor = get_const_tensor(operand)
            if tensor is not None and len(tensor.shape) == 1:
                return int(tensor.shape[0])
        return None
    if node is None or node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [])) != [0, 2, 1]:
        return None
    matmul = node.inputs[0].producer()
    if matmul is None or matmul.op_type != "MatMul":
        return None
    cur = matmul.inputs[0]
    while cur is not None and cur.producer() is not None and cur.producer().op_type in ("Cast", "Expand"):
        cur = cur.producer().inputs[0]
    tensor = get_const_tensor(cur) if cur is not None else None
    if tensor is None or len(tensor.shape) != 3 or tensor.shape[0] != 1 or tensor.shape[2] != 1:
        return None
    return int(tensor.shape[1])


def _unsqueezed_table_dim(value: ir.Value) -> int | None:
    """r for Unsqueeze(cos or sin table, axes=[1]) ([batch, 1, seq, r]), else None."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze" or _static_int(node.inputs[1], lambda _: None) != 1:
        return None
    table = node.inputs[0]
    for trig in ("Cos", "Sin"):
        r, _ = _rotary_table(table, trig)
        if r is not None:
            return r
    return None


class _DecomposedRotary(pattern.RewriteRuleClassBase):
    """transformers' `apply_rotary_pos_emb` as the TorchScript exporter writes it:

        x·unsqueeze(cos, 1) + cat(-x[..., r/2:], x[..., :r/2])·unsqueeze(sin, 1)
        with cos = cos(cat(freqs, freqs)), sin likewise  ([batch, seq, r])

    -> RotaryEmbedding(x, cos[..., :r/2], sin[..., :r/2]) (opset 23, half-split). x's last dimension
    is r (the products broadcast over it): the whole head, or the rotated part of a partially
    rotated one (`_PartialRotary` then folds the split back in). The position-rewriting passes
    (sink_window) need this op: they re-rotate the cache through it."""

    def __init__(self):
        super().__init__(name="decomposed_rotary")

    def pattern(self, op, x, cos_u, sin_u, lo_start, lo_end, lo_axes, lo_steps, hi_start, hi_end, hi_axes,
                hi_steps):
        lo = op.Slice(x, lo_start, lo_end, lo_axes, lo_steps)
        hi = op.Slice(x, hi_start, hi_end, hi_axes, hi_steps)
        return op.Add(op.Mul(x, cos_u), op.Mul(op.Concat(op.Neg(hi), lo, axis=-1), sin_u))

    def check(self, context, x, cos_u, sin_u, lo_start, lo_end, lo_axes, lo_steps, hi_start, hi_end, hi_axes,
              hi_steps, **_) -> MatchResult:
        result = MatchResult()
        if x.shape is not None and len(x.shape) != 4:
            return result.fail("the rotated tensor is not 4-D [batch, heads, seq, head_dim]", x)
        dims = []
        for name, value, trig in (("cos", cos_u, "Cos"), ("sin", sin_u, "Sin")):
            unsq = value.producer()
            if unsq is None or unsq.op_type != "Unsqueeze" or _static_int(unsq.inputs[1], lambda _: None) != 1:
                return result.fail(f"{name} is not unsqueezed at the heads axis (axis 1)", value)
            r, why = _rotary_table(unsq.inputs[0], trig)
            if why is not None:
                return result.fail(why, value)
            dims.append(r)
        r = dims[0]
        if dims[1] != r or r % 2:
            return result.fail(f"cos and sin tables differ in size ({dims}) or are odd", cos_u)

        def last_dim(v):  # x's last dimension is r: x·cos broadcasts over it
            return r if v is x else _unsqueezed_table_dim(v)

        static = {name: _static_int(v, last_dim) for name, v in (
            ("lo_start", lo_start), ("lo_end", lo_end), ("lo_axes", lo_axes), ("lo_steps", lo_steps),
            ("hi_start", hi_start), ("hi_end", hi_end), ("hi_axes", hi_axes), ("hi_steps", hi_steps))}
        if static["lo_axes"] not in (3, -1) or static["hi_axes"] not in (3, -1):
            return result.fail("rotate_half does not slice the last axis", lo_axes)
        if static["lo_steps"] != 1 or static["hi_steps"] != 1:
            return result.fail("rotate_half slices with a step other than 1 (interleaved rotary is not matched)",
                               lo_steps)
        if static["lo_start"] != 0 or static["lo_end"] != r // 2 or static["hi_start"] != r // 2:
            return result.fail(f"rotate_half does not split the rotary dimension {r} in two halves "
                               f"(x[..., {static['lo_start']}:{static['lo_end']}], "
                               f"x[..., {static['hi_start']}:])", lo_end)
        if static["hi_end"] is None or static["hi_end"] < r:
            return result.fail("the upper half of rotate_half does not run to the end", hi_end)
        return result

    def rewrite(self, op, x, cos_u, sin_u, **_):
        r, _ = _rotary_table(cos_u.producer().inputs[0], "Cos")
        zero, half, last = (op.Constant(value_ints=[v]) for v in (0, r // 2, -1))
        cos = op.Slice(cos_u.producer().inputs[0], zero, half, last)
        sin = op.Slice(sin_u.producer().inputs[0], zero, half, last)
        return op.RotaryEmbedding(x, cos, sin, interleaved=0)


class _PartialRotary(pattern.RewriteRuleClassBase):
    """Phi3 / GPT-NeoX rotate the first r channels of each head and pass the rest through:

        cat(RotaryEmbedding(k[..., :r], cos, sin), k[..., r:])  ->  RotaryEmbedding(k, cos, sin,
                                                                     rotary_embedding_dim=r)

    (Phi3 writes the split even when r is the whole head; then the second part is empty.)"""

    def __init__(self, head_dim: int):
        super().__init__(name="partial_rotary")
        self.head_dim = head_dim

    def pattern(self, op, k, cos, sin, a_start, a_end, a_axes, a_steps, b_start, b_end, b_axes, b_steps):
        rotated = op.RotaryEmbedding(op.Slice(k, a_start, a_end, a_axes, a_steps), cos, sin, interleaved=0)
        return op.Concat(rotated, op.Slice(k, b_start, b_end, b_axes, b_steps), axis=-1)

    def check(self, context, k, cos, sin, a_start, a_end, a_axes, a_steps, b_start, b_end, b_axes, b_steps,
              **_) -> MatchResult:
        result = MatchResult()
        if k.shape is not None and len(k.shape) != 4:  # the 3-D form needs num_heads, which the rewrite drops
            return result.fail("the rotated tensor is not 4-D [batch, heads, seq, head_dim]", k)
        r = self._rotary_dim(cos)
        if r is None:
            return result.fail("the RotaryEmbedding's cos is not a constant-width slice of a rotary table", cos)
        static = [_static_int(v, _unsqueezed_table_dim) for v in
                  (a_start, a_end, a_axes, a_steps, b_start, b_end, b_axes, b_steps)]
        if static[2] not in (3, -1) or static[6] not in (3, -1) or static[3] != 1 or static[7] != 1:
            return result.fail("the rotary split does not slice the last axis with step 1", a_axes)
        if static[0] != 0 or static[1] != r or static[4] != r or static[5] is None or static[5] < self.head_dim:
            return result.fail(f"the head is not split as k[..., :{r}], k[..., {r}:] (found {static[0]}:{static[1]}, "
                               f"{static[4]}:{static[5]})", a_end)
        if r > self.head_dim:
            return result.fail(f"rotary dimension {r} exceeds head_dim {self.head_dim}", cos)
        return result

    @staticmethod
    def _rotary_dim(cos: ir.Value) -> int | None:
        node = cos.producer()
        if node is not None and node.op_type == "Slice":  # Slice(table, 0, r/2, -1), as _DecomposedRotary builds it
            half = _static_int(node.inputs[2], lambda _: None)
            return 2 * half if half else None
        # torch dynamo at opset 23 writes RotaryEmbedding itself, its cos an element-wise Cos of
        # positions x inv_freq ([batch, seq, r/2]): the width is in the shape
        for v in (cos, node.inputs[0] if node is not None and node.op_type == "Cos" else None):
            if v is not None and v.shape is not None and len(v.shape) and isinstance(v.shape[-1], int):
                return 2 * v.shape[-1]
        return None

    def rewrite(self, op, k, cos, sin, **_):
        r = self._rotary_dim(cos)
        attrs = {"rotary_embedding_dim": r} if r != self.head_dim else {}
        return op.RotaryEmbedding(k, cos, sin, interleaved=0, **attrs)


def _share_rotary_tables(model: ir.Model) -> None:
    """Every rewrite sliced the same shared cos/sin table; let all RotaryEmbeddings read the first
    slice of each (the first in graph order precedes every consumer). Only these slices are merged:
    a general CSE here would leave the configured `eliminate_common_subexpressions` pass nothing."""
    first: dict[tuple, ir.Value] = {}
    for node in list(model.graph):
        if node.op_type != "RotaryEmbedding":
            continue
        for slot in (1, 2):
            table_slice = node.inputs[slot].producer()
            if table_slice is None or table_slice.op_type != "Slice":
                continue
            key = (id(table_slice.inputs[0]), _static_int(table_slice.inputs[2], lambda _: None))
            shared = first.setdefault(key, node.inputs[slot])
            if shared is not node.inputs[slot]:
                node.replace_input_with(slot, shared)


def rewrite_decomposed_rotary(model: ir.Model, head_dim: int) -> tuple[dict[str, int], str | None]:
    """Decomposed RoPE -> ONNX RotaryEmbedding, where the exporter left it as Sin/Cos arithmetic.
    Returns the rewrites done and, if none, why the rule missed where it came closest."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    done: dict[str, int] = {}
    if upgrade_opset(model):
        done["opset_upgraded_to_23"] = 1
    rules = pattern.RewriteRuleSet([_DecomposedRotary.rule()], commute=True)
    n = rules.apply_to_model(model)
    if n:
        done["decomposed_rotary_to_RotaryEmbedding"] = n
        # the rotated part's Shape feeding the replaced rotate_half slices is dead now, but still a use
        RemoveUnusedNodesPass()(model)
        done.update(fold_partial_rotary(model, head_dim))
        _share_rotary_tables(model)
    return done, None if n else closest_miss(rules, model)


def fold_partial_rotary(model: ir.Model, head_dim: int) -> dict[str, int]:
    """Concat(RotaryEmbedding(k[..., :r]), k[..., r:]) -> one RotaryEmbedding with
    rotary_embedding_dim, on the ops the rotary rule built or those the exporter wrote."""
    m = pattern.RewriteRuleSet([_PartialRotary.rule(head_dim)]).apply_to_model(model)
    return {"partial_rotary_folded": m} if m else {}


def attention_rules(head_dim: int | None) -> pattern.RewriteRuleSet:
    """Every decomposed-attention form; `head_dim` (from the KV-cache inputs) lets the SDPA rule
    evaluate a scale computed from the runtime shape."""
    return pattern.RewriteRuleSet(
        [_DecomposedAttention.rule(c, d) for c in (2, 1, 0) for d in (False, True)]
        + [_SdpaAttention.rule(g, f, head_dim) for g in (True, False) for f in (False, True)])


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


class _EveryMiss(MatchingTracer):
    """onnxscript's tracer keeps only each rule's best-scoring matches over the whole graph; a
    per-layer report needs every failed attempt, with the node it was tried at."""

    def __init__(self) -> None:
        super().__init__()
        self.misses: list[MatchInfo] = []

    def log(self, rule, container, node, match_result, status) -> None:
        info = MatchInfo(match_result, node, container, status)
        if status != MatchStatus.SUCCESS and info.score() > 0:
            self.misses.append(info)


def downstream_nodes(values: list[ir.Value], limit: int = 96) -> set[int]:
    """ids of the nodes within `limit` steps downstream of `values` (a layer's attention lies
    within a few dozen nodes of its cache tensors)."""
    seen: set[int] = set()
    frontier = [user for v in values for user, _ in v.uses()]
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        frontier.extend(user for out in node.outputs for user, _ in out.uses())
    return seen


def closest_misses_by_layer(rules: pattern.RewriteRuleSet, model: ir.Model,
                            layers: dict[int, list[ir.Value]]) -> dict[int, str]:
    """For each layer (given by its cache tensors), why `rules` did not fire there: the best-scoring
    failed attempt at a node downstream of that layer's cache (the check()'s reason, or the pattern
    step that did not match), and the node. The model is left as it is."""
    tracer = _EveryMiss()
    rules.apply_to_model(model, tracer=tracer)
    found = {}
    for layer, values in layers.items():
        near = downstream_nodes(values)
        misses = [m for m in tracer.misses if id(m.root_node) in near]
        if not misses:
            found[layer] = "no attention pattern came close downstream of its cache"
            continue
        best = max(misses, key=lambda m: m.score())
        found[layer] = f"{best.match_result.reason or 'the pattern did not match'} (at node {best.root_node.name!r})"
    return found


def describe_by_layer(reasons: dict[int, str]) -> str:
    """{0: r, 1: r, 3: q} -> "layers 0-1: r; layer 3: q" (the node names differ per layer, so
    layers are grouped by the reason with its node name stripped; the first layer's node is shown)."""
    import re

    groups: dict[str, list[int]] = {}
    shown: dict[str, str] = {}
    for layer in sorted(reasons):
        key = re.sub(r" \(at node '.*'\)$", "", reasons[layer])
        groups.setdefault(key, []).append(layer)
        shown.setdefault(key, reasons[layer])
    parts = []
    for key, layers in groups.items():
        spans, start = [], layers[0]
        for a, b in zip(layers, layers[1:] + [None]):
            if b != a + 1:
                spans.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        label = f"layer {spans[0]}" if len(layers) == 1 else f"layers {', '.join(spans)}"
        parts.append(f"{label}: {shown[key]}")
    return "; ".join(parts)


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


def strip_noop_output_casts(model: ir.Model) -> int:
    """A graph output written as Cast(x, to=<x's own type>) (GPT-J casts its cache to the model
    dtype, float to float) becomes x itself, under the output's name."""
    count = 0
    graph = model.graph
    for i, out in enumerate(list(graph.outputs)):
        node = out.producer()
        if node is None or node.op_type != "Cast" or node.domain != "":
            continue
        src = node.inputs[0]
        dtype = src.dtype if src is not None else None
        if dtype is None and src is not None and (p := src.producer()) is not None and p.op_type == "Concat":
            dtype = next((v.dtype for v in p.inputs if v is not None and v.dtype is not None), None)  # the cache's
        if dtype is None or node.attributes.get_int("to") != dtype.value:
            continue
        if src.is_graph_input() or src.is_graph_output():
            continue
        name = out.name
        src.type = src.type or out.type  # TorchScript exports leave intermediates untyped; outputs need it
        src.shape = src.shape or out.shape
        graph.outputs[i] = src
        ir.convenience.replace_all_uses_with(out, src)  # other readers of the cast (Attention, Shape)
        graph.remove(node, safe=True)
        src.name = name
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


def rewrite_decomposed_attention(model: ir.Model, head_dim: int | None) -> dict[str, int]:
    done: dict[str, int] = {}
    if upgrade_opset(model):
        done["opset_upgraded_to_23"] = 1
    n = attention_rules(head_dim).apply_to_model(model)
    if n:
        done["decomposed_attention_to_Attention"] = n
    return done
