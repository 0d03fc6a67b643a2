"""One decode step's attention over the KV cache: TVM's fused kernel against ONNX Runtime (docs/tvm.md).

    .venv/bin/python scripts/attention_kernel_bench.py [--contexts 512,2048,8192] [--json OUT]

The graph is one layer's attention as optc's canonical graph has it, with pycoder-5m's shapes
(8 query heads, 2 KV heads, head dim 32, one new token): the cache, then Concat with the new
token's K/V, then the standard opset-23 `Attention` op with a boolean mask. Two caches:
- float: the cache as fp32 inputs;
- int8 KIVI: the kv_cache_compression pass's own dequantisation subgraph (keys per channel in
  groups of 64 tokens, values per token, symmetric int8, the newest 32-95 tokens in a float residual).
ONNX Runtime runs the graph as optc's ONNX Runtime backend does (ORT_ENABLE_ALL). TVM gets the
same graph through the TVM backend's lowering and import, then is built twice: with the generic
ops (optc's default CPU schedules) and with optc's fused decode attention (backends/tvm/kernels/attention.py).
Each engine is timed per call from Python, the median of many calls, alternating engines so
that a noisy machine affects all of them alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

Q_HEADS, KV_HEADS, HEAD_DIM, GROUP, RESIDUAL = 8, 2, 32, 64, 32


def build_graph(context: int, cache: str):
    """(onnx_ir model, input arrays): one decode attention over `context` cached tokens."""
    import onnx_ir as ir

    from optc.passes.kv_cache.quantize import dequant_subgraph

    rng = np.random.default_rng(0)
    total = context + 1
    q = ir.val("q", ir.DataType.FLOAT, [1, Q_HEADS, 1, HEAD_DIM])
    k_new = ir.val("k_new", ir.DataType.FLOAT, [1, KV_HEADS, 1, HEAD_DIM])
    v_new = ir.val("v_new", ir.DataType.FLOAT, [1, KV_HEADS, 1, HEAD_DIM])
    mask = ir.val("mask", ir.DataType.BOOL, [1, 1, 1, total])
    graph = ir.Graph([q, k_new, v_new, mask], [], nodes=[], opset_imports={"": 23}, name="attention")
    arrays = {"q": rng.standard_normal((1, Q_HEADS, 1, HEAD_DIM), np.float32),
              "k_new": rng.standard_normal((1, KV_HEADS, 1, HEAD_DIM), np.float32),
              "v_new": rng.standard_normal((1, KV_HEADS, 1, HEAD_DIM), np.float32),
              "mask": np.ones((1, 1, 1, total), bool)}
    past = {}
    for kind in ("key", "value"):
        base = f"past.{kind}"
        if cache == "float":
            v = ir.val(base, ir.DataType.FLOAT, [1, KV_HEADS, context, HEAD_DIM])
            graph.inputs.append(v)
            arrays[base] = rng.standard_normal((1, KV_HEADS, context, HEAD_DIM), np.float32)
            past[kind] = v
            continue
        stored = (context - RESIDUAL) // GROUP * GROUP  # whole groups; the rest is the float residual
        past[kind] = dequant_subgraph(graph, base, kind == "key", KV_HEADS, HEAD_DIM, 8, GROUP,
                                                          HEAD_DIM, True)
        arrays[f"{base}.q"] = rng.integers(0, 256, (1, KV_HEADS, stored, HEAD_DIM)).astype(np.uint8)
        scale_shape = (1, KV_HEADS, stored // GROUP, HEAD_DIM) if kind == "key" else (1, KV_HEADS, stored, 1)
        arrays[f"{base}.scale"] = (rng.random(scale_shape) * 0.02).astype(np.float16)
        arrays[f"{base}.residual"] = rng.standard_normal((1, KV_HEADS, context - stored, HEAD_DIM), np.float32)
    k = ir.node("Concat", [past["key"], k_new], {"axis": 2}).outputs[0]
    v = ir.node("Concat", [past["value"], v_new], {"axis": 2}).outputs[0]
    for value in (k, v):
        graph.append(value.producer())
    attention = ir.node("Attention", [q, k, v, mask], {"q_num_heads": Q_HEADS, "kv_num_heads": KV_HEADS})
    graph.append(attention)
    y = attention.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, Q_HEADS, 1, HEAD_DIM])
    graph.outputs.append(y)
    for value in graph.inputs:  # every input static, as the TVM backend's buckets are
        value.shape = ir.Shape(arrays[value.name].shape)
    return ir.Model(graph, ir_version=10), arrays


def onnxruntime_runner(model, arrays):
    import onnx_ir as ir
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return lambda: session.run(None, arrays)[0]


def tvm_runner(model, arrays, fused: bool):
    from optc.backends.tvm import pipeline as tvm_backend
    from optc.backends.tvm.kernels.attention import FuseAttention
    from optc.backends.tvm.lowering import legalize, specialize
    from optc.backends.tvm.schedules.cpu import default_rules, legalizations
    from optc.ir import copy_model

    tvm = tvm_backend.import_tvm()
    from tvm import relax
    from tvm.s_tir import dlight

    model = copy_model(model)
    legalize(model, types.SimpleNamespace(num_heads=Q_HEADS, kv_heads=KV_HEADS))
    proto = specialize(model, {k: a.shape for k, a in arrays.items()}, ["y"])
    func, inputs, _, _ = tvm_backend._import_bucket(proto, "attention", set())
    mod = tvm.IRModule({"attention": func})
    target = tvm.target.Target(tvm_backend.cpu_target())
    if fused:
        fuse = FuseAttention(target)
        mod = fuse(mod)
        assert fuse.fused["decode"] == 1, f"the fused kernel did not match: {fuse.kept}"
    with target, tvm_backend.native_warnings_filtered():
        mod = relax.transform.LegalizeOps(customize_legalize_map=legalizations())(mod)
        mod = relax.get_pipeline("zero")(mod)
        mod = dlight.ApplyDefaultSchedule(*default_rules())(mod)
        executable = relax.build(mod, target, relax_pipeline="default_build")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(arrays[name]) for name in inputs]
    fn = vm["attention"]
    return lambda: fn(*args).numpy()


def median_us(runners: dict, calls: int, rounds: int) -> dict:
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            run()  # warm
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="512,2048,8192", help="cached tokens (comma-separated)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args(argv)
    rows = []
    for cache in ("float", "int8"):
        for context in [int(c) for c in args.contexts.split(",")]:
            model, arrays = build_graph(context, cache)
            runners = {"onnxruntime": onnxruntime_runner(model, arrays),
                       "tvm_generic": tvm_runner(model, arrays, fused=False),
                       "tvm_fused": tvm_runner(model, arrays, fused=True)}
            ref = runners["onnxruntime"]()
            diffs = {name: float(np.abs(run() - ref).max()) for name, run in runners.items()}
            us = median_us(runners, args.calls, args.rounds)
            rows.append({"cache": cache, "context": context, **{f"{k}_us": round(v, 1) for k, v in us.items()},
                         "max_abs_diff_vs_onnxruntime": max(diffs.values())})
            print(f"  measured {cache} cache, {context} tokens", file=sys.stderr)
    print("| cache | cached tokens | ONNX Runtime µs | TVM generic ops µs | TVM fused kernel µs | ORT ÷ fused | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['context']} | {r['onnxruntime_us']:.1f} | {r['tvm_generic_us']:.1f} | "
              f"{r['tvm_fused_us']:.1f} | {r['onnxruntime_us'] / r['tvm_fused_us']:.2f} | "
              f"{r['max_abs_diff_vs_onnxruntime']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
