"""Executors run an artifact's compiled graph for the runtime model: `onnxruntime` (an ONNX
Runtime session) and `tvm` (a TVM library of static-shape buckets; loads the TVM runtime only
when such an artifact is loaded) and `npu` (static NPU/CPU partitions, executors/npu.py)."""

from __future__ import annotations

from pathlib import Path

from optc.runtime.artifact import ArtifactError
from optc.runtime.manifest import ModelSpec, NpuBackend, OnnxRuntimeBackend, TvmBackend


def make_executor(root: Path, manifest: dict, model: ModelSpec):
    """The executor of the manifest's backend, its section type-checked first (a hand-edited
    section is an ArtifactError before any file of the artifact is used)."""
    backend = manifest.get("backend")
    name = backend.get("name") if isinstance(backend, dict) else None
    where = f"{root / 'manifest.json'}: backend"
    if name == "onnxruntime":
        from optc.runtime.executors.onnxruntime import OnnxRuntimeExecutor

        return OnnxRuntimeExecutor(root, manifest, OnnxRuntimeBackend.from_dict(backend, model.n_layers, where))
    if name == "tvm":
        spec = TvmBackend.from_dict(backend, model.n_layers, where)
        from optc.runtime.executors.tvm import TvmExecutor  # loads the TVM runtime only for TVM artifacts

        return TvmExecutor(root, manifest, spec, model)
    if name == "npu":  # static NPU/CPU partitions (an NPU execution provider, or explicit CPU fallback)
        from optc.runtime.executors.npu import NpuExecutor

        return NpuExecutor(root, manifest, NpuBackend.from_dict(backend, model.n_layers, where), model)
    raise ArtifactError(f"{root / 'manifest.json'}: unknown backend {name!r}")
