"""Reproduce StreamingLLM's finding on a reference decoder over a long stream.

    .venv/bin/python scripts/streaming_experiment.py                       # pycoder-5m, docs/streaming
    .venv/bin/python scripts/streaming_experiment.py --hf models/pycoder-v2 --bos-windows --out docs/streaming/pycoder-v2

Perplexity over the continuous held-out stream (models/data/stream.txt), token by token, with C the
model's trained context and a cache of K tokens (--cache, default C/2):
  (a) dense            the identity artifact, whole history cached (positions run past C)
  (b) window, no sinks sink_window with sinks=0, window=K
  (c) sinks + window   sink_window with sinks=4, window=K-4
  (d) dense, in context the original model re-run on sliding C-token windows (stride C/2),
                       each scored token seeing C/2..C-1 tokens: the trained-context reference
                       (--bos-windows: each window starts with BOS, as pycoder-v2 was trained)
Writes a table (markdown), JSON and a PNG of perplexity vs position.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "models" / "pycoder-5m"


def nll_of(logits: np.ndarray, target: int) -> float:
    x = logits.astype(np.float64)
    m = x.max()
    return float(m + math.log(np.exp(x - m).sum()) - x[target])


def stream_nll(model, ids: list[int], label: str) -> np.ndarray:
    model.reset()
    logits = model.prefill(ids[:1])
    out = np.empty(len(ids) - 1)
    t0 = time.perf_counter()
    for t in range(1, len(ids)):
        out[t - 1] = nll_of(logits, ids[t])
        logits = model.decode(ids[t])
        if t % 2048 == 0:
            print(f"  {label}: {t}/{len(ids) - 1} tokens, {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def sliding_reference(model, ids: list[int], window: int = 512, stride: int = 256,
                      bos: int | None = None) -> np.ndarray:
    """Each token scored once, with between window - stride and window - 1 tokens of context
    (the first `window` tokens are scored in the first window). With `bos`, every window starts
    with it, as every training sequence of a BOS-trained model did (its first token, never scored
    after the first window, is replaced)."""
    out = np.full(len(ids) - 1, np.nan)
    for start in range(0, len(ids) - 1, stride):
        chunk = ids[start:start + window]
        if bos is not None and start > 0:
            chunk = [bos] + chunk[1:]
        model.reset()
        logits = model.prefill(chunk, all_logits=True)
        first = 0 if start == 0 else window - stride
        for j in range(first, len(chunk) - 1):
            out[start + j] = nll_of(logits[j], chunk[j + 1])
        if start + window >= len(ids):
            break
    return out


def compile_variant(onnx_path: Path, out: Path, passes: list[dict]):
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.registry import default_registry

    cfg = parse_config({"passes": passes}, default_registry())
    compile_model(onnx_path, out, config=cfg, force=True, verify=False, log=lambda *_: None)
    from optc.runtime import load

    return load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, default=HF, help="the Hugging Face model directory")
    ap.add_argument("--cache", type=int, default=None, help="tokens the windowed caches keep (default: context/2)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "streaming")
    ap.add_argument("--bos-windows", action="store_true",
                    help="start every (d) window with BOS (for a model trained with BOS at every sequence start)")
    ap.add_argument("--build", type=Path, default=ROOT / "build" / "streaming")
    args = ap.parse_args()
    from optc.export import export_decoder

    hf_config = json.loads((args.hf / "config.json").read_text())
    context = hf_config["max_position_embeddings"]
    cache = args.cache or context // 2
    onnx_path = args.build / args.hf.name / "model.onnx"
    if not onnx_path.exists():
        export_decoder(args.hf, onnx_path)
    variants = {
        "(a) dense": [],
        f"(b) window {cache}, no sinks": [{"name": "sink_window", "sinks": 0, "window": cache}],
        f"(c) 4 sinks + window {cache - 4}": [{"name": "sink_window", "sinks": 4, "window": cache - 4}],
    }
    bin_size = context
    models = {k: compile_variant(onnx_path, args.build / args.hf.name / f"v{i}", p)
              for i, (k, p) in enumerate(variants.items())}
    dense = models["(a) dense"]
    ids = dense.encode((ROOT / "models" / "data" / "stream.txt").read_text())[: args.tokens + 1]
    print(f"stream: {len(ids)} tokens")
    curves = {}
    for label, m in models.items():
        t0 = time.perf_counter()
        curves[label] = stream_nll(m, ids, label)
        print(f"{label}: ppl {math.exp(curves[label].mean()):.2f} ({time.perf_counter() - t0:.0f}s)")
    # A model trained with BOS at every sequence start (pycoder-v2) sees it in every reference window.
    bos = hf_config.get("bos_token_id") if args.bos_windows else None
    curves["(d) dense, in trained context"] = sliding_reference(dense, ids, window=context, stride=context // 2,
                                                                bos=bos)

    bins = np.arange(0, len(ids) - 1, bin_size)
    table = {"model": args.hf.name, "context": context, "cache": cache, "tokens": len(ids) - 1, "bin": bin_size,
             "overall": {}, "after_context": {}, "per_bin": {}}
    for label, nll in curves.items():
        table["overall"][label] = round(math.exp(np.nanmean(nll)), 3)
        table["after_context"][label] = round(math.exp(np.nanmean(nll[context:])), 3)
        table["per_bin"][label] = [round(math.exp(np.nanmean(nll[b:b + bin_size])), 3) for b in bins]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming.json").write_text(json.dumps(table, indent=1) + "\n")
    ref = table["after_context"]["(d) dense, in trained context"]
    lines = [f"| variant | perplexity, all tokens | perplexity, tokens {context}+ | vs (d), tokens {context}+ |",
             "|---|---|---|---|"]
    for label in curves:
        lines.append(f"| {label} | {table['overall'][label]:.2f} | {table['after_context'][label]:.2f} | "
                     f"{table['after_context'][label] / ref - 1:+.1%} |")
    (args.out / "streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for label, ys in table["per_bin"].items():
        ax.plot(bins + bin_size / 2, ys, "o-", ms=3, label=label)
    ax.axvline(context, color="gray", ls=":", label=f"trained context ({context})")
    ax.set_yscale("log")
    ax.set_xlabel("position in stream (tokens)")
    ax.set_ylabel(f"perplexity per {bin_size}-token bin")
    ax.set_title(f"{args.hf.name} on a long stream: StreamingLLM reproduction")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "streaming.png")
    print(f"wrote {args.out}/streaming.md, .json, .png")


if __name__ == "__main__":
    main()
