"""token_dropping, mode encoder: a BERT-style encoder (all-MiniLM-L6-v2) keeps, after `start_layer`,
only the tokens that receive the most attention from CLS (or from every query), plus CLS and SEP.

The rewrite is structural, not a mask. At the input of layer `start_layer` the graph

  1. scores every token: the attention probabilities of layer `start_layer - 1` (its Softmax
     output), row 0 (CLS) or all real query rows, summed over heads — or a random or positional
     score for the baselines;
  2. forces CLS (index 0) and SEP (the last real token) in and padding out;
  3. keeps the `k` best (TopK), in text order (a second TopK over the indices);
  4. gathers their hidden states (GatherND, batch_dims 1) and their attention-mask entries.

Layers from `start_layer` on then run on `k` tokens: their additive attention mask is rebuilt
from the kept mask entries, and every Reshape there whose target shape read the input's sequence
length reads `k` instead. The output `last_hidden_state` has `k` rows; two new outputs say which
tokens they are (`optc.kept_token_indices`) and which are padding (`optc.kept_attention_mask`),
so that mean pooling runs on the kept tokens only.

With `reduce="merge"` (ToMe, Bolya et al. 2023) the tokens that are not kept are merged rather
than discarded: each real token goes to the kept token most similar to it (cosine of the hidden
states at the cut, or of the previous layer's keys averaged over heads), by ArgMax over a [S, k]
similarity MatMul; a one-hot [k, S] MatMul sums the states, divided by each kept row's size (the
tokens it stands for). Later layers add log(size) to every key's attention logits (proportional
attention), and the sizes are a third output (`optc.kept_token_sizes`), the weights of the mean
pooling, which therefore still averages every real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optc.passes.base import PassConfigError
from optc.passes.rules.builders import const, ints, name_nodes
from optc.passes.rules.layers import downstream, is_weight, reshape_rows_to
from optc.runtime.manifest import ATTENTION_MASK, KEPT_ATTENTION_MASK, KEPT_TOKEN_INDICES, KEPT_TOKEN_SIZES

_THROUGH = {"Transpose", "Reshape", "Add", "Mul", "Div", "Cast"}
BIG = np.float32(1e30)
RANDOM_TABLE = 8192  # positions the random baseline scores (encoders take 512)


@dataclass
class EncoderLayer:
    index: int
    hidden: ir.Value       # the layer's input hidden state [B, S, H]
    softmax: ir.Node       # its attention probabilities [B, heads, S, S]
    mask_add: ir.Node      # Add(scores, additive mask)
    mask_slot: int         # which input of mask_add is the mask


def _projection_input(v: ir.Value) -> ir.Value | None:
    """Walk back from a query/key tensor through reshapes, transposes and bias adds to the MatMul
    with a weight; its activation input is the layer's hidden state."""
    for _ in range(12):
        node = v.producer()
        if node is None:
            return None
        if node.op_type == "MatMul" and is_weight(node.inputs[1]):
            return node.inputs[0]
        if node.op_type not in _THROUGH:
            return None
        acts = [x for x in node.inputs[:1 if node.op_type in ("Reshape", "Transpose", "Cast") else 2]
                if x is not None and not is_weight(x)]
        if len(acts) != 1:
            return None
        v = acts[0]
    return None


