"""Session time alone: one decode step of several decoder graphs run by ONNX Runtime with every
input and output bound once (IOBinding), interleaved, so that only the graphs differ (no runtime,
no host loop). Used to compare optc's fused graphs with onnxruntime-genai's builder output.

    .venv/bin/python scripts/session_ab.py --context 128 build/a/model.onnx build/genai-int4/model.onnx

A graph with a `seqlens_k` input is optc's fused form (lengths given); one with an
`attention_mask` input is genai's (it computes the lengths from the mask). Caches are random,
[1, kv_heads, --capacity, head_dim], bound as both past and present. 2 threads. Prints the median
and range of --rounds rounds of --steps runs per graph, in turn.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def _session(path: str, context: int, capacity: int, threads: int, head_dim: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    io, keep = session.io_binding(), []
    rng = np.random.default_rng(0)

    def bind(name: str, arr: np.ndarray, output: bool = False) -> None:
        keep.append(arr)
        (io.bind_output if output else io.bind_input)(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    names = {i.name: i for i in session.get_inputs()}
    for name, i in names.items():
        if name.startswith("past_key_values."):
            buf = rng.standard_normal((1, i.shape[1], capacity, head_dim)).astype(np.float32)
            bind(name, buf)
            bind(name.replace("past_key_values", "present"), buf, output=True)
    bind("input_ids", np.array([[5]], np.int64))
    if "seqlens_k" in names:
        bind("seqlens_k", np.array([context], np.int32))
        bind("total_sequence_length", np.array(context + 1, np.int32))
    else:
        bind("attention_mask", np.ones((1, context + 1), np.int64))
    vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == "logits")
    bind("logits", np.zeros((1, 1, vocab), np.float32), output=True)
    return session, io, keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+")
    ap.add_argument("--context", type=int, default=128, help="tokens in the cache before the step")
    ap.add_argument("--capacity", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head-dim", type=int)
    a = ap.parse_args()
    if a.head_dim is None:  # static in optc's graphs (genai's names the dimension)
        shapes = [i.shape[3] for g in a.graphs for i in ort.InferenceSession(g, providers=["CPUExecutionProvider"])
                  .get_inputs() if i.name.startswith("past_key_values.")]
        a.head_dim = next((d for d in shapes if isinstance(d, int)), None)
        if a.head_dim is None:
            raise SystemExit("--head-dim: no graph here has a static head dimension")
    sessions = {g: _session(g, a.context, a.capacity, a.threads, a.head_dim) for g in a.graphs}
    times: dict[str, list[float]] = {g: [] for g in a.graphs}
    for _ in range(a.rounds):
        for g, (session, io, _) in sessions.items():
            for _ in range(5):
                session.run_with_iobinding(io)
            t = time.perf_counter()
            for _ in range(a.steps):
                session.run_with_iobinding(io)
            times[g].append((time.perf_counter() - t) / a.steps * 1e3)
    print(f"| graph (decode step after {a.context} tokens) | ms per step, median (range) |\n|---|---|")
    for g, v in times.items():
        print(f"| {g} | {statistics.median(v):.3f} ({min(v):.3f}–{max(v):.3f}) |")


if __name__ == "__main__":
    main()
