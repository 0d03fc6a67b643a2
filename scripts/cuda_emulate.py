"""Every kernel of a pipeline's `--target gpu` build run in the CPU emulator of
tests/cuda_emulation.py, against TVM's CPU build of the same fused function. No GPU needed
(g++ or clang++ is). Prints how many kernels differ and whether any load was misaligned.

    python scripts/cuda_emulate.py MODEL.onnx [-c CONFIG] [--tvm-default] [--workdir DIR]

--tvm-default builds with TVM's own CUDA pipeline, without optc's bool-vector workaround.
Exit status: 0 all kernels agree, 1 some differ or load misaligned.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("-c", "--config", type=Path, help="pass configuration (default: identity)")
    ap.add_argument("--tvm-default", action="store_true", help="TVM's CUDA pipeline, without optc's workaround")
    ap.add_argument("--workdir", type=Path, help="where the emulated kernels are built (default: a temp dir)")
    args = ap.parse_args(argv)

    import cuda_emulation
    import tvm
    from tvm import relax

    from optc.backends.tvm import pipeline as tvm_backend
    from optc.backends.tvm import cuda as tvm_cuda
    from optc.canonical import canonicalize
    from optc.compile import kv_cache_section
    from optc.config import PipelineConfig, load_config
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.pipeline import run_pipeline
    from optc.registry import default_registry

    registry = default_registry()
    model = load_model(args.model)
    info = canonicalize(model)
    ctx = PassContext(target="gpu", decoder=info)
    config = load_config(args.config, registry) if args.config else PipelineConfig()
    run_pipeline(model, config, registry, ctx, log=lambda *a: None)
    mod, target_json, *_ = tvm_backend._prepare(model, info, kv_cache_section(ctx), {}, lambda *a: None,
                                                ctx.runtime.prefill(), "gpu")
    target = tvm.target.Target(target_json)
    pipeline = relax.get_default_pipeline(target) if args.tvm_default else tvm_cuda.build_pipeline(target)[0]
    scheduled = cuda_emulation.fused_functions(mod, target, pipeline)
    reference = cuda_emulation.reference_functions(mod, target)
    with tempfile.TemporaryDirectory(prefix="optc-cuda-emu-") as tmp:
        workdir = args.workdir or Path(tmp)
        print(f"building {len(scheduled)} kernels for the emulator in {workdir} ...", flush=True)
        meta = cuda_emulation.build(scheduled, reference, target, tvm.target.Target(tvm_backend.cpu_target()),
                                    workdir, skip_unsupported=True)
        print(f"running {len(meta)} kernels ...", flush=True)
        errors, stderr = cuda_emulation.run(workdir, timeout=3600)
    wrong = {k: v for k, v in errors.items() if v > 1e-4}
    misaligned = stderr.count("misaligned address")
    skipped = sorted(set(scheduled) - set(meta))
    print(f"{len(errors)} kernels emulated, {len(wrong)} differ from the CPU build, {misaligned} misaligned loads"
          + (f"; not emulated (hand-threaded): {', '.join(skipped)}" if skipped else ""))
    for name, err in sorted(wrong.items()):
        print(f"  {name}: relative max |diff| {err:.3g}")
    return 1 if wrong or misaligned else 0


if __name__ == "__main__":
    sys.exit(main())
