"""Export a decoder the way optimum does: torch's TorchScript ONNX exporter, opset 14, eager attention.

optc's own `optc export` uses the dynamo exporter (opset 23, standard Attention op). Graphs from
optimum / transformers.js look different: MatMul-Softmax-MatMul attention, decomposed RMSNorm and
rotary, Shape/Gather/Constant noise, the same input/output names. optimum-onnx itself pins
transformers < 4.58, so this script reproduces its exporter path with the transformers we use;
tests compile its output to prove the canonicaliser handles "another common tool".

    .venv/bin/python models/export_torchscript.py models/pycoder-5m build/ts/model.onnx
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path


def export(hf_dir: Path, out: Path, opset: int = 14) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from optc.export import SIDE_FILES, decoder_with_past, example_decoder_inputs, io_names

    hf_dir, out = Path(hf_dir), Path(out)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, attn_implementation="eager").eval()
    inputs, outputs = io_names(model.config.num_hidden_layers)
    dyn = {"input_ids": {0: "batch", 1: "sequence_length"}, "attention_mask": {0: "batch", 1: "total_sequence_length"},
           "position_ids": {0: "batch", 1: "sequence_length"}, "logits": {0: "batch", 1: "sequence_length"}}
    dyn.update({name: {0: "batch", 2: "past_sequence_length"} for name in inputs[3:]})
    dyn.update({name: {0: "batch", 2: "total_sequence_length"} for name in outputs[1:]})
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(decoder_with_past(model), example_decoder_inputs(model.config), str(out), dynamo=False,
                          opset_version=opset, input_names=inputs, output_names=outputs, dynamic_axes=dyn,
                          do_constant_folding=True)
    for name in SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out.parent / name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(export(Path(sys.argv[1]), Path(sys.argv[2])))
