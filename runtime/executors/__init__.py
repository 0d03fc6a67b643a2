"""Executors run an artifact's compiled graph for the runtime model: `onnxruntime` (an ONNX
Runtime session) and `tvm` (a TVM library of static-shape buckets; loads the TVM runtime only
when such an artifact is loaded)."""

from __future__ import annotations

from pathlib import Path

from optc.runtime.artifact import ArtifactError


def make_executor(root: Path, manifest: dict):
    name = manifest.get("backend", {}).get("name")
    if name == "onnxruntime":
        from optc.runtime.executors.onnxruntime import OnnxRuntimeExecutor

        return OnnxRuntimeExecutor(root, manifest)
    if name == "tvm":
        from optc.runtime.executors.tvm import TvmExecutor  # loads the TVM runtime only for TVM artifacts

        return TvmExecutor(root, manifest)
    raise ArtifactError(f"{root / 'manifest.json'}: unknown backend {name!r}")
