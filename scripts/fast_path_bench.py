"""The ONNX Runtime fast path with optc's cache passes on top (issue 17, part 3), measured.

    .venv/bin/python scripts/fast_path_bench.py --hf models/pycoder-v2 --out docs/bench/fast_path_pycoder-v2.md

Two tables, from artifacts compiled here (`optc export` of the HF directory, then `optc compile`):

1. **Streaming**: decode ms/token along one continuous stream of held-out code
   (models/data/stream.txt, --stream tokens, fed token by token after a --prompt-token prefill)
   for sink_window on the fused path (GroupQueryAttention over a bounded buffer,
   runtime/cache/window.py), sink_window on the generic graph, and the dense fused path (whose
   cost grows with the context; past the trained context its predictions are poor, shown by its
   perplexity). Each figure is the median step time within a 256-token bin around the position.
   Perplexity over the streamed tokens, teacher-forced.
2. **KV cache at a given context**: decode ms/token after C tokens (greedy, --decode-tokens) for the
   fp32 cache on the fused and on the generic path and for KIVI int8 KV (kv_quantize, which keeps
   the generic path: its per-token/per-group scales are computed by the runtime as tokens arrive,
   which GroupQueryAttention's quantised cache, fixed per-tensor or per-channel scales, does not do).

Each round is one fresh process that runs every engine of a table interleaved (--block stream
tokens, or one run of 32 decode steps, per engine in turn), so that the load of a shared machine
hits every engine alike; figures are medians over --rounds rounds with their range. 2 threads (the artifacts' session options: all cores of the
2-core machine these were measured on). Timings on a shared machine move; compare within a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = 256  # tokens per timing bin of the stream


# ---------------------------------------------------------------------------- workers
# One process per round runs every engine, interleaved in small blocks, so that the load of a
# shared machine, which moves over seconds, hits every engine alike.
def stream_worker(artifacts: list[str], job: dict) -> list[dict]:
    import numpy as np

    import optc.runtime

    warnings.simplefilter("ignore")  # the dense model streams past its trained context on purpose
    ids, prompt = job["stream_ids"], job["prompt"]
    models = [optc.runtime.load(a) for a in artifacts]
    logits, times, nll = [], [[] for _ in models], [[] for _ in models]
    for m in models:
        m.reset()
        logits.append(m.prefill(ids[:prompt]))
    for start in range(prompt, len(ids), job["block"]):
        for e, m in enumerate(models):
            for t in ids[start:start + job["block"]]:
                x = logits[e].astype(np.float64)
                nll[e].append(float(np.log(np.exp(x - x.max()).sum()) + x.max() - x[t]))
                s = time.perf_counter()
                logits[e] = m.decode(t)
                times[e].append((time.perf_counter() - s) * 1e3)
    out = []
    for e, m in enumerate(models):
        bins = {}
        for at in job["positions"]:
            lo = max(0, at - prompt - BIN // 2)
            bins[str(at)] = statistics.median(times[e][lo:lo + BIN])
        out.append({"decode_ms": bins, "perplexity": float(np.exp(np.mean(nll[e]))), "cache_rows": m.cache.length})
    return out


def kv_worker(artifacts: list[str], job: dict) -> list[dict]:
    import numpy as np

    import optc.runtime

    ids = job["stream_ids"]
    models = [optc.runtime.load(a) for a in artifacts]
    runs = [{str(c): [] for c in job["contexts"]} for _ in models]
    for c in job["contexts"]:
        for _ in range(job["repeats"]):
            for e, m in enumerate(models):
                m.reset()
                tok = int(np.argmax(m.prefill(ids[:c])))
                s = time.perf_counter()
                for _ in range(job["decode_tokens"]):
                    tok = int(np.argmax(m.decode(tok)))
                runs[e][str(c)].append((time.perf_counter() - s) * 1e3 / job["decode_tokens"])
    return [{"decode_ms": {c: statistics.median(v) for c, v in r.items()}, "kv_bytes": m.kv_bytes}
            for r, m in zip(runs, models)]


def gqa_cache_op(heads: int, kv_heads: int, head_dim: int, cached: int, rounds: int) -> str:
    """ONNX Runtime's GroupQueryAttention alone, one decode step after `cached` tokens, with its
    float cache and with its int8 cache (kv_cache_bit_width 8, fixed per-channel scales): what a
    quantised cache on the fused path would cost on the CPU. Interleaved, 2 threads."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    cap = cached + 1
    angles = np.arange(cap)[:, None] * 10000.0 ** (-np.arange(head_dim // 2) * 2 / head_dim)[None]
    runs = {}
    for kind in ("float32 cache", "int8 cache, per-channel scales"):
        quant = kind.startswith("int8")
        cache_type, dtype = (TensorProto.INT8, np.int8) if quant else (TensorProto.FLOAT, np.float32)
        inputs = ["q", "k", "v", "past_k", "past_v", "seqlens", "total", "cos", "sin"]
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1}
        inits = [onnx.numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                 onnx.numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
        if quant:
            inputs += ["", "", "", "k_scale", "v_scale"]
            attrs.update(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
            inits += [onnx.numpy_helper.from_array(np.full((1, kv_heads, 1, head_dim), 0.05, np.float32), n)
                      for n in ("k_scale", "v_scale")]
        vi = helper.make_tensor_value_info
        graph = helper.make_graph(
            [helper.make_node("GroupQueryAttention", inputs, ["out", "present_k", "present_v"], domain="com.microsoft",
                              **attrs)], "gqa",
            [vi("q", TensorProto.FLOAT, [1, 1, heads * head_dim]), vi("k", TensorProto.FLOAT, [1, 1, kv_heads * head_dim]),
             vi("v", TensorProto.FLOAT, [1, 1, kv_heads * head_dim]), vi("past_k", cache_type, [1, kv_heads, cap, head_dim]),
             vi("past_v", cache_type, [1, kv_heads, cap, head_dim]), vi("seqlens", TensorProto.INT32, [1]),
             vi("total", TensorProto.INT32, [])],
            [vi("out", TensorProto.FLOAT, None), vi("present_k", cache_type, None), vi("present_v", cache_type, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 2, 3
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        io, keep = session.io_binding(), []
        cache = {n: (rng.integers(-60, 60, (1, kv_heads, cap, head_dim)) if quant else
                     rng.standard_normal((1, kv_heads, cap, head_dim))).astype(dtype) for n in ("past_k", "past_v")}
        feeds = {"q": heads, "k": kv_heads, "v": kv_heads}
        for name, h in feeds.items():
            keep.append(rng.standard_normal((1, 1, h * head_dim)).astype(np.float32))
            io.bind_input(name, "cpu", 0, np.float32, list(keep[-1].shape), keep[-1].ctypes.data)
        for name, arr in cache.items():
            io.bind_input(name, "cpu", 0, dtype, list(arr.shape), arr.ctypes.data)
            io.bind_output(name.replace("past", "present"), "cpu", 0, dtype, list(arr.shape), arr.ctypes.data)
        for name, arr in (("seqlens", np.array([cached], np.int32)), ("total", np.array(cached + 1, np.int32))):
            keep.append(arr)
            io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        out = np.zeros((1, 1, heads * head_dim), np.float32)
        io.bind_output("out", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        runs[kind] = (session, io, keep, cache, out, [])
    for _ in range(rounds):
        for kind, (session, io, *_, times) in runs.items():
            for _ in range(20):
                session.run_with_iobinding(io)
            t = time.perf_counter()
            for _ in range(200):
                session.run_with_iobinding(io)
            times.append((time.perf_counter() - t) / 200 * 1e6)
    lines = [f"GroupQueryAttention alone (ONNX Runtime, CPU, 2 threads), one decode step after {cached} cached tokens, "
             f"{heads} heads / {kv_heads} KV heads / head_dim {head_dim}: microseconds per op, median of {rounds} "
             f"interleaved rounds of 200 (range)", "", "| cache | µs per op |", "|---|---|"]
    lines += [f"| {kind} | {_cell(r[-1])} |" for kind, r in runs.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- driver
def _compile(onnx_path: Path, work: Path, variants: dict, log) -> dict[str, Path]:
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.registry import default_registry

    out = {}
    for name, (passes, options) in variants.items():
        log(f"compiling {name}")
        art = work / "".join(c if c.isalnum() else "_" for c in name)
        compile_model(onnx_path, art, config=parse_config({"passes": passes}, default_registry()), verify=False,
                      backend_options=options, log=lambda *_: None)
        out[name] = art
    return out


def _run(kind: str, engines: dict, job: dict, rounds: int, work: Path, log) -> dict:
    job_file = work / f"{kind}.json"
    job_file.write_text(json.dumps({**job, "artifacts": [str(a) for a in engines.values()]}))
    results: dict[str, list] = {name: [] for name in engines}
    for r in range(rounds):
        log(f"{kind} round {r + 1}/{rounds}: {', '.join(engines)}")
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(job_file)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{kind} worker failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        for name, got in zip(engines, json.loads(line[len("RESULT "):])):
            results[name].append(got)
    return results


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def markdown(stream: dict | None, kv: dict, job: dict) -> str:
    lines = []
    if stream is not None:
        lines += [f"Streaming: {len(job['stream_ids'])} tokens of models/data/stream.txt, {job['prompt']} prefilled, "
                  f"the rest decoded one by one; decode ms/token (median of the {BIN}-token bin around each position; "
                  f"median over rounds and range)", ""]
        cols = [f"@{p}" for p in job["positions"]]
        lines += ["| engine | " + " | ".join(cols) + " | perplexity | cache rows at the end |",
                  "|---|" + "---|" * (len(cols) + 2)]
        for name, runs in stream.items():
            cells = [_cell([r["decode_ms"][str(p)] for r in runs]) for p in job["positions"]]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {runs[0]['perplexity']:.3f} | "
                         f"{runs[0]['cache_rows']} |")
        lines.append("")
    lines += [f"KV cache: decode ms/token after C tokens of context ({job['decode_tokens']} greedy tokens, median of "
                  f"{job['repeats']} runs per round; median over rounds and range)", ""]
    cols = [f"C={c}" for c in job["contexts"]]
    lines += ["| engine | " + " | ".join(cols) + " | KV bytes at the last C |", "|---|" + "---|" * (len(cols) + 1)]
    for name, runs in kv.items():
        cells = [_cell([r["decode_ms"][str(c)] for r in runs]) for c in job["contexts"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {runs[0]['kv_bytes']:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, default=ROOT / "models" / "pycoder-v2")
    ap.add_argument("--stream", type=int, default=8192, help="tokens of the stream")
    ap.add_argument("--prompt", type=int, default=512, help="tokens prefilled before streaming")
    ap.add_argument("--positions", default="1024,2048,4096,8064")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the tables (markdown) here and the JSON beside them")
    ap.add_argument("--gqa-op", action="store_true", help="only time GroupQueryAttention alone with a float and an "
                                                          "int8 cache (the model's head shapes, --gqa-cached tokens)")
    ap.add_argument("--gqa-cached", type=int, default=2048)
    ap.add_argument("--block", type=int, default=32, help="stream tokens each engine decodes in its turn")
    ap.add_argument("--kv-only", action="store_true", help="only the KV-cache table (no streaming)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.gqa_op:
        cfg = json.loads((a.hf / "config.json").read_text())
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        table = gqa_cache_op(heads, kv, head_dim, a.gqa_cached, max(a.rounds, 9))
        print(table)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(table)
        return
    if a.worker:
        kind, job_file = a.worker
        job = json.loads(Path(job_file).read_text())
        print("RESULT " + json.dumps((stream_worker if kind == "stream" else kv_worker)(job["artifacts"], job)))
        return

    from tokenizers import Tokenizer

    from optc.export import export_decoder

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    cfg = json.loads((a.hf / "config.json").read_text())
    tok = Tokenizer.from_file(str(a.hf / "tokenizer.json"))
    bos = cfg.get("bos_token_id")
    ids = ([bos] if bos is not None else []) + tok.encode((ROOT / "models" / "data" / "stream.txt").read_text()).ids
    if len(ids) < a.stream:
        raise SystemExit(f"stream.txt has {len(ids)} tokens, fewer than --stream {a.stream}")
    job = {"stream_ids": ids[:a.stream], "prompt": a.prompt, "positions": [int(p) for p in a.positions.split(",")],
           "contexts": [int(c) for c in a.contexts.split(",")], "decode_tokens": a.decode_tokens, "repeats": a.repeats,
           "block": a.block}
    sw = [{"name": "sink_window", "sinks": a.sinks, "window": a.window}]
    with tempfile.TemporaryDirectory(prefix="optc-fast-path-bench-") as tmp:
        work = Path(tmp)
        onnx_path = export_decoder(a.hf, work / "export" / "model.onnx", log=lambda *_: None)
        win = f"{a.sinks} + {a.window}"
        stream_engines = _compile(onnx_path, work, {
            **({} if a.kv_only else {f"sink_window {win}, fused (GQA, bounded buffer)": (sw, {}),
                                     f"sink_window {win}, generic graph": (sw, {"fused_attention": False})}),
            "dense, fused (GQA in place)": ([], {}),
        }, log)
        kv_engines = {"fp32 KV, fused (GQA in place)": stream_engines["dense, fused (GQA in place)"]}
        kv_engines.update(_compile(onnx_path, work, {
            "fp32 KV, generic graph": ([], {"fused_attention": False}),
            "int8 KV (KIVI, kv_quantize; generic graph)": ([{"name": "kv_quantize", "bits": 8}], {}),
            "int8 KV, static scales (kv_quantize scales: static; fused, GQA int8 in place)":
                ([{"name": "kv_quantize", "bits": 8, "scales": "static"}], {}),
        }, log))
        stream = None if a.kv_only else _run("stream", stream_engines, job, a.rounds, work, log)
        kv = _run("kv", kv_engines, job, a.rounds, work, log)
    table = markdown(stream, kv, job)
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table)
        slim = {k: v for k, v in job.items() if k != "stream_ids"}
        a.out.with_suffix(".json").write_text(json.dumps({"model": str(a.hf), "job": slim, "rounds": a.rounds,
                                                          "stream": stream, "kv": kv}, indent=1) + "\n")


if __name__ == "__main__":
    main()
