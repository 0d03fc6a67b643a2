"""optc's CUDA code run on the CPU (tests/cuda_emulation.py): no GPU here, and a GPU run is rare,
so the kernels that `--target gpu` ships are emulated and compared with TVM's CPU build."""

from __future__ import annotations

from pathlib import Path

import pytest

import cuda_emulation

pytestmark = [pytest.mark.skipif(cuda_emulation.compiler() is None, reason="no host C++ compiler"),
              pytest.mark.tvm, pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def cuda_module(exported_decoder):
    """The Relax module `--target gpu` builds for a decoder (prefill 32, cache 64) and its target."""
    import tvm

    from optc.backends.tvm import pipeline as tvm_backend
    from optc.canonical import canonicalize
    from optc.ir import load_model

    model = load_model(Path(exported_decoder))
    info = canonicalize(model)
    mod, target_json, *_ = tvm_backend._prepare(model, info, {"layout": "float"},
                                                {"prefill_sizes": [32], "cache_sizes": [64]}, lambda *a: None,
                                                None, "gpu")
    return mod, tvm.target.Target(target_json)


def _checked(functions: dict) -> list[str]:
    """The kernels worth emulating: every one that reads or writes a bool tensor (the attention
    masks), plus the first RMS norm and the first softmax (warp-shuffle and shared-memory
    reductions)."""
    with_bool = [n for n, f in functions.items() if any(str(p.dtype) == "bool" for p in f.params)]
    reductions = [next(n for n in sorted(functions) if n.startswith(prefix)) for prefix in ("rms_norm", "softmax")]
    return sorted(set(with_bool + reductions))


def _emulate(cuda_module, pipeline, workdir):
    from optc.backends.tvm.pipeline import cpu_target
    import tvm

    mod, target = cuda_module
    scheduled = cuda_emulation.fused_functions(mod, target, pipeline)
    reference = cuda_emulation.reference_functions(mod, target)
    names = _checked(scheduled)
    assert len(names) >= 4, names  # prefill and decode attention masks at least
    cuda_emulation.build({n: scheduled[n] for n in names}, reference, target, tvm.target.Target(cpu_target()),
                         workdir)
    return cuda_emulation.run(workdir)


def test_gpu_kernels_match_the_cpu_in_emulation(cuda_module, tmp_path):
    """The kernels of optc's CUDA pipeline (TVM's default + keep_bool_access_scalar) compute what
    TVM's CPU build computes, and make no misaligned load."""
    from optc.backends.tvm.cuda import build_pipeline

    pipeline, stats = build_pipeline(cuda_module[1])
    errors, stderr = _emulate(cuda_module, pipeline, tmp_path)
    assert stats["bool_loops"] > 0
    assert max(errors.values()) < 1e-5, errors
    assert "misaligned" not in stderr, stderr[-2000:]


def test_emulation_catches_tvm_bool_vector_miscompile(cuda_module, tmp_path):
    """TVM 0.27's own CUDA pipeline loads vectorised bool masks as ushort2 (2 bytes a lane): the
    attention-score kernels come out wrong and misaligned. This is why optc keeps bool access
    scalar; if a TVM upgrade fixes it, this test says so."""
    from tvm import relax

    errors, stderr = _emulate(cuda_module, relax.get_default_pipeline(cuda_module[1]), tmp_path)
    wrong = [n for n, e in errors.items() if e > 1e-3]
    assert wrong and all("where" in n for n in wrong), errors
    assert "misaligned address" in stderr and "ushort2" in stderr
