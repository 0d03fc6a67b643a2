"""`optc export`: a local Hugging Face decoder checkpoint -> ONNX in the common decoder layout.

The layout is the one optimum and transformers.js use, so optc's canonicaliser sees the same
interface whichever tool exported a model:

    inputs   input_ids [batch, seq], attention_mask [batch, past+seq], position_ids [batch, seq],
             past_key_values.{i}.key / .value   [batch, kv_heads, past, head_dim]
    outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past+seq, head_dim]

One graph serves prefill (past = 0) and decode. torch's dynamo exporter at opset 23 lowers
scaled-dot-product attention to the standard ONNX `Attention` op.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from optc.errors import OptcError
from optc.runtime.manifest import (ATTENTION_MASK, CONTEXT_METADATA_KEY, INPUT_IDS, KV_KINDS, LOGITS,
                                   POSITION_IDS, past_name, present_name)

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                   "GemmaForCausalLM", "GPTNeoXForCausalLM", "GPT2LMHeadModel"}
ENCODER_ARCHS = {"BertModel"}
OPSET = 23
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json")
# (sentence-transformers' files tell optc compile the max sequence length and whether embeddings are normalised)
POOLING_SIDE_FILE = "pooling_config.json"  # (sentence-transformers' 1_Pooling/config.json, flattened)
ENCODER_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "vocab.txt",
                      "sentence_bert_config.json", "modules.json")


def hf_architectures(hf_dir: Path) -> set[str]:
    import json

    cfg_path = Path(hf_dir) / "config.json"
    if not cfg_path.is_file():
        raise OptcError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    try:
        return set(json.loads(cfg_path.read_text()).get("architectures") or [])
    except ValueError as e:
        raise OptcError(f"{cfg_path}: invalid JSON ({e})") from None


def _load_hf(hf_dir: Path):
    archs = hf_architectures(hf_dir)
    if not archs & SUPPORTED_ARCHS:
        raise OptcError(f"{hf_dir / 'config.json'}: architecture {sorted(archs) or '?'} is not one of "
                        f"{sorted(SUPPORTED_ARCHS | ENCODER_ARCHS)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, attn_implementation="sdpa",
                                                     dtype="float32")
    except (ValueError, OSError, KeyError) as e:  # an incomplete or foreign config / missing weights
        raise OptcError(f"{hf_dir}: transformers cannot load it ({' '.join(str(e).split())[:300]})") from None
    model.eval()
    return model


def decoder_with_past(model):
    """A torch.nn.Module around a HF causal LM whose KV cache is flat named tensors:
    (input_ids, attention_mask, position_ids, *past) -> (logits, *present), past/present
    ordered layer by layer, key before value. Used by every exporter path."""
    import torch
    from transformers.cache_utils import DynamicCache

    n_layers = model.config.num_hidden_layers

    class DecoderWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)],
                                 config=model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return DecoderWithPast().eval()


def example_decoder_inputs(config, batch: int = 2, seq: int = 5, past: int = 3):
    """Example inputs for tracing; sizes > 1 and distinct so no dimension gets specialised."""
    import torch

    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (torch.randint(0, config.vocab_size, (batch, seq)), torch.ones(batch, past + seq, dtype=torch.int64),
            torch.arange(past, past + seq).unsqueeze(0).expand(batch, -1).contiguous(),
            *[torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * config.num_hidden_layers)])


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    outputs = [LOGITS]
    for i in range(n_layers):
        inputs += [past_name(i, kind) for kind in KV_KINDS]
        outputs += [present_name(i, kind) for kind in KV_KINDS]
    return inputs, outputs


def export_decoder(hf_dir: Path, out_path: Path, *, log=print) -> Path:
    """Export `hf_dir` to `out_path` (+ `out_path.data` external weights). Writes atomically."""
    import torch

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    model = _load_hf(hf_dir)
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    args = example_decoder_inputs(cfg)
    B = torch.export.Dim("batch", min=1, max=1024)
    S = torch.export.Dim("sequence_length", min=1, max=65536)
    P = torch.export.Dim("past_sequence_length", min=0, max=65536)
    T = torch.export.Dim("total_sequence_length", min=1, max=131072)
    dyn = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: T}, "position_ids": {0: B, 1: S},
           "past": tuple({0: B, 2: P} for _ in args[3:])}
    input_names, output_names = io_names(n_layers)
    log(f"exporting {hf_dir} ({type(model).__name__}, {n_layers} layers, {args[3].shape[1]} KV heads) "
        f"at opset {OPSET}")
    with torch.no_grad():
        program = torch.onnx.export(decoder_with_past(model), args, dynamo=True, opset_version=OPSET,
                                    input_names=input_names, output_names=output_names, dynamic_shapes=dyn,
                                    optimize=True, verbose=False)
    _write_export(program, out_path, hf_dir, SIDE_FILES, context=getattr(cfg, "max_position_embeddings", None))
    log(f"wrote {out_path}")
    return out_path


def _write_export(program, out_path: Path, hf_dir: Path, side_files, context: int | None) -> None:
    """Save an ONNXProgram as `out_path` + `<name>.data` with the HF side files (tokenizer,
    configs) beside it, as optimum lays them out. Staged in a temp dir, then moved into place."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".optc-export-") as tmp:
        tmp_model = Path(tmp) / out_path.name
        program.save(str(tmp_model), external_data=True)
        produced = [p for p in Path(tmp).iterdir() if p.name != out_path.name]
        _finalize(tmp_model, produced, out_path.name + ".data", context=context)
        for name in side_files:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, Path(tmp) / name)
        for p in Path(tmp).iterdir():
            os.replace(p, out_path.parent / p.name)


