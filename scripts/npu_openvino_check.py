"""The NPU runtime's OpenVINO branch on the reference decoder: the closest real check without an
Intel NPU (issue 19). OpenVINO's own CPU device stands in for its NPU device.

    flock /tmp/optc-bench.lock .venv/bin/python scripts/npu_openvino_check.py [--prompts 4]
                                                                   [--out build/npu_bench] [--json F]

Compiles pycoder-v2 with outlier_split (whole QDQ units, 8-bit activations: the generic profile
lists no uint16, QNN's A16W8 form) for
--target npu with the generic_npu profile (execution provider "any"), in .venv (the compile
checks the NPU partitions on QNN's simulator). Then, in .venv-openvino (`make venv-openvino`),
loads the artifact with OpenVINO's CPU device in place of its NPU device (CPU fallback disabled:
every node of every NPU partition must be OpenVINO's, and is counted), and compares the logits of
held-out prompts (prefill in chunks, then decode, teacher-forced) with the float graph, beside
the same partitions on ONNX Runtime's CPU EP. Times are this host's CPU through two runtimes:
neither is an NPU timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the decoder, its outlier_split and the prompts of scripts/npu_bench.py (the same artifact settings)
from npu_bench import CHUNK, DECODER, LENGTH, MAX_CACHE, QDQ_PASS, ROOT, _timed_logits, log

OV_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"


def build(out: Path, bits: int) -> tuple[Path, Path]:
    """(the NPU artifact, the float artifact), compiled once and kept in `out`."""
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.export import export_decoder
    from optc.registry import default_registry

    onnx_path = out / "v2" / "model.onnx"
    if not onnx_path.is_file():
        export_decoder(DECODER, onnx_path, log=log)
    art, float_art = out / f"v2_npu_generic_a{bits}", out / "v2_float"
    if not (art / "manifest.json").is_file():
        cfg = parse_config({"passes": [{**QDQ_PASS, "activation_bits": bits}]}, default_registry())
        compile_model(onnx_path, art, config=cfg, target="npu", verify=False, force=True, log=log,
                      backend_options={"chunk": CHUNK, "max_cache": MAX_CACHE, "profile": "generic_npu"})
    if not (float_art / "manifest.json").is_file():
        compile_model(onnx_path, float_art, verify=False, force=True, log=log)
    return art, float_art


def run_in_openvino(art: Path, float_art: Path, prompts: int) -> dict:
    """(In .venv-openvino.) Top-1 agreement with float and decode time, OpenVINO vs the CPU EP."""
    import numpy as np

    import optc.runtime.executors.npu as npu
    from optc.data import read_texts
    from optc.runtime.model import load_unpublished
    from optc.verify import token_windows

    npu.OPENVINO_NPU_DEVICES = ("CPU",)  # OpenVINO's CPU device stands in for its NPU device
    assert npu.npu_provider("any") == npu.OPENVINO, npu.openvino_devices()
    t0 = time.perf_counter()
    ov = load_unpublished(art)
    load_s = time.perf_counter() - t0
    with npu.npu_partitions_on_cpu():
        cpu = load_unpublished(art)
    flt = load_unpublished(float_art)
    manifest = json.loads((art / "manifest.json").read_text())
    assigned: dict[str, int] = {}
    for graph in manifest["backend"]["graphs"].values():
        for p in graph["partitions"]:
            if p["device"] == "npu":
                for ep, k in npu.assigned_nodes(str(art / p["file"]), npu.OPENVINO, {}).items():
                    assigned[ep] = assigned.get(ep, 0) + k
    windows = token_windows(flt.tokenizer, read_texts(None), flt.config.get("bos_token_id"), count=prompts,
                            length=LENGTH)
    rows: dict[str, list] = {"openvino": [], "cpu_ep": []}
    for i, ids in enumerate(windows):
        ref = _timed_logits(flt, ids)[0]
        for key, model in (("openvino", ov), ("cpu_ep", cpu)):
            got, _, decode_s = _timed_logits(model, ids)
            rows[key].append({"top1": float((got.argmax(-1) == ref.argmax(-1)).mean()), "decode": decode_s})
        log(f"  prompt {i}: top-1 vs float: OpenVINO {rows['openvino'][-1]['top1']:.4f}, "
            f"CPU EP {rows['cpu_ep'][-1]['top1']:.4f}")
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "openvino_devices": npu.openvino_devices(), "provider_line": ov.provider,
            "npu_partition_nodes_by_ep": assigned, "load_seconds_openvino": load_s, "prompts": len(windows),
            "top1_vs_float": {k: float(np.mean([r["top1"] for r in v])) for k, v in rows.items()},
            "decode_ms_per_token": {k: 1000 * statistics.median(r["decode"] for r in v) for k, v in rows.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "npu_bench")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--stage", choices=["all", "openvino"], default="all", help=argparse.SUPPRESS)
    ap.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage == "openvino":
        print("RESULT " + json.dumps(run_in_openvino(args.artifact, args.out / "v2_float", args.prompts)))
        return
    if not OV_PYTHON.exists():
        sys.exit("npu_openvino_check: no .venv-openvino here: run `make venv-openvino` first")
    results = {}
    for bits in (8,):
        art, _ = build(args.out, bits)
        log(f"a{bits}: running {art.name} in .venv-openvino")
        run = subprocess.run([str(OV_PYTHON), __file__, "--stage", "openvino", "--artifact", str(art),
                              "--out", str(args.out), "--prompts", str(args.prompts)],
                             stdout=subprocess.PIPE, text=True)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if run.returncode or line is None:
            sys.exit(f"npu_openvino_check: the OpenVINO run of {art.name} failed (exit {run.returncode})")
        results[f"a{bits}"] = json.loads(line[len("RESULT "):])
    print("| activations | NPU partition nodes by EP | top-1 vs float: OpenVINO (CPU device) | top-1: CPU EP "
          "| decode ms/token: OpenVINO (CPU device) | CPU EP |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['npu_partition_nodes_by_ep']} | {r['top1_vs_float']['openvino']:.4f} | "
              f"{r['top1_vs_float']['cpu_ep']:.4f} | {r['decode_ms_per_token']['openvino']:.2f} | "
              f"{r['decode_ms_per_token']['cpu_ep']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
