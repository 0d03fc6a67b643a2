"""Regenerate the peer-export fixtures: tiny random-initialised decoders exported by optimum-onnx's
real exporter, as a new user would (`optimum-cli export onnx --task text-generation-with-past`,
default settings: transformers' SDPA attention, opset 18).

optimum-onnx pins transformers < 4.58, so it lives in its own virtual environment, never in
optc's (the README says how to make it):

    python3 -m venv .venv-optimum
    .venv-optimum/bin/pip install torch==2.13.0 optimum-onnx==0.1.0 "transformers<4.58" onnxruntime
    .venv-optimum/bin/python tests/peer_exports/make_fixtures.py

Each fixture is <family>/model.onnx + config.json and export.json (what made it), plus the
checkpoint itself (model.safetensors), so that a test can export the very same weights through
`optc export` (torch dynamo, native RotaryEmbedding/Attention ops) and compare; the models use
pycoder-5m's vocabulary (4096), so tests verify them with its tokenizer (`--tokenizer`). Random weights: these
fixtures test that optc reads the graph and reproduces ONNX Runtime on it, never accuracy.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE.parents[1] / "models" / "pycoder-5m"

COMMON = dict(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              max_position_embeddings=512, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
              # 10x the default init, so that logits differ by whole units and a wrong graph shows
              initializer_range=0.2)
FAMILIES = {
    "llama-gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    # fused QKV, rotary written as a split even over the whole head
    "phi3": ("Phi3Config", dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    # partial rotary (a quarter of each head), fused QKV with bias, LayerNorm, parallel residual
    "gpt-neox": ("GPTNeoXConfig", dict(num_attention_heads=4, rotary_pct=0.25)),
    # no position_ids input in optimum's export (positions computed from the cache length), head_dim
    # set apart from hidden/heads, embeddings scaled by sqrt(hidden), GELU-tanh gate
    "gemma": ("GemmaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0)),
    # interleaved partial rotary read from a precomputed sin/cos table (no Sin/Cos ops), applied
    # before the heads transpose; the cache cast to the model dtype on its way out
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=512)),
    # learned absolute positions, LayerNorm + GELU, the attention scale computed from Q's shape
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=512)),
}
# GPT-2 and GPT-J name their sizes n_embd/n_layer/n_head: of COMMON they take only these
GPT2_COMMON = {"vocab_size", "bos_token_id", "eos_token_id", "tie_word_embeddings", "initializer_range"}
# the same model as another fixture, exported with other main_export options (`optimum-cli --dtype fp16`)
VARIANTS = {"llama-gqa-fp16": ("llama-gqa", {"dtype": "fp16"})}


def main() -> None:
    import argparse

    import onnx
    import optimum.version
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="fixtures to regenerate (default: all)")
    only = set(ap.parse_args().names)
    jobs = [(name, name, {}) for name in FAMILIES] + [(name, base, opts) for name, (base, opts) in VARIANTS.items()]
    jobs = [j for j in jobs if not only or j[0] in only]
    for name, family, options in jobs:
        config_class, extra = FAMILIES[family]
        torch.manual_seed(0)
        common = {k: v for k, v in COMMON.items() if config_class not in ("GPT2Config", "GPTJConfig") or k in GPT2_COMMON}
        cfg = getattr(transformers, config_class)(**{**common, **extra})
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "src", Path(tmp) / "out"
            model.save_pretrained(src)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(TOKENIZER / f, src / f)
            main_export(str(src), output=str(out), task="text-generation-with-past", do_validation=False, **options)
            dest = HERE / name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            proto = onnx.load(out / "model.onnx")  # one self-contained file (the tiny weights inline)
            onnx.save(proto, dest / "model.onnx")
            for f in ("config.json", "model.safetensors") if not options else ("config.json",):
                shutil.copy(src / f, dest / f)  # a variant's checkpoint is its base fixture's
        (dest / "export.json").write_text(json.dumps({
            "exporter": "optimum-onnx main_export(task='text-generation-with-past'), "
                        + (f"options {options}" if options else "defaults"),
            "optimum": optimum.version.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "opset": proto.opset_import[0].version,
            "config": config_class, "seed": 0, "options": options}, indent=1) + "\n")
        print(f"{name}: {(dest / 'model.onnx').stat().st_size / 1e6:.2f} MB, opset {proto.opset_import[0].version}")


if __name__ == "__main__":
    main()
