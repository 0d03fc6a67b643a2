"""`make demo`: export -> compile (default pipeline, verified) -> stream a generation -> bench."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "models" / "pycoder-v2"  # the 2k-context reference decoder (issue 13)
BUILD = ROOT / "build" / "demo"


def optc(*args: str) -> None:
    from optc.cli import main

    print(f"\n$ optc {' '.join(args)}", flush=True)
    try:
        main(list(args))
    except SystemExit as e:
        if e.code:
            sys.exit(e.code)


def main() -> None:
    onnx_path = BUILD / "model.onnx"
    weights = HF / "model.safetensors"
    if not onnx_path.exists() or onnx_path.stat().st_mtime < weights.stat().st_mtime:
        optc("export", "--hf", str(HF), "-o", str(onnx_path))
    optc("inspect", str(onnx_path))
    optc("compile", str(onnx_path), "--config", str(ROOT / "configs" / "default.yaml"),
         "-o", str(BUILD / "artifact"), "--force")
    optc("run", str(BUILD / "artifact"), "--prompt", "def read_config(path):", "--max-new-tokens", "80",
         "--seed", "1")
    optc("bench", str(BUILD / "artifact"), "--original", str(onnx_path), "--hf", str(HF),
         "--json", str(BUILD / "bench.json"), "--plot", str(BUILD / "bench.png"))


if __name__ == "__main__":
    main()
