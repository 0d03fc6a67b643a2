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
    from transformers.cache_utils import DynamicCache

    hf_dir, out = Path(hf_dir), Path(out)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, attn_implementation="eager").eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    kv_heads = cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)],
                                 config=cfg)
            o = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=cache, use_cache=True)
            presents = []
            for layer in o.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (o.logits, *presents)

    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    dyn = {"input_ids": {0: "batch", 1: "sequence_length"}, "attention_mask": {0: "batch", 1: "total_sequence_length"},
           "position_ids": {0: "batch", 1: "sequence_length"}, "logits": {0: "batch", 1: "sequence_length"}}
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(f"past_key_values.{i}.{kind}")
            outputs.append(f"present.{i}.{kind}")
            dyn[inputs[-1]] = {0: "batch", 2: "past_sequence_length"}
            dyn[outputs[-1]] = {0: "batch", 2: "total_sequence_length"}
    batch, seq, past = 2, 5, 3
    args = (torch.randint(0, cfg.vocab_size, (batch, seq)), torch.ones(batch, past + seq, dtype=torch.int64),
            torch.arange(past, past + seq).unsqueeze(0).expand(batch, -1).contiguous(),
            *[torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * n_layers)])
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithPast().eval(), args, str(out), dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=dyn, do_constant_folding=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out.parent / name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(export(Path(sys.argv[1]), Path(sys.argv[2])))
