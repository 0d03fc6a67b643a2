"""layer_routing: decode skips the layers that changed the prompt's hidden state least (FiRST /
SkipDecode style, decided per prompt at run time), or a fixed set chosen on calibration text.

The rewrite wraps each routable layer (not among the first `protect_first` or last `protect_last`)
in an `If` on `optc.layers_run[i]` (a bool input of one entry per layer, fed by the runtime):

    then: the layer as exported -> (h_out, new keys, new values, present keys, present values)
    else: (h_in, no new keys, no new values, the past as it is)

so a skipped layer runs none of its kernels, and its cache is not extended (the runtime appends
zero rows). Every step also outputs `optc.layer_change` [routable layers]: 1 - cosine(h_in,
h_out) of each routable layer, averaged over the step's last `window` tokens, measured where every
layer runs (an If; zeros once a layer is off); the runtime reads it
after the prompt's prefill (every layer runs) and turns the `max_skip` smallest off for the rest
of the generation (`LayerRoutingSpec`, runtime/model.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optc.passes.base import PassConfigError
from optc.passes.rules.builders import const, ints, name_nodes
from optc.passes.rules.layers import attention_nodes, cache_value, downstream, residual_input
from optc.passes.token_dropping.prefill import dropped_from
from optc.runtime.manifest import LAYER_CHANGE_OUTPUT, LAYERS_RUN_INPUT, past_name, present_name


def _upstream_nodes(v: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    todo = [v]
    while todo:
        node = todo.pop().producer()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(x for x in node.inputs if x is not None)
    return seen


def rewrite_routing(model: ir.Model, info, *, routable: list[int], window: int) -> bool:
    graph = model.graph
    if any(v.name == LAYERS_RUN_INPUT for v in graph.inputs):
        return False
    n = info.n_layers
    attns = attention_nodes(graph, info)
    # a layer's output is the next layer's residual input; where token_dropping (run before) keeps
    # the kept tokens' hidden states between two layers (its select If on the residual stream), the
    # earlier layer's output is what the dropping reads, and the later layer's input what it gives
    h_ins = [residual_input(a) for a in attns]
    h_outs = [(dropped_from(h) or h) if h is not None else None for h in h_ins[1:]]
    for i in routable + [r + 1 for r in routable]:
        if h_ins[i] is None:
            raise PassConfigError(None, f"layer {i}: no residual hidden state found before its attention "
                                        f"(a pre-norm decoder layer: h + o_proj(Attention(...)))")
    # each layer's cache as the graph reads it: the past input, or kv_quantize's dequantisation
    # of it (either pass may come first)
    cache = {(i, kind): cache_value(graph, past_name(i, kind)) for i in range(n) for kind in ("key", "value")}
    run_in = ir.Value(name=LAYERS_RUN_INPUT, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([n]))
    graph.inputs.append(run_in)
    # the shared mask reads the cache length from some layer's past (dynamo: layer 1's); a
    # skipped layer's cache stops growing, layer 0 (never skipped) has every token. (Only the
    # routable layers' reads: token_dropping, run before, reads its later layers' length from the
    # last layer, which is never skipped.)
    for i in routable:
        for kind in ("key", "value"):
            v = cache[(i, kind)]
            for use in list(v.uses()) if v is not None else []:
                if use.node.op_type == "Shape":
                    use.node.replace_input_with(use.idx, cache[(0, kind)])
    outputs = {v.name: v for v in graph.outputs}
    changes, measure_nodes = [], []
    for i in routable:
        h_in, h_out = h_ins[i], h_outs[i]
        body = set(downstream(graph, [h_in])) & _upstream_nodes(h_out)
        layer = info.layers[i]
        values = {v.name: v for nd in body for v in nd.outputs}
        pk, pv = outputs.get(present_name(i, "key")), outputs.get(present_name(i, "value"))
        nk, nv = values.get(layer.new_key), values.get(layer.new_value)
        if pk is None or pv is None or nk is None or nv is None or pk.producer() not in body:
            raise PassConfigError(None, f"layer {i}: its new and present keys/values are not computed inside the "
                                        f"layer's residual block")
        escaping = [h_out, nk, nv, pk, pv]
        order = [nd for nd in graph if nd in body]  # graph order: names and errors the same run to run
        for nd in order:
            for v in nd.outputs:
                if v in escaping:
                    continue
                if v in graph.outputs or any(u.node not in body for u in v.uses()):
                    raise PassConfigError(None, f"layer {i}: {v.name!r} is computed in the layer and read outside it; "
                                                f"layer_routing cannot wrap the layer")
        # the else branch: the layer as if it were not there
        past_k, past_v = cache[(i, "key")], cache[(i, "value")]
        if past_k is None or past_v is None:
            raise PassConfigError(None, f"layer {i}: no past keys/values input (or kv_quantize's dequantisation)")
        te = tape.Tape()
        i64 = lambda *xs: ints(te, *xs)  # noqa: E731
        skip_outs = [te.op("Identity", [h_in]),
                     te.op("Slice", [past_k, i64(0), i64(0), i64(2)]),
                     te.op("Slice", [past_v, i64(0), i64(0), i64(2)]),
                     te.op("Identity", [past_k]), te.op("Identity", [past_v])]
        name_nodes(te.nodes, f"optc/layer_routing/layer{i}/skip")
        t = tape.Tape()
        cond = t.op("Gather", [run_in, const(t, np.int64(i))],
                    {"axis": 0})
        name_nodes(t.nodes, f"optc/layer_routing/layer{i}/cond")
        for nd in order:
            graph.remove(nd, safe=False)
        wrapped = ir.Node("", "If", [cond], num_outputs=len(escaping), name=f"optc/layer_routing/layer{i}/if")
        for inner, outer in zip(escaping, wrapped.outputs):
            for use in list(inner.uses()):
                if use.node not in body:
                    use.node.replace_input_with(use.idx, outer)
            if inner in graph.outputs:
                graph.outputs[graph.outputs.index(inner)] = outer
            outer.name, outer.type, outer.shape = inner.name, inner.type, inner.shape
            inner.name = f"{inner.name}/run"
        run = ir.Graph([], escaping, nodes=order, name=f"optc_layer{i}_run")
        skip = ir.Graph([], skip_outs, nodes=te.nodes, name=f"optc_layer{i}_skip")
        wrapped.attributes["then_branch"] = ir.AttrGraph("then_branch", run)
        wrapped.attributes["else_branch"] = ir.AttrGraph("else_branch", skip)
        graph.extend(t.nodes)
        graph.append(wrapped)
        if h_ins[i + 1] is h_out:
            h_ins[i + 1] = wrapped.outputs[0]  # the next layer reads the If's output
        # how much the layer changed the last `window` tokens' hidden state (0 when skipped)
        tc = tape.Tape()
        c64 = lambda *xs: ints(tc, *xs)  # noqa: E731
        a = tc.op("Slice", [h_in, c64(-window), c64(np.iinfo(np.int64).max), c64(1)])
        b = tc.op("Slice", [wrapped.outputs[0], c64(-window), c64(np.iinfo(np.int64).max), c64(1)])
        dot = tc.op("ReduceSum", [tc.op("Mul", [a, b]), c64(-1)], {"keepdims": 0})
        norms = tc.op("Mul", [tc.op("ReduceL2", [a, c64(-1)], {"keepdims": 0}),
                              tc.op("ReduceL2", [b, c64(-1)], {"keepdims": 0})])
        cos = tc.op("Div", [dot, tc.op("Max", [norms, const(tc, np.float32(1e-12))])])
        change = tc.op("Sub", [const(tc, np.float32(1)),
                               tc.op("ReduceMean", [cos], {"keepdims": 0})])
        changes.append(tc.op("Unsqueeze", [change, c64(0)]))
        name_nodes(tc.nodes, f"optc/layer_routing/layer{i}/change")
        measure_nodes.extend(tc.nodes)
    # The change is read once, after the prompt's prefill, where every layer runs; a decode step
    # with a layer off skips measuring (about 10 small ops per routable layer, measured 9% of a
    # pycoder-v2 decode step), and outputs zeros
    tf = tape.Tape()
    measured = tf.op("Concat", changes, {"axis": 0})
    name_nodes(tf.nodes, "optc/layer_routing/changes")
    measure_nodes.extend(tf.nodes)
    tz = tape.Tape()
    zeros = tz.op("Constant", [], {"value": ir.tensor(np.zeros(len(routable), np.float32))})
    name_nodes(tz.nodes, "optc/layer_routing/no_change")
    tw = tape.Tape()
    every = tw.op("Cast", [tw.op("ReduceMin", [tw.op("Cast", [run_in], {"to": ir.DataType.INT32})], {"keepdims": 0})],
                  {"to": ir.DataType.BOOL})
    name_nodes(tw.nodes, "optc/layer_routing/all_run")
    graph.extend(tw.nodes)
    measure = ir.Node("", "If", [every], num_outputs=1, name="optc/layer_routing/measure", attributes=[
        ir.AttrGraph("then_branch", ir.Graph([], [measured], nodes=measure_nodes, name="optc_measure_change")),
        ir.AttrGraph("else_branch", ir.Graph([], [zeros], nodes=tz.nodes, name="optc_no_change"))])
    graph.append(measure)
    out = measure.outputs[0]
    out.name = LAYER_CHANGE_OUTPUT
    out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([len(routable)])
    graph.outputs.append(out)
    ir.passes.common.TopologicalSortPass()(model)
    return True
