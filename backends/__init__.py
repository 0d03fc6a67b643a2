"""Backends lower the canonical, pass-rewritten graph for a target and write it into an artifact.

Each backend module has `compile(model, info, out_dir, target, *, kv_cache, prefill, options, log)
-> dict`, the manifest's `backend` section (`prefill`: what block-sparse prefill needs, or None). The NPU backend comes with its issue.
"""

from optc.errors import OptcError

BACKENDS = ("onnxruntime", "tvm")
TARGETS = ("cpu", "gpu", "npu")


def get_backend(name: str):
    if name == "onnxruntime":
        from optc.backends import onnxruntime

        return onnxruntime
    if name == "tvm":
        from optc.backends import tvm_backend  # imports TVM itself only when compiling

        return tvm_backend
    raise OptcError(f"--backend: unknown backend {name!r} (available: {', '.join(BACKENDS)})")