def _finalize(model_path: Path, produced: list[Path], data_name: str, context: int | None) -> None:
    """Name the external-data file `<model>.data` and record the trained context as metadata."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    if len(produced) == 1 and produced[0].name != data_name:
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_name
        produced[0].rename(produced[0].with_name(data_name))
    if context:
        onnx.helper.set_model_props(proto, {CONTEXT_METADATA_KEY: str(context)})
    onnx.save(proto, str(model_path))


def export_encoder(hf_dir: Path, out_path: Path, *, log=print) -> Path:
    """A BERT-style encoder (e.g. all-MiniLM-L6-v2) -> ONNX:
    input_ids, attention_mask, token_type_ids [batch, seq] -> last_hidden_state [batch, seq, hidden]."""
    import torch
    from transformers import AutoModel

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    archs = hf_architectures(hf_dir)
    if not archs & ENCODER_ARCHS:
        raise OptcError(f"{hf_dir / 'config.json'}: architecture {sorted(archs) or '?'} is not an encoder optc exports "
                        f"({sorted(ENCODER_ARCHS)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = AutoModel.from_pretrained(hf_dir, local_files_only=True, attn_implementation="eager").eval()
    except (ValueError, OSError, KeyError) as e:
        raise OptcError(f"{hf_dir}: transformers cannot load it ({' '.join(str(e).split())[:300]})") from None

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    batch, seq = 2, 7
    args = (torch.randint(0, model.config.vocab_size, (batch, seq)), torch.ones(batch, seq, dtype=torch.int64),
            torch.zeros(batch, seq, dtype=torch.int64))
    B = torch.export.Dim("batch", min=1, max=1024)
    S = torch.export.Dim("sequence_length", min=1, max=model.config.max_position_embeddings)
    dyn = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: S}, "token_type_ids": {0: B, 1: S}}
    log(f"exporting encoder {hf_dir} ({type(model).__name__}) at opset {OPSET}")
    with torch.no_grad():
        program = torch.onnx.export(Encoder().eval(), args, dynamo=True, opset_version=OPSET,
                                    input_names=list(dyn), output_names=["last_hidden_state"],
                                    dynamic_shapes=dyn, optimize=True)
    _write_export(program, out_path, hf_dir, ENCODER_SIDE_FILES, context=model.config.max_position_embeddings)
    pooling = hf_dir / "1_Pooling" / "config.json"  # sentence-transformers' pooling: optc compile checks it
    if pooling.is_file():
        shutil.copyfile(pooling, out_path.parent / POOLING_SIDE_FILE)
    log(f"wrote {out_path}")
    return out_path
