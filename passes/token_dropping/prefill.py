"""token_dropping, mode prefill: a decoder's prefill keeps, from layer `start_layer` on, only the
prompt tokens that matter (FastV / LazyLLM style); later layers compute and cache only those.

The rewrite is structural, not a mask. At the input of layer `start_layer` (the residual stream
after layer `start_layer - 1`) the graph

  1. scores every new token: the attention probabilities that the last `query_window` rows of
     layer `start_layer` give it, computed for those rows only from a copy of that layer's query
     and key projections (with RoPE) over every token — causal, GQA-grouped, summed over heads
     and rows — or a random or positional score for the baselines;
  2. forces the first `sinks` and the last `recent` tokens in;
  3. keeps the `k` best (TopK), in text order (a second TopK over the indices);
  4. gathers their hidden states (GatherND) and their position ids (GatherElements).

Layers from `start_layer` on then run on `k` tokens: their rotary tables are recomputed from the
kept tokens' original positions, their causal mask is rebuilt over their own cache (its length
read from the layer's past keys), and every Reshape there whose target shape read the step's
token count reads `k` instead. Their new keys/values (and so the runtime's cache for those
layers) hold the kept tokens only; the logits are the kept tokens' (the last token is always
kept). Tokens are dropped only in a step that starts from an empty cache (the prompt's prefill):
with a cache, `k` is the step's token count and the gathers are the identity, so decode attends
to the full cache in early layers and to the pruned one in later layers (per-layer cache lengths,
kept by the runtime: `KVCacheSpec.pruned_from_layer`). The scoring, the choice and the gathers run
inside an If on that empty cache (`select_gate`), so a decode step computes none of them: its
other branch passes the hidden states, the position ids and the token count through.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optc.passes.base import PassConfigError
from optc.passes.rules.builders import clone_cone, const, ints, name_nodes
from optc.passes.rules.layers import (attention_nodes, cache_value, downstream, is_weight, reshape_rows_to,
                                      residual_input)
from optc.runtime.manifest import POSITION_IDS, past_name

BIG = np.float32(1e30)
# values of the rewrite that a later pass reads (late_slots): the kept tokens' position ids [B, k],
# and the slots of the later layers' own cache: the step's queries [k] and every key [past + k]
POSITIONS_KEPT, LATE_QUERY_SLOTS, LATE_KEY_SLOTS = "position_ids_kept", "late_query_slots", "late_key_slots"


def late_slots(graph: ir.Graph) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(kept tokens' position ids, query slots, key slots) of the later layers of a graph that
    token_dropping mode prefill rewrote, or None (sink_window numbers those layers' positions by
    these slots: each later layer's cache is its own)."""
    found = {}
    for node in graph:
        if node.name.startswith("optc/token_dropping/layer"):
            for v in node.outputs:
                tail = v.name.rsplit("/", 1)[-1]
                if tail in (POSITIONS_KEPT, LATE_QUERY_SLOTS, LATE_KEY_SLOTS):
                    found[tail] = v
    if len(found) != 3:
        return None
    return found[POSITIONS_KEPT], found[LATE_QUERY_SLOTS], found[LATE_KEY_SLOTS]


def _step_dims(graph: ir.Graph) -> tuple[str | None, str | None]:
    """The symbols of input_ids' batch and token axes (None where not symbolic)."""
    ids = {v.name: v for v in graph.inputs}.get("input_ids")
    if ids is None or ids.shape is None or len(ids.shape) != 2:
        return None, None
    return tuple(d.value if isinstance(d, ir.SymbolicDim) else None for d in ids.shape)


def _kept_shape(shape: ir.Shape | None, batch: str | None, tokens: str | None) -> ir.Shape | None:
    """A later layer's value shape once it holds the kept tokens: the step's token axis becomes
    `optc_kept_tokens`, other symbolic dims (cache lengths) unknown; the rank, the batch axis and
    the fixed sizes stay, so that a backend still sees [B, k, hidden] (ONNX Runtime's fused path
    packs the projections and fuses the norms of those layers by them)."""
    if shape is None or tokens is None:
        return None
    dims = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, ir.SymbolicDim) and d.value is not None and d.value == tokens:
            dims.append("optc_kept_tokens")
        elif isinstance(d, ir.SymbolicDim) and d.value is not None and d.value == batch:
            dims.append(batch)
        else:
            dims.append(None)
    return ir.Shape(dims)


