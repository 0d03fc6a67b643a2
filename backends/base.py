"""What every backend shares: the backend protocol, the registry of backends, and the graph
outputs every artifact exposes to the runtime (this step's new keys/values, and the attention
probabilities a scoring cache policy reads)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import onnx_ir as ir

from optc.errors import OptcError
from optc.runtime.manifest import is_attention_output, new_kv_output


class Backend(Protocol):
    """A backend module: lowers the canonical, pass-rewritten graph for a target into `out_dir`
    and returns the manifest's `backend` section. `kv_cache` is the manifest's kv_cache section,
    `prefill` what block-sparse prefill needs (or None), `options` the backend's own options."""

    def compile(self, model: ir.Model, info, out_dir: Path, target: str, *, kv_cache: dict | None = None,
                prefill: dict | None = None, options: dict | None = None, log=print) -> dict: ...


# name -> module; a module is imported only when its backend is asked for (TVM is heavy)
BACKENDS = {"onnxruntime": "optc.backends.onnxruntime", "tvm": "optc.backends.tvm.pipeline",
            "npu": "optc.backends.npu.backend"}  # (npu: what --target npu compiles with)


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise OptcError(f"--backend: unknown backend {name!r} (available: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name])


def expose_new_kv(model: ir.Model, info) -> list[list[str]]:
    """Make each layer's new keys and values (this step's, before the Concat) graph outputs under
    their reserved names; the runtime appends them to the cache it owns."""
    values = {v.name: v for n in model.graph for v in n.outputs}
    names = []
    for layer in info.layers:
        pair = []
        for kind, vname in (("key", layer.new_key), ("value", layer.new_value)):
            v = values.get(vname)
            if v is None:
                raise OptcError(f"backend: layer {layer.index} {kind}s ({vname!r}) vanished from the graph")
            out_name = new_kv_output(layer.index, kind)
            if v.name != out_name:
                v.name = out_name
            if v not in model.graph.outputs:
                model.graph.outputs.append(v)
            pair.append(out_name)
        names.append(pair)
    return names


def attention_outputs(model: ir.Model) -> list[str]:
    """The per-layer attention-probability outputs (H2O), in layer order."""
    return sorted((v.name for v in model.graph.outputs if is_attention_output(v.name)),
                  key=lambda n: int(n.rsplit(".", 1)[1]))
