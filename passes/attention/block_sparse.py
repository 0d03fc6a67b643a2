"""block_sparse: block-sparse prefill attention.

For a prefill step (empty cache, at least two blocks of tokens) each layer's Attention op is
replaced by an `If`: the then-branch computes attention only over selected key blocks, the
else-branch is the original dense op (decode steps, short prompts, continued prefill).

Per query block of `block_size` tokens the keys come from: the first `sink_blocks` blocks, the
`local_blocks` blocks ending at the query's own block, and the best-scoring remaining blocks up
to `budget_blocks` in all, scored cheaply by the dot product of mean-pooled query and key blocks
(as in XAttention / DHSA's block scoring). Selected blocks are gathered (GatherND) and only they
enter the QK^T, softmax and PV products: dropped blocks are never computed. Token-level causality
is applied inside the selected blocks.

Batch 1. The attention mask matters in one way only: query rows it masks out (padding that a
static-shape backend appends after the prompt) are zeroed before pooling, so they cannot change
which blocks the real queries select. Unpadded, the mask is all ones and this changes nothing.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
from onnx_ir import tape
from pydantic import Field, field_validator

from optc.config import PassOptions
from optc.passes.base import ATTENTION_PROBABILITIES, MODEL_DECODER, SPARSE_PREFILL, Contract, OptcPass
from optc.passes.rules.builders import const as _c
from optc.passes.rules.builders import ints, name_nodes, replace_keeping_output
from optc.runtime.manifest import ATTENTION_MASK, BLOCK_SPARSE_IF_SUFFIX

PERPLEXITY_BUDGET = 0.03


def budget_fits(v, info):
    """budget_blocks >= sink_blocks + local_blocks (a validator; sparse_attention's options use it too)."""
    forced = info.data.get("sink_blocks", 0) + info.data.get("local_blocks", 0)
    if v < forced:
        raise ValueError(f"budget_blocks ({v}) must be at least sink_blocks + local_blocks ({forced})")
    return v


class BlockSparseOptions(PassOptions):
    block_size: int = Field(64, gt=1, description="tokens per block")
    sink_blocks: int = Field(1, ge=0, description="initial key blocks every query block sees")
    local_blocks: int = Field(2, ge=1, description="key blocks up to and including the query's own")
    budget_blocks: int = Field(8, gt=0, description="key blocks per query block in all "
                                                    "(the rest chosen by pooled block scores)")

    budget_fits = field_validator("budget_blocks")(budget_fits)


class BlockSparse(OptcPass):
    """Block-sparse prefill: each query block attends to sink, local and top-scoring key blocks."""

    name = "block_sparse"

    @classmethod
    def contract(cls, options) -> Contract:
        return Contract(requires=frozenset({MODEL_DECODER}), ensures=frozenset({SPARSE_PREFILL}),
                        conflicts={ATTENTION_PROBABILITIES: "block_sparse prefill cannot report the attention "
                                                            "scores that H2O eviction needs"})

    @classmethod
    def declared_perplexity_budget(cls, options) -> float | None:
        return PERPLEXITY_BUDGET

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: BlockSparseOptions = self.options
        info = self.context.decoder
        graph = model.graph
        nodes = {n.name: n for n in graph}
        mask = next((v for v in graph.inputs if v.name == ATTENTION_MASK), None)
        changed = False
        for layer in info.layers:
            attn = nodes.get(layer.attention)
            if attn is None or attn.op_type != "Attention":
                continue  # already wrapped in an If (a second run)
            q, k, v = attn.inputs[0], attn.inputs[1], attn.inputs[2]
            scale = attn.attributes.get_float("scale", 0.0) or 1.0 / np.sqrt(info.head_dim)
            t = tape.Tape()
            i64 = functools.partial(ints, t)
            q_len = t.op("Slice", [t.op("Shape", [q]), i64(2), i64(3)])
            kv_len = t.op("Slice", [t.op("Shape", [k]), i64(2), i64(3)])
            cond = t.op("And", [t.op("Equal", [q_len, kv_len]),
                                t.op("GreaterOrEqual", [q_len, i64(2 * o.block_size)])])
            cond = t.op("Squeeze", [cond, i64(0)])
            then = block_sparse_branch(q, k, v, q_heads=info.num_heads, kv_heads=info.kv_heads,
                                       head_dim=info.head_dim, scale=float(scale), block=o.block_size,
                                       sink_blocks=o.sink_blocks, local_blocks=o.local_blocks,
                                       budget_blocks=o.budget_blocks, prefix=attn.name, mask=mask)
            dense = ir.Node("", "Attention", list(attn.inputs), attributes=list(attn.attributes.values()),
                            num_outputs=1, name=f"{attn.name}/dense")
            dense.outputs[0].name = f"{attn.name}/dense/out"
            els = ir.Graph([], [dense.outputs[0]], nodes=[dense], name=f"{attn.name}_dense")
            wrapped = ir.Node("", "If", [cond], attributes=[ir.AttrGraph("then_branch", then),
                                                             ir.AttrGraph("else_branch", els)],
                              num_outputs=1, name=f"{attn.name}{BLOCK_SPARSE_IF_SUFFIX}")
            name_nodes(t.nodes, f"{attn.name}/prefill_test")
            graph.insert_before(attn, t.nodes)
            replace_keeping_output(graph, attn, wrapped, before=True)
            layer.attention = wrapped.name
            changed = True
        # static-shape backends compile the sparse and the dense prefill separately and pick by
        # the real prompt length (the If tests the padded one)
        self.context.runtime.block_sparse_min_prefill = 2 * o.block_size
        return ir.passes.PassResult(model, changed)


def block_sparse_branch(q: ir.Value, k: ir.Value, v: ir.Value, *, q_heads: int, kv_heads: int, head_dim: int,
                        scale: float, block: int, sink_blocks: int, local_blocks: int, budget_blocks: int,
                        prefix: str, mask: ir.Value | None = None) -> ir.Graph:
    """A graph (no inputs; reads q, k, v from the outer scope) computing block-sparse causal
    attention for q [B, Hq, S, D] over k, v [B, Hkv, S, D] (empty cache: keys = queries' tokens)."""
    t = tape.Tape()
    rep = q_heads // kv_heads
    i64 = functools.partial(ints, t)
    if mask is not None:  # [B, T] with T == S (empty cache) -> [B, 1, S, 1]
        q = t.op("Mul", [q, t.op("Unsqueeze", [t.op("Cast", [mask], {"to": ir.DataType.FLOAT}), i64(1, 3)])])
    seq = t.op("Slice", [t.op("Shape", [q]), i64(2), i64(3)])                       # [S]
    pad = t.op("Mod", [t.op("Sub", [i64(block), t.op("Mod", [seq, i64(block)])]), i64(block)])
    pads = t.op("Concat", [i64(0, 0, 0, 0, 0, 0), pad, i64(0)], {"axis": 0})
    qp, kp, vp = (t.op("Pad", [x, pads]) for x in (q, k, v))                        # S' = S + pad
    nb = t.op("Div", [t.op("Add", [seq, pad]), i64(block)])                         # [nb]

    qb = t.op("Reshape", [qp, i64(0, kv_heads, rep, -1, block, head_dim)])          # [B,Hkv,r,nb,b,D]
    kb = t.op("Reshape", [kp, i64(0, kv_heads, -1, block, head_dim)])               # [B,Hkv,nb,b,D]
    vb = t.op("Reshape", [vp, i64(0, kv_heads, -1, block, head_dim)])

    # cheap block scores from mean-pooled blocks, with forced (sink / local) and forbidden (future) blocks
    q_pool = t.op("ReduceMean", [qb, i64(4)], {"keepdims": 0})                       # [B,Hkv,r,nb,D]
    k_pool = t.op("Unsqueeze", [t.op("ReduceMean", [kb, i64(3)], {"keepdims": 0}), i64(2)])  # [B,Hkv,1,nb,D]
    block_scores = t.op("MatMul", [q_pool, t.op("Transpose", [k_pool], {"perm": [0, 1, 2, 4, 3]})])
    nb_scalar = t.op("Squeeze", [nb, i64(0)])
    idx = t.op("Range", [_c(t, np.int64(0)), nb_scalar, _c(t, np.int64(1))])
    qi = t.op("Unsqueeze", [idx, i64(1)])                                           # [nb,1]
    kj = t.op("Unsqueeze", [idx, i64(0)])                                           # [1,nb]
    future = t.op("Greater", [kj, qi])
    local = t.op("And", [t.op("Greater", [kj, t.op("Sub", [qi, i64(local_blocks)])]), t.op("Not", [future])])
    forced = t.op("Or", [t.op("Less", [kj, i64(sink_blocks)]), local])
    bias = t.op("Where", [future, _c(t, np.float32(-1e30)),
                          t.op("Where", [forced, _c(t, np.float32(1e30)), _c(t, np.float32(0))])])
    ranked = t.op("Add", [block_scores, bias])
    keep = t.op("Min", [nb, i64(budget_blocks)])
    _, chosen = t.op_multi_out("TopK", [ranked, keep], {"axis": -1, "largest": 1, "sorted": 0}, num_outputs=2)
    chosen_u = t.op("Unsqueeze", [chosen, i64(-1)])                                  # [B,Hkv,r,nb,k,1]

    # gather only the chosen key / value blocks
    k_sel = t.op("Reshape", [t.op("GatherND", [kb, chosen_u], {"batch_dims": 2}), i64(0, 0, 0, 0, -1, head_dim)])
    v_sel = t.op("Reshape", [t.op("GatherND", [vb, chosen_u], {"batch_dims": 2}), i64(0, 0, 0, 0, -1, head_dim)])
    scores = t.op("Mul", [t.op("MatMul", [qb, t.op("Transpose", [k_sel], {"perm": [0, 1, 2, 3, 5, 4]})]),
                          _c(t, np.float32(scale))])                                # [B,Hkv,r,nb,b,k*b]
    key_pos = t.op("Add", [t.op("Mul", [chosen_u, i64(block)]), t.op("Range", [_c(t, np.int64(0)),
                                                                                _c(t, np.int64(block)),
                                                                                _c(t, np.int64(1))])])
    key_pos = t.op("Reshape", [key_pos, i64(0, 0, 0, 0, 1, -1)])                    # [B,Hkv,r,nb,1,k*b]
    q_total = t.op("Squeeze", [t.op("Mul", [nb, i64(block)]), i64(0)])
    q_pos = t.op("Reshape", [t.op("Range", [_c(t, np.int64(0)), q_total, _c(t, np.int64(1))]),
                             i64(-1, block, 1)])                                    # [nb,b,1]
    masked = t.op("Where", [t.op("Greater", [key_pos, q_pos]), _c(t, np.float32(-np.inf)), scores])
    probs = t.op("Softmax", [masked], {"axis": -1})
    out = t.op("MatMul", [probs, v_sel])                                            # [B,Hkv,r,nb,b,D]
    out = t.op("Reshape", [out, i64(0, q_heads, -1, head_dim)])
    out = t.op("Slice", [out, i64(0), seq, i64(2)])                                 # drop the padding
    name_nodes(t.nodes, f"{prefix}/block_sparse")
    out.name = f"{prefix}/block_sparse/out"
    return ir.Graph([], [out], nodes=t.nodes, name=f"{prefix}_block_sparse")
