"""Issue: peer exports. What optimum-onnx's real exporter emits by default (transformers' SDPA
attention at opset 18), for tiny random-initialised decoders of several families
(tests/peer_exports/make_fixtures.py made them; optimum lives in its own venv, not optc's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DECODER_DIR, ROOT, run_cli

PEERS = ROOT / "tests" / "peer_exports"
FAMILIES = ["llama-gqa", "llama-mha", "mistral", "qwen2"]
TOKENIZER = DECODER_DIR / "tokenizer.json"


def _compile(family: str, out: Path, passes: list[dict] | None = None) -> dict:
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.registry import default_registry

    cfg = parse_config({"passes": passes or []}, default_registry())
    return compile_model(PEERS / family / "model.onnx", out, config=cfg, tokenizer=TOKENIZER,
                         verify_length=64, log=lambda *_: None)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_default_export_compiles_and_reproduces_onnxruntime(family, tmp_path):
    """The identity artifact of the unmodified export matches ONNX Runtime on it exactly."""
    assert json.loads((PEERS / family / "export.json").read_text())["opset"] == 18
    manifest = _compile(family, tmp_path / "art")
    v = manifest["verification"]
    assert v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] <= 1e-4, v
    assert manifest["model"]["rewrites"]["decomposed_attention_to_Attention"] == manifest["model"]["n_layers"]


def test_optimum_export_takes_the_kv_quantisation_pass(tmp_path):
    manifest = _compile("llama-gqa", tmp_path / "art", [{"name": "kv_cache_compression", "bits": 8}])
    assert manifest["kv_cache"]["layout"] == "kivi" and manifest["kv_cache"]["bits"] == 8
    assert manifest["verification"]["top1_agreement"] >= 0.9, manifest["verification"]


def test_optimum_export_without_rotary_op_is_refused_by_sink_window_in_one_line(tmp_path, capsys):
    """optimum decomposes rotary into Sin/Cos/Slice/Neg: position-rewriting passes refuse it, saying
    what they need, and nothing is written."""
    cfg = tmp_path / "sw.yaml"
    cfg.write_text("passes:\n  - name: sparse_attention\n    mode: sink_window\n    sinks: 4\n    window: 60\n")
    out = tmp_path / "art"
    code, _, err = run_cli(["compile", PEERS / "llama-gqa" / "model.onnx", "-c", cfg, "-o", out,
                            "--tokenizer", TOKENIZER], capsys)
    assert code == 2 and err.count("\n") == 1 and "RotaryEmbedding" in err and "Traceback" not in err, err
    assert not out.exists()