def find_encoder_layers(graph: ir.Graph) -> list[EncoderLayer]:
    """Each Softmax over Add(scaled Q·Kᵀ, mask) is one layer's attention; the hidden state that
    feeds its query projection is the layer input. Raises PassConfigError naming what is missing."""
    layers = []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        add = node.inputs[0].producer()
        if add is None or add.op_type != "Add":
            raise PassConfigError(None, f"Softmax {node.name!r}: its input is not Add(scores, mask) "
                                        f"(found {add.op_type if add else 'a graph input'})")
        slot = next((i for i, x in enumerate(add.inputs) if x.producer() is not None
                     and x.producer().op_type not in ("Mul", "Div", "MatMul")), None)
        if slot is None:
            raise PassConfigError(None, f"Softmax {node.name!r}: no additive attention mask beside the scores")
        qk = add.inputs[1 - slot]
        while qk.producer() is not None and qk.producer().op_type in ("Mul", "Div"):
            qk = qk.producer().inputs[0]
        matmul = qk.producer()
        if matmul is None or matmul.op_type != "MatMul":
            raise PassConfigError(None, f"Softmax {node.name!r}: scores are not a MatMul of queries and keys")
        hidden = _projection_input(matmul.inputs[0])
        if hidden is None:
            raise PassConfigError(None, f"Softmax {node.name!r}: no query projection (MatMul by a weight) found")
        layers.append(EncoderLayer(len(layers), hidden, node, add, slot))
    if not layers:
        raise PassConfigError(None, "no encoder attention found (Softmax over Add(scaled Q·Kᵀ, mask)); "
                                    "mode encoder expects a BERT-style export such as `optc export` writes")
    return layers


def _keys_transposed(layer: EncoderLayer) -> ir.Value:
    """Kᵀ of a layer's attention, [B, heads, head_dim, S]: the second input of the scores' MatMul."""
    qk = layer.mask_add.inputs[1 - layer.mask_slot]
    while qk.producer() is not None and qk.producer().op_type in ("Mul", "Div"):
        qk = qk.producer().inputs[0]
    return qk.producer().inputs[1]


