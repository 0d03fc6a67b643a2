"""ONNX Runtime backend. Where the cache allows it (dense float, no policy), each layer's
attention is lowered to ONNX Runtime's fused GroupQueryAttention, which writes the runtime's
cache buffer in place (onnxruntime_fused.py). Otherwise the canonical graph runs as it is, plus
outputs for each step's new keys/values: the runtime appends only those to its preallocated
cache instead of copying the whole `present` tensors back out every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optc.backends import onnxruntime_fused, onnxruntime_int8
from optc.backends.base import attention_outputs, expose_new_kv
from optc.errors import OptcError
from optc.ir import const, save_model
from optc.runtime.manifest import LOGIT_ROWS_INPUT, LOGITS, present_name

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
    rows_input = logits_of_last_rows(model, log)
    # attention_outputs: per-layer attention probabilities, present when a cache policy scores
    # tokens (H2O)
    section = _save(model, out_dir, target, kv_outputs, attention_outputs(model))
    if kv_in_place is not None:  # kv_outputs are then the present buffers GQA writes in place
        section["kv_in_place"] = kv_in_place
    if rows_input is not None:
        section["logit_rows_input"] = rows_input
    return section


def logits_of_last_rows(model: ir.Model, log=print) -> str | None:
    """A prompt's prefill needs the last token's logits only, not the LM head over every prompt
    token (for pycoder-v2 a sixth of the prefill's multiply-adds): the LM head reads the last
    `optc.logit_rows` rows of the final hidden states (a Slice on the token axis); the runtime feeds
    the step's token count where every row is wanted (teacher-forced perplexity, a dropping
    prefill). Returns the input's name, or None (and every row keeps its logits) where the logits
    are not one projection of a [batch, tokens, hidden] state."""
    logits = {v.name: v for v in model.graph.outputs}.get(LOGITS)
    head = logits.producer() if logits is not None else None
    if head is None or head.graph is not model.graph or \
            (head.domain, head.op_type) not in (("", "MatMul"), ("com.microsoft", "MatMulNBits")):
        return None
    x = head.inputs[0]
    source = x.producer() if x is not None else None
    if x is None or x.shape is None or len(x.shape) != 3:
        return None
    if source is not None and source.op_type == "DequantizeLinear":
        return None  # (a QDQ head: onnxruntime_int8 matches its quantised input as it stands)
    rows = ir.val(LOGIT_ROWS_INPUT, ir.DataType.INT64, [1])
    model.graph.inputs.append(rows)
    t = tape.Tape()
    start = t.op("Neg", [rows])
    last = t.op("Slice", [x, start, const(t, np.array([np.iinfo(np.int64).max])), const(t, np.array([1]))])
    for i, node in enumerate(t.nodes):
        node.name = f"optc/logit_rows/{i}"
    model.graph.insert_before(head, t.nodes)
    head.replace_input_with(0, last)
    log("onnxruntime: the LM head runs on the step's last rows only (optc.logit_rows: a prompt's prefill computes "
        "the last token's logits)")
    return LOGIT_ROWS_INPUT


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
