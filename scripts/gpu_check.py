"""Check a TVM artifact on the machine it is for, against expected logits, and time it.

    python scripts/gpu_check.py ARTIFACT [--expected FILE] [--repeat N]

`optc compile --backend tvm --target gpu` writes `expected_logits.safetensors` into the artifact:
one held-out prompt, prefilled then decoded token by token by ONNX Runtime on the compiling
machine's CPU from the same rewritten graph. This script runs the same steps through optc's
runtime (TVM runtime only: no compiler, no torch) and reports top-1 agreement and max |Δlogit|
against the tolerance the manifest states, then the latency of prefill and decode.

Exit status: 0 pass, 1 mismatch, 2 the artifact cannot be loaded here.
Needs: python3 with numpy and safetensors, the TVM runtime (apache-tvm + apache-tvm-ffi), and
for a CUDA artifact an NVIDIA driver. optc itself is used from this checkout; no install needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOLERANCE = 1e-3


def import_runtime():
    """optc.runtime, installed or straight from this checkout (whose runtime/ is a top-level folder
    that the installed package maps to optc.runtime)."""
    try:
        import optc.runtime

        return optc.runtime
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import optc  # noqa: F401  (ROOT/optc)

    spec = importlib.util.spec_from_file_location("optc.runtime", ROOT / "runtime" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "runtime")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["optc.runtime"] = module
    spec.loader.exec_module(module)
    return module


def run_steps(model, ids: np.ndarray, decode_tokens: int) -> tuple[np.ndarray, float, list[float]]:
    """Prefill ids[:-decode_tokens], then decode the rest one by one: logits of every position,
    prefill seconds, per-token decode seconds."""
    model.reset()
    head = len(ids) - decode_tokens
    t0 = time.perf_counter()
    rows = [model.prefill(ids[:head], all_logits=True)]  # logits come back to the host: synchronised
    prefill_s = time.perf_counter() - t0
    steps = []
    for t in ids[head:]:
        t0 = time.perf_counter()
        rows.append(model.decode(int(t))[None])
        steps.append(time.perf_counter() - t0)
    return np.concatenate(rows), prefill_s, steps


def check(artifact: Path, expected_path: Path | None = None, repeat: int = 5, out=print) -> int:
    runtime = import_runtime()
    from safetensors.numpy import load_file

    t0 = time.perf_counter()
    try:
        model = runtime.load(artifact)
    except runtime.ArtifactError as e:
        out(f"error: {e}")
        return 2
    load_s = time.perf_counter() - t0
    spec = model.manifest.get("gpu_check", {})
    if expected_path is None:
        if "file" not in spec:
            out(f"error: {artifact}: the manifest names no expected logits (compile with --target gpu, "
                f"or pass --expected)")
            return 2
        expected_path = artifact / spec["file"]
    expected = load_file(str(expected_path))
    ids, want = expected["input_ids"], expected["logits"]
    decode_tokens = int(spec.get("decode_tokens", 32))
    tolerance = float(spec.get("max_abs_logit_diff", DEFAULT_TOLERANCE))

    t0 = time.perf_counter()
    got, _, _ = run_steps(model, ids, decode_tokens)  # the first run also loads the kernels
    first_s = time.perf_counter() - t0
    diff = float(np.abs(got - want).max())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    ok = top1 == 1.0 and diff <= tolerance
    out(f"artifact   {artifact} ({model.provider})")
    out(f"load       {load_s:.2f} s; first run (kernels loaded on first use) {first_s:.2f} s")
    out(f"check      {len(ids)} tokens ({len(ids) - decode_tokens} prefilled, {decode_tokens} decoded) vs "
        f"{spec.get('reference', expected_path.name)}")
    out(f"top-1      {top1:.2%}")
    out(f"max |Δ|    {diff:.3g} (tolerance {tolerance:g})")

    prefills, decodes = [], []
    for _ in range(repeat):
        _, p, steps = run_steps(model, ids, decode_tokens)
        prefills.append(p)
        decodes.extend(steps)
    rows = [(f"prefill {len(ids) - decode_tokens} tokens", statistics.median(prefills) * 1e3),
            ("decode, per token", statistics.median(decodes) * 1e3)]
    longest = max((b["tokens"] for b in model.manifest["backend"].get("buckets", [])
                   if not any(b["segments"])), default=0)
    if longest > len(ids) - decode_tokens:
        prompt = np.random.default_rng(0).integers(0, model.config["vocab_size"], longest)
        times = []
        for _ in range(repeat):
            model.reset()
            t0 = time.perf_counter()
            model.prefill(prompt)
            times.append(time.perf_counter() - t0)
        rows.append((f"prefill {longest} tokens (TTFT)", statistics.median(times) * 1e3))
    out(f"latency    median of {repeat} runs")
    for name, ms in rows:
        out(f"  {name:<28} {ms:9.2f} ms")
    out("PASS" if ok else "FAIL: the artifact does not reproduce the expected logits")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--expected", type=Path, help="expected logits (default: the manifest's gpu_check file)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs (default 5)")
    args = ap.parse_args(argv)
    return check(args.artifact, args.expected, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