def rewrite_encoder(model: ir.Model, *, keep: float | int, start_layer: int, score: str, query: str,
                    seed: int, reduce: str = "drop", merge_by: str = "hidden", min_tokens: int = 0) -> bool:
    """Rewrite in place; False when the graph already drops tokens."""
    graph = model.graph
    if any(v.name == KEPT_TOKEN_INDICES for v in graph.outputs):
        return False
    layers = find_encoder_layers(graph)
    n = len(layers)
    if start_layer >= n:
        raise PassConfigError("start_layer", f"start_layer ({start_layer}) must be below the encoder's "
                                             f"{n} layers")
    if score == "attention" and start_layer < 1:
        raise PassConfigError("start_layer", "score attention needs start_layer >= 1 (tokens are scored by the "
                                             "attention of the layer before start_layer)")
    if reduce == "merge" and merge_by == "key" and start_layer < 1:
        raise PassConfigError("start_layer", "merge_by key needs start_layer >= 1 (tokens are matched by the keys "
                                             "of the layer before start_layer)")
    mask_in = next((v for v in graph.inputs if v.name == ATTENTION_MASK), None)
    if mask_in is None:
        raise PassConfigError(None, f"mode encoder needs an {ATTENTION_MASK} graph input")
    if len(graph.outputs) != 1:
        raise PassConfigError(None, f"mode encoder expects one output (the hidden states), found "
                                    f"{len(graph.outputs)}")
    out = graph.outputs[0]
    layer = layers[start_layer]
    h = layer.hidden

    t = tape.Tape()
    c = lambda x: const(t, x)  # noqa: E731
    i64 = lambda *xs: ints(t, *xs)  # noqa: E731
    mask_f = t.op("Cast", [mask_in], {"to": ir.DataType.FLOAT})                       # [B, S]
    real = t.op("Cast", [mask_in], {"to": ir.DataType.BOOL})
    seq = t.op("Shape", [mask_in], {"start": 1, "end": 2})                            # [1]
    positions = t.op("Range", [c(np.int64(0)), t.op("Squeeze", [seq, i64(0)]), c(np.int64(1))])  # [S]
    if score == "attention":
        probs = layers[start_layer - 1].softmax.outputs[0]                            # [B, h, S, S]
        if query == "cls":
            rows = t.op("Gather", [probs, c(np.int64(0))], {"axis": 2})                      # [B, h, S]
            scores = t.op("ReduceSum", [rows, i64(1)], {"keepdims": 0})                # [B, S]
        else:  # every real query row
            weighted = t.op("Mul", [probs, t.op("Unsqueeze", [mask_f, i64(1, 3)])])
            scores = t.op("ReduceSum", [weighted, i64(1, 2)], {"keepdims": 0})
    elif score == "random":
        # a fixed random score per position (ONNX Runtime implements no RandomUniformLike at opset 22)
        table = np.random.default_rng(seed).random(RANDOM_TABLE).astype(np.float32)
        scores = t.op("Unsqueeze", [t.op("Slice", [c(table), i64(0), seq]), i64(0)])  # [1, S]
    else:  # recent: the latest real tokens
        scores = t.op("Cast", [t.op("Unsqueeze", [positions, i64(0)])], {"to": ir.DataType.FLOAT})  # [1, S]
    last_real = t.op("Sub", [t.op("ReduceSum", [mask_in, i64(1)], {"keepdims": 1}), i64(1)])  # [B, 1] (SEP)
    pos_row = t.op("Unsqueeze", [positions, i64(0)])                                  # [1, S]
    forced = t.op("Or", [t.op("Equal", [pos_row, i64(0)]), t.op("Equal", [pos_row, last_real])])
    ranked = t.op("Where", [t.op("Not", [real]), c(-BIG), t.op("Where", [forced, c(BIG), scores])])
    if isinstance(keep, float):
        k = t.op("Cast", [t.op("Ceil", [t.op("Mul", [t.op("Cast", [seq], {"to": ir.DataType.FLOAT}),
                                                      c(np.array([keep], np.float32))])])],
                 {"to": ir.DataType.INT64})
        k = t.op("Max", [k, i64(1)])
    else:
        k = t.op("Min", [seq, i64(keep)])
    if min_tokens:  # short inputs stay whole; longer ones keep at least min_tokens
        k = t.op("Max", [k, t.op("Min", [seq, i64(min_tokens)])])
    _, chosen = t.op_multi_out("TopK", [ranked, k], {"axis": -1, "largest": 1, "sorted": 0}, num_outputs=2)
    kept, _ = t.op_multi_out("TopK", [chosen, k], {"axis": -1, "largest": 0, "sorted": 1}, num_outputs=2)
    kept_col = t.op("Unsqueeze", [kept, i64(-1)])                                     # [B, k, 1]
    h_kept = t.op("GatherND", [h, kept_col], {"batch_dims": 1})                       # [B, k, H]
    mask_kept = t.op("GatherElements", [mask_in, kept], {"axis": 1})                  # [B, k]
    pad_kept = t.op("Unsqueeze", [t.op("Equal", [mask_kept, i64(0)]), i64(1, 2)])      # [B, 1, 1, k]
    additive = t.op("Where", [pad_kept, c(np.float32(np.finfo(np.float32).min)), c(np.float32(0))])
    sizes = None
    if reduce == "merge":
        # ToMe-style: every real token that is not kept is added into the kept token it is most
        # similar to (cosine of the metric at the cut); a kept row becomes the mean of the tokens it
        # stands for, and its size (how many) weights it in later attention and in pooling.
        if merge_by == "key":  # the previous layer's keys, averaged over heads (as ToMe matches)
            kt = t.op("ReduceMean", [_keys_transposed(layers[start_layer - 1]), i64(1)], {"keepdims": 0})
            metric = t.op("Transpose", [kt], {"perm": [0, 2, 1]})                    # [B, S, d]
        else:
            metric = h                                                                # [B, S, H]
        norm = t.op("Max", [t.op("ReduceL2", [metric, i64(-1)], {"keepdims": 1}), c(np.float32(1e-12))])
        unit = t.op("Div", [metric, norm])
        dest = t.op("GatherND", [unit, kept_col], {"batch_dims": 1})                  # [B, k, d]
        sim = t.op("MatMul", [unit, t.op("Transpose", [dest], {"perm": [0, 2, 1]})])  # [B, S, k]
        own = t.op("Equal", [t.op("Unsqueeze", [positions, i64(0, 2)]),              # [B, S, k]: a kept token
                             t.op("Unsqueeze", [kept, i64(1)])])                      # goes to its own row
        dest_ok = t.op("Unsqueeze", [t.op("Cast", [mask_kept], {"to": ir.DataType.BOOL}), i64(1)])  # not padding
        sim = t.op("Where", [own, c(BIG), t.op("Where", [dest_ok, sim, c(-BIG)])])
        assign = t.op("ArgMax", [sim], {"axis": 2, "keepdims": 1})                   # [B, S, 1]
        slots = t.op("Range", [c(np.int64(0)), t.op("Squeeze", [k, i64(0)]), c(np.int64(1))])  # [k]
        onehot = t.op("Mul", [t.op("Cast", [t.op("Equal", [assign, slots])], {"to": ir.DataType.FLOAT}),
                              t.op("Unsqueeze", [mask_f, i64(-1)])])                  # [B, S, k], real only
        sizes = t.op("ReduceSum", [onehot, i64(1)], {"keepdims": 0})                  # [B, k]
        summed = t.op("MatMul", [t.op("Transpose", [onehot], {"perm": [0, 2, 1]}), h])  # [B, k, H]
        size_col = t.op("Unsqueeze", [sizes, i64(-1)])
        merged = t.op("Div", [summed, t.op("Max", [size_col, c(np.float32(1))])])
        # padding rows (size 0) keep their own state, so that keep 1.0 is the dense graph exactly
        h_kept = t.op("Where", [t.op("Greater", [size_col, c(np.float32(0))]), merged, h_kept])
        # proportional attention: a key standing for n tokens gets log(n) added to its logits
        log_size = t.op("Log", [t.op("Max", [sizes, c(np.float32(1))])])
        additive = t.op("Add", [additive, t.op("Unsqueeze", [log_size, i64(1, 2)])])
    name_nodes(t.nodes, f"optc/token_dropping/layer{start_layer}")
    kept.name, mask_kept.name = KEPT_TOKEN_INDICES, KEPT_ATTENTION_MASK
    if sizes is not None:
        sizes.name = KEPT_TOKEN_SIZES
    h_kept.name = f"{h.name}.kept"

    graph.insert_after(h.producer(), t.nodes)  # sorted topologically at the end
    reads_h = {nd for nd in t.nodes if h in nd.inputs}
    for use in list(h.uses()):
        if use.node not in reads_h:
            use.node.replace_input_with(use.idx, h_kept)

    region = downstream(graph, [h_kept])
    in_region = {v for nd in region for v in nd.outputs} | {h_kept}
    # later layers: the mask over kept tokens, Reshapes to k rows
    for lay in layers[start_layer:]:
        lay.mask_add.replace_input_with(lay.mask_slot, additive)
    added = reshape_rows_to(graph, region, in_region, k, "optc/token_dropping")
    # anything else in the region that still reads a sequence-length-derived value is unsupported
    new_nodes = added | set(t.nodes)
    for node in region:
        if node.op_type == "Reshape" or node in new_nodes:
            continue
        for x in node.inputs:
            if x is None or x in in_region or is_weight(x) or x is additive:
                continue
            if x.producer() is not None and x.producer() in new_nodes:
                continue
            if x.shape is not None and len(x.shape) == 0:
                continue  # a computed scalar (e.g. a scale)
            raise PassConfigError(None, f"node {node.name!r} after start_layer reads {x.name!r}, computed over "
                                        f"the full sequence; mode encoder cannot rewrite it")
    for nd in region:
        for v in nd.outputs:
            if v is not out:
                v.shape = None
    out.shape = ir.Shape([out.shape[0] if out.shape else "batch", "optc_kept_tokens", *(out.shape[2:] if out.shape
                                                                                         else [])])
    extra = [(kept, ir.DataType.INT64), (mask_kept, ir.DataType.INT64)]
    if sizes is not None:
        extra.append((sizes, ir.DataType.FLOAT))
    for v, dtype in extra:
        v.type = ir.TensorType(dtype)
        v.shape = ir.Shape([out.shape[0], "optc_kept_tokens"])
        graph.outputs.append(v)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)
    return True
