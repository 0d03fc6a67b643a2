"""ONNX Runtime backend. Where the cache allows it (dense float, no policy), each layer's
attention is lowered to ONNX Runtime's fused GroupQueryAttention, which writes the runtime's
cache buffer in place (onnxruntime_fused.py). Otherwise the canonical graph runs as it is, plus
outputs for each step's new keys/values: the runtime appends only those to its preallocated
cache instead of copying the whole `present` tensors back out every step.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from optc.backends import onnxruntime_fused, onnxruntime_int8
from optc.backends.base import attention_outputs, expose_new_kv
from optc.errors import OptcError
from optc.ir import save_model
from optc.runtime.manifest import present_name

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "gpu": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
GRAPH_FILE = "model.onnx"
MODEL_KINDS = ("decoder", "encoder")  # what this backend lowers (optc.compile refuses the others in one line)


def compile(model: ir.Model, info, out_dir: Path, target: str, *, kv_cache=None, prefill=None, options=None,
            log=print) -> dict:
    if target not in PROVIDERS:
        raise OptcError(f"--target {target}: the onnxruntime backend supports {', '.join(PROVIDERS)} "
                        f"(the NPU target comes with the quantised outlier-splitting work)")
    options = dict(options or {})
    fused = options.pop("fused_attention", True)
    if options:
        raise OptcError(f"--backend onnxruntime takes no backend options but --fused-attention (got "
                        f"{', '.join(sorted(options))}; those are for --backend tvm)")
    # the fast path (backends/onnxruntime_fused.py) where the cache allows it; else the generic graph
    why = "--no-fused-attention" if not fused else onnxruntime_fused.why_not(model, info, kv_cache, target, prefill)
    if why is None:
        kv_in_place = onnxruntime_fused.lower(model, info, info.context, log=log, kv_cache=kv_cache)
        kv_outputs = [[present_name(layer.index, kind) for kind in ("key", "value")] for layer in info.layers]
    else:
        log(f"onnxruntime: generic attention path (Concat + Attention per step): {why}")
        kv_in_place = None
        kv_outputs = expose_new_kv(model, info)
    if target == "cpu":  # outlier_split's int8 MatMuls that share an input, stacked (onnxruntime_int8.py)
        onnxruntime_int8.lower(model, log=log)
    # attention_outputs: per-layer attention probabilities, present when a cache policy scores
    # tokens (H2O)
    section = _save(model, out_dir, target, kv_outputs, attention_outputs(model))
    if kv_in_place is not None:  # kv_outputs are then the present buffers GQA writes in place
        section["kv_in_place"] = kv_in_place
    return section


def compile_encoder(model: ir.Model, info, out_dir: Path, target: str, *, options=None, log=print) -> dict:
    """A BERT-style encoder: the graph as the passes left it (no cache, no attention lowering), plus
    on the CPU outlier_split's int8 units that share an activation stacked (onnxruntime_int8.py)."""
    if target not in PROVIDERS:
        raise OptcError(f"--target {target}: the onnxruntime backend compiles encoders for {', '.join(PROVIDERS)}")
    options = dict(options or {})
    options.pop("fused_attention", None)  # (a decoder's cache lowering: nothing to fuse in an encoder)
    if options:
        raise OptcError(f"--backend onnxruntime takes no backend options for an encoder (got "
                        f"{', '.join(sorted(options))})")
    if target == "cpu":
        onnxruntime_int8.lower(model, log=log)
    return _save(model, out_dir, target, kv_outputs=[], attention_outputs=[])  # no KV cache


def _save(model: ir.Model, out_dir: Path, target: str, kv_outputs: list, attention_outputs: list) -> dict:
    """Write the graph (weights beside it) and return the manifest's backend section."""
    files = save_model(model, Path(out_dir) / GRAPH_FILE)
    return {
        "name": "onnxruntime",
        "graph": GRAPH_FILE,
        "weights": [f.name for f in files[1:]],
        "providers": PROVIDERS[target],
        "session_options": {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 0,
                            "inter_op_num_threads": 1},
        "kv_outputs": kv_outputs,
        "attention_outputs": attention_outputs,
    }
