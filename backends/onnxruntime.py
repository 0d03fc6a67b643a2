"""ONNX Runtime backend: the canonical graph, plus outputs for each step's new keys/values.

The extra outputs let the runtime append only the new tokens to its own preallocated KV cache
instead of copying the whole `present` tensors back out every step.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from optc.backends.base import attention_outputs, expose_new_kv
from optc.errors import OptcError
from optc.ir import save_model

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "gpu": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
GRAPH_FILE = "model.onnx"


def compile(model: ir.Model, info, out_dir: Path, target: str, *, kv_cache=None, prefill=None, options=None,
            log=print) -> dict:
    if target not in PROVIDERS:
        raise OptcError(f"--target {target}: the onnxruntime backend supports {', '.join(PROVIDERS)} "
                        f"(the NPU target comes with the quantised outlier-splitting work)")
    if options:
        raise OptcError(f"--backend onnxruntime takes no backend options (got {', '.join(sorted(options))}; "
                        f"those are for --backend tvm)")
    kv_outputs = expose_new_kv(model, info)
    files = save_model(model, Path(out_dir) / GRAPH_FILE)
    return {
        "name": "onnxruntime",
        "graph": GRAPH_FILE,
        "weights": [f.name for f in files[1:]],
        "providers": PROVIDERS[target],
        "session_options": {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 0,
                            "inter_op_num_threads": 1},
        "kv_outputs": kv_outputs,
        # per-layer attention probabilities, present when a cache policy scores tokens (H2O)
        "attention_outputs": attention_outputs(model),
    }
