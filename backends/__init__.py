"""Backends lower the canonical, pass-rewritten graph for a target and write it into an artifact.

Each backend module has `compile(model, info, out_dir, target) -> dict`, the manifest's
`backend` section. TVM and NPU backends come with their issues.
"""

from optc.errors import OptcError

BACKENDS = ("onnxruntime",)
TARGETS = ("cpu", "gpu", "npu")


def get_backend(name: str):
    if name == "onnxruntime":
        from optc.backends import onnxruntime

        return onnxruntime
    raise OptcError(f"--backend: unknown backend {name!r} (available: {', '.join(BACKENDS)})")
