"""Reproduce StreamingLLM's finding on pycoder-5m (trained context 512) over a long stream.

    .venv/bin/python scripts/streaming_experiment.py [--tokens 8192] [--out docs/streaming]

Perplexity over the continuous held-out stream (models/data/stream.txt), token by token:
  (a) dense            the identity artifact, whole history cached (positions run past 512)
  (b) window, no sinks sparse_attention sink_window with sinks=0, window=256
  (c) sinks + window   sparse_attention sink_window with sinks=4, window=252
  (d) dense, in context the original model re-run on sliding 512-token windows (stride 256),
                       each scored token seeing 256-511 tokens: the trained-context reference
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
BIN = 512


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


def sliding_reference(model, ids: list[int], window: int = 512, stride: int = 256) -> np.ndarray:
    """Each token scored once, with between window - stride and window - 1 tokens of context
    (the first `window` tokens are scored in the first window)."""
    out = np.full(len(ids) - 1, np.nan)
    for start in range(0, len(ids) - 1, stride):
        chunk = ids[start:start + window]
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
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "streaming")
    ap.add_argument("--build", type=Path, default=ROOT / "build" / "streaming")
    args = ap.parse_args()
    from optc.export import export_decoder

    onnx_path = args.build / "model.onnx"
    if not onnx_path.exists():
        export_decoder(HF, onnx_path)
    variants = {
        "(a) dense": [],
        "(b) window 256, no sinks": [{"name": "sparse_attention", "mode": "sink_window", "sinks": 0, "window": 256}],
        "(c) 4 sinks + window 252": [{"name": "sparse_attention", "mode": "sink_window", "sinks": 4, "window": 252}],
    }
    models = {k: compile_variant(onnx_path, args.build / f"v{i}", p) for i, (k, p) in enumerate(variants.items())}
    dense = models["(a) dense"]
    ids = dense.encode((ROOT / "models" / "data" / "stream.txt").read_text())[: args.tokens + 1]
    print(f"stream: {len(ids)} tokens")
    curves = {}
    for label, m in models.items():
        t0 = time.perf_counter()
        curves[label] = stream_nll(m, ids, label)
        print(f"{label}: ppl {math.exp(curves[label].mean()):.2f} ({time.perf_counter() - t0:.0f}s)")
    curves["(d) dense, in trained context"] = sliding_reference(dense, ids)

    bins = np.arange(0, len(ids) - 1, BIN)
    table = {"tokens": len(ids) - 1, "bin": BIN, "overall": {}, "after_512": {}, "per_bin": {}}
    for label, nll in curves.items():
        table["overall"][label] = round(math.exp(np.nanmean(nll)), 3)
        table["after_512"][label] = round(math.exp(np.nanmean(nll[512:])), 3)
        table["per_bin"][label] = [round(math.exp(np.nanmean(nll[b:b + BIN])), 3) for b in bins]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming.json").write_text(json.dumps(table, indent=1) + "\n")
    ref = table["after_512"]["(d) dense, in trained context"]
    lines = ["| variant | perplexity, all tokens | perplexity, tokens 512+ | vs (d), tokens 512+ |", "|---|---|---|---|"]
    for label in curves:
        lines.append(f"| {label} | {table['overall'][label]:.2f} | {table['after_512'][label]:.2f} | "
                     f"{table['after_512'][label] / ref - 1:+.1%} |")
    (args.out / "streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for label, ys in table["per_bin"].items():
        ax.plot(bins + BIN / 2, ys, "o-", ms=3, label=label)
    ax.axvline(512, color="gray", ls=":", label="trained context (512)")
    ax.set_yscale("log")
    ax.set_xlabel("position in stream (tokens)")
    ax.set_ylabel(f"perplexity per {BIN}-token bin")
    ax.set_title("pycoder-5m on a long stream: StreamingLLM reproduction")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "streaming.png")
    print(f"wrote {args.out}/streaming.md, .json, .png")


if __name__ == "__main__":
    main()