def _reads_inputs(v: ir.Value, memo: dict) -> bool:
    """Whether `v` depends on a graph input (False: weights and what is computed from them)."""
    if v in memo:
        return memo[v]
    node = v.producer()
    memo[v] = v.is_graph_input() if node is None else any(
        _reads_inputs(x, memo) for x in node.inputs if x is not None)
    return memo[v]


def rewrite_prefill(model: ir.Model, info, *, keep: float | int, start_layer: int, sinks: int, recent: int,
                    query_window: int, score: str, seed: int) -> bool:
    """Rewrite in place; False when the graph already drops prompt tokens."""
    graph = model.graph
    if any(n.name.startswith("optc/token_dropping/") for n in graph):
        return False
    n_layers = info.n_layers
    if not 1 <= start_layer < n_layers:
        raise PassConfigError("start_layer", f"start_layer ({start_layer}) must be 1..{n_layers - 1} for this "
                                             f"{n_layers}-layer decoder (at least one layer sees every prompt token)")
    inputs = {v.name: v for v in graph.inputs}
    pos_in = inputs.get(POSITION_IDS)
    if pos_in is None:
        raise PassConfigError(None, f"mode prefill needs a {POSITION_IDS} graph input (kept tokens keep their "
                                    f"positions)")
    attns = attention_nodes(graph, info)
    first = attns[start_layer]
    if score == "attention" and first.attributes.get_float("softcap", 0.0):
        raise PassConfigError(None, f"layer {start_layer}'s Attention has a softcap; the attention score does not "
                                    f"model it")
    h = residual_input(first)
    if h is None or h.producer() is None:
        raise PassConfigError(None, f"layer {start_layer}: no residual hidden state found before its attention "
                                    f"(a pre-norm decoder layer: h + o_proj(Attention(...)))")
    # the later layers' cache length, read from the last layer's cache: layer_routing (which may
    # come after, and stops a skipped layer's cache) never skips the last layer
    past_k = cache_value(graph, past_name(n_layers - 1, "key"))  # (a graph input, or kv_quantize's dequantisation)
    if past_k is None:
        raise PassConfigError(None, f"no {past_name(n_layers - 1, 'key')} graph input")

    heads, kv_heads, head_dim = info.num_heads, info.kv_heads, info.head_dim
    score_nodes: set[ir.Node] = set()
    t = tape.Tape()
    c = lambda x: const(t, x)  # noqa: E731
    i64 = lambda *xs: ints(t, *xs)  # noqa: E731
    scalar = lambda v: t.op("Squeeze", [v, i64(0)])  # noqa: E731
    seq = t.op("Shape", [pos_in], {"start": 1, "end": 2})                             # [1] new tokens
    past_len = t.op("Shape", [past_k], {"start": 2, "end": 3})                       # [1] cached (late layers)
    positions = t.op("Range", [c(np.int64(0)), scalar(seq), c(np.int64(1))])          # [S]
    pos_row = t.op("Unsqueeze", [positions, i64(0)])                                  # [1, S]
    if score == "attention":
        # layer start_layer's own rotated queries and keys, computed on every token (a copy of
        # its projections reading the full hidden state; the layer itself then reads the kept rows)
        h_full = t.op("Identity", [h])
        memo_full: dict = {}
        q = clone_cone(first.inputs[0], h, h_full, graph, memo_full, "/score")        # [B,h,S,D]
        keys = clone_cone(first.inputs[1], h, h_full, graph, memo_full, "/score")     # [B,kv,T,D]
        score_nodes = {v.producer() for v in memo_full.values() if v.producer() is not None}
        scale = first.attributes.get_float("scale", 0.0) or float(1 / np.sqrt(head_dim))
        q_last = t.op("Slice", [q, i64(-query_window), i64(np.iinfo(np.int64).max), i64(2)])  # [B,h,W,D]
        w = t.op("Shape", [q_last], {"start": 2, "end": 3})
        grouped = t.op("Reshape", [q_last, i64(0, kv_heads, -1, head_dim)])          # [B,kv,g*W,D]
        logits = t.op("Mul", [t.op("MatMul", [grouped, t.op("Transpose", [keys], {"perm": [0, 1, 3, 2]})]),
                              c(np.float32(scale))])                                  # [B,kv,g*W,T]
        total = t.op("Shape", [keys], {"start": 2, "end": 3})
        logits = t.op("Reshape", [logits, t.op("Concat", [i64(0, kv_heads, heads // kv_heads), w, total],
                                                {"axis": 0})])                         # [B,kv,g,W,T]
        # row r of the W sits at cache index T - W + r and sees keys up to it
        rows = t.op("Add", [t.op("Range", [c(np.int64(0)), scalar(w), c(np.int64(1))]),
                            scalar(t.op("Sub", [total, w]))])
        cols = t.op("Range", [c(np.int64(0)), scalar(total), c(np.int64(1))])
        future = t.op("Greater", [t.op("Unsqueeze", [cols, i64(0)]), t.op("Unsqueeze", [rows, i64(1)])])
        logits = t.op("Where", [future, c(np.float32(-np.inf)), logits])
        probs = t.op("Softmax", [logits], {"axis": -1})
        received = t.op("ReduceSum", [probs, i64(1, 2, 3)], {"keepdims": 0})          # [B, T]
        scores = t.op("Slice", [received, t.op("Sub", [total, seq]), total, i64(1)])  # [B, S] the new tokens
    elif score == "random":
        # a fixed random score per position (ONNX Runtime has no RandomUniformLike at opset 23)
        table = np.random.default_rng(seed).random(max(8192, 4 * (info.context or 0))).astype(np.float32)
        scores = t.op("Unsqueeze", [t.op("Slice", [c(table), i64(0), seq]), i64(0)])  # [1, S]
    else:  # recent: the latest tokens (with the sinks: StreamingLLM's choice, applied to the prompt)
        scores = t.op("Cast", [pos_row], {"to": ir.DataType.FLOAT})
    forced = t.op("Or", [t.op("Less", [pos_row, i64(sinks)]),
                         t.op("GreaterOrEqual", [pos_row, t.op("Sub", [seq, i64(recent)])])])
    ranked = t.op("Where", [forced, c(BIG), scores])
    if isinstance(keep, float):
        base = t.op("Cast", [t.op("Ceil", [t.op("Mul", [t.op("Cast", [seq], {"to": ir.DataType.FLOAT}),
                                                         c(np.array([keep], np.float32))])])],
                    {"to": ir.DataType.INT64})
    else:
        base = i64(keep)
    k_drop = t.op("Min", [seq, t.op("Max", [base, i64(sinks + recent)])])
    # tokens are dropped only from a prompt prefilled into an empty cache
    k = t.op("Where", [t.op("Equal", [past_len, i64(0)]), k_drop, seq])              # [1]
    _, chosen = t.op_multi_out("TopK", [ranked, k], {"axis": -1, "largest": 1, "sorted": 0}, num_outputs=2)
    kept, _ = t.op_multi_out("TopK", [chosen, k], {"axis": -1, "largest": 0, "sorted": 1}, num_outputs=2)
    kept = t.op("Expand", [kept, t.op("Concat", [t.op("Shape", [pos_in], {"start": 0, "end": 1}), k],
                                      {"axis": 0})])                                  # [B, k]
    h_kept = t.op("GatherND", [h, t.op("Unsqueeze", [kept, i64(-1)])], {"batch_dims": 1})    # [B, k, H]
    pos_kept = t.op("GatherElements", [pos_in, kept], {"axis": 1})                    # [B, k]
    # the later layers' causal mask over their own cache: past (all visible) + the kept tokens
    total_late = t.op("Add", [past_len, k])
    key_idx = t.op("Range", [c(np.int64(0)), scalar(total_late), c(np.int64(1))])
    query_idx = t.op("Add", [t.op("Range", [c(np.int64(0)), scalar(k), c(np.int64(1))]), scalar(past_len)])
    allowed = t.op("LessOrEqual", [t.op("Unsqueeze", [key_idx, i64(0)]), t.op("Unsqueeze", [query_idx, i64(1)])])
    allowed = t.op("Unsqueeze", [allowed, i64(0, 1)])                                 # [1, 1, k, T_late]
    old_mask = first.inputs[3] if len(first.inputs) > 3 else None
    if old_mask is None:
        raise PassConfigError(None, f"layer {start_layer}'s Attention takes no mask (mode prefill rebuilds the "
                                    f"causal mask of the later layers)")
    if old_mask.dtype == ir.DataType.BOOL:
        late_mask = allowed
    else:  # an additive float mask
        late_mask = t.op("Where", [allowed, c(np.float32(0)), c(np.float32(np.finfo(np.float32).min))])
    prefix = f"optc/token_dropping/layer{start_layer}"
    name_nodes(t.nodes, prefix)
    h_kept.name = f"{prefix}/hidden_kept"
    pos_kept.name = f"{prefix}/{POSITIONS_KEPT}"
    k.name = f"{prefix}/kept_count"
    query_idx.name, key_idx.name = f"{prefix}/{LATE_QUERY_SLOTS}", f"{prefix}/{LATE_KEY_SLOTS}"

    graph.insert_after(h.producer(), t.nodes)  # sorted topologically at the end
    for use in list(h.uses()):
        if use.node is not h_kept.producer() and use.node not in t.nodes:
            use.node.replace_input_with(use.idx, h_kept)

    region = downstream(graph, [h_kept])
    in_region = {v for nd in region for v in nd.outputs} | {h_kept}
    new_nodes = set(t.nodes) | score_nodes
    late = attns[start_layer:]
    if any(a not in region for a in late):
        raise PassConfigError(None, f"the layers after {start_layer} do not all read layer {start_layer}'s hidden "
                                    f"state")
    for a in late:
        a.replace_input_with(3, late_mask)
    # rotary: the later layers' cos/sin from the kept tokens' own positions
    memo: dict = {}
    added: list[ir.Node] = []
    for node in region:
        if node.op_type != "RotaryEmbedding":
            continue
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            raise PassConfigError(None, f"{node.name!r}: a RotaryEmbedding with its own position ids")
        for slot in (1, 2):
            before = len(graph)
            new = clone_cone(node.inputs[slot], pos_in, pos_kept, graph, memo, "/kept")
            added.extend(list(graph)[before:])
            if new is node.inputs[slot] and new not in in_region:
                raise PassConfigError(None, f"{node.name!r}: its rotary table does not depend on {POSITION_IDS}")
            node.replace_input_with(slot, new)
    new_nodes |= set(added)
    in_region |= {v for nd in added for v in nd.outputs}
    # Reshapes in the later layers: k rows where the shape read the step's token count (axis 1)
    new_nodes |= reshape_rows_to(graph, region, in_region, k, prefix)
    # anything else in the later layers that reads a value computed over all the step's tokens
    late_past = {past_name(i, kind) for i in range(start_layer, n_layers) for kind in ("key", "value")}
    late_cache = {cache_value(graph, name) for name in late_past} - {None}
    reads: dict = {}
    for node in region:
        if node.op_type == "Reshape" or node in new_nodes:
            continue
        for x in node.inputs:
            if x is None or x in in_region or x is late_mask or not _reads_inputs(x, reads):
                continue
            if x.producer() is not None and x.producer() in new_nodes:
                continue
            if x in late_cache:  # a later layer's own cache
                continue
            if x.shape is not None and len(x.shape) == 0:
                continue  # a computed scalar
            raise PassConfigError(None, f"node {node.name!r} in layer >= {start_layer} reads {x.name!r}, computed "
                                        f"over all the step's tokens; mode prefill cannot rewrite it")
    # the early layers (and the mask they share) must not read a later layer's cache length (a
    # dynamo export takes the past length from layer 1's keys): read layer 0's, which holds every token
    for name in sorted(late_past):
        cache = cache_value(graph, name)
        for use in list(cache.uses()) if cache is not None else []:
            if use.node in region or use.node in new_nodes:
                continue
            if use.node.op_type != "Shape":
                raise PassConfigError(None, f"node {use.node.name!r} before layer {start_layer} reads {name!r}; mode "
                                            f"prefill cannot rewrite it")
            kind = "key" if name.endswith(".key") else "value"
            use.node.replace_input_with(use.idx, cache_value(graph, past_name(0, kind)))
    outputs = set(graph.outputs)
    step_dims = _step_dims(graph)
    for nd in region:
        for v in nd.outputs:
            if v not in outputs:
                v.shape = _kept_shape(v.shape, *step_dims)
            elif v.shape is not None and len(v.shape) >= 3 and v.name.startswith("present."):
                v.shape = ir.Shape([v.shape[0], v.shape[1], "optc_layer_cache", *v.shape[3:]])
            elif v.shape is not None and len(v.shape) >= 2:
                v.shape = ir.Shape([v.shape[0], "optc_kept_tokens", *v.shape[2:]])
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)
    _select_only_when_dropping(graph, [(h_kept, h), (pos_kept, pos_in), (k, seq)], past_len, prefix)
    ir.passes.common.TopologicalSortPass()(model)
    return True


SELECT_GATE = "select_gate"


def dropped_from(value: ir.Value) -> ir.Value | None:
    """The hidden state the dropping gathered `value` from, when `value` is the kept tokens' hidden
    state (the output of rewrite_prefill's select If); else None. (layer_routing reads the layer
    boundary there.)"""
    node = value.producer()
    if node is None or node.op_type != "If" or not node.name.startswith("optc/token_dropping/") \
            or not node.name.endswith(f"/{SELECT_GATE}/if") or value is not node.outputs[0]:
        return None
    passed = node.attributes["else_branch"].as_graph().outputs[0].producer()  # Identity(h)
    return passed.inputs[0] if passed is not None and passed.op_type == "Identity" else None


def _select_only_when_dropping(graph: ir.Graph, gated: list[tuple[ir.Value, ir.Value]], past_len: ir.Value,
                               prefix: str) -> None:
    """Tokens are dropped only in a step that starts from an empty cache; every other step keeps
    all its tokens, whatever the scores. So what computes the kept tokens' hidden states, position
    ids and count (the score, the TopKs, the gathers) moves into an If on that, and its other
    branch passes each `gated` value's fallback through (the hidden states, the position ids, the
    step's token count): a decode step runs none of it."""
    t = tape.Tape()
    empty = t.op("Squeeze", [t.op("Equal", [past_len, ints(t, 0)]), ints(t, 0)])
    passed = [t.op("Identity", [fallback]) for _, fallback in gated]
    name_nodes(t.nodes, f"{prefix}/{SELECT_GATE}")
    graph.extend(t.nodes)  # (the Identities read the fallbacks: they and their producers stay outside)
    upstream, todo = set(), [v.producer() for v, _ in gated]
    while todo:
        node = todo.pop()
        if node is None or node in upstream or node.graph is not graph:
            continue
        upstream.add(node)
        todo.extend(x.producer() for x in node.inputs if x is not None)
    # what computes the gated values alone: upstream nodes none of whose outputs is read elsewhere
    outs = {v for v, _ in gated}
    moved = set(upstream)
    changed = True
    while changed:
        changed = False
        for node in list(moved):
            if any(o.is_graph_output() or (o not in outs and any(u.node not in moved for u in o.uses()))
                   for o in node.outputs):
                moved.discard(node)
                changed = True
    order = [nd for nd in graph if nd in moved]  # graph order: a topologically sorted branch
    identities = [v.producer() for v in passed]
    for nd in order + identities:
        graph.remove(nd, safe=False)
    gate = ir.Node("", "If", [empty], num_outputs=len(gated), name=f"{prefix}/{SELECT_GATE}/if", attributes=[
        ir.AttrGraph("then_branch", ir.Graph([], [v for v, _ in gated], nodes=order, name="optc_drop_tokens")),
        ir.AttrGraph("else_branch", ir.Graph([], passed, nodes=identities, name="optc_keep_tokens"))])
    graph.append(gate)
    for (inner, _), out in zip(gated, gate.outputs):
        for use in list(inner.uses()):
            if use.node not in moved:
                use.node.replace_input_with(use.idx, out)
        out.name, out.type, out.shape = inner.name, inner.type, inner.shape
        inner.name = f"{inner.name}/computed"
