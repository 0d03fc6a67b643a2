"""Bad input -> one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx
import pytest

from conftest import config_error, run_cli


def assert_clean_error(code, err, *needles, exit_code=2):
    assert code == exit_code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def compile_args(model, out, cfg=None):
    return ["compile", model, "-o", out] + (["-c", cfg] if cfg else [])


# --------------------------------------------------------------------------------- models --
def test_missing_onnx(tmp_path, capsys):
    code, _, err = run_cli(compile_args(tmp_path / "nope.onnx", tmp_path / "out"), capsys)
    assert_clean_error(code, err, "nope.onnx", "no such ONNX file")
    assert not (tmp_path / "out").exists()


def test_truncated_onnx(tmp_path, exported_decoder, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(exported_decoder.read_bytes()[:1000])
    shutil.copy(exported_decoder.parent / "tokenizer.json", tmp_path)
    code, _, err = run_cli(compile_args(bad, tmp_path / "out"), capsys)
    assert_clean_error(code, err, "model.onnx", "not a valid ONNX model")
    assert not (tmp_path / "out").exists()


def test_truncated_external_data(tmp_path, exported_decoder, capsys):
    for f in exported_decoder.parent.iterdir():
        shutil.copy(f, tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, _, err = run_cli(compile_args(tmp_path / "model.onnx", tmp_path / "out"), capsys)
    assert_clean_error(code, err, "truncated")


def test_external_data_escaping_model_dir(tmp_path, exported_decoder, capsys):
    proto = onnx.load(str(exported_decoder), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    (tmp_path / "m").mkdir()
    onnx.save(proto, str(tmp_path / "m" / "model.onnx"))
    code, _, err = run_cli(compile_args(tmp_path / "m" / "model.onnx", tmp_path / "out"), capsys)
    assert_clean_error(code, err, "outside the model directory")


def test_not_a_decoder_graph(tmp_path, capsys):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g), str(tmp_path / "relu.onnx"))
    (tmp_path / "tokenizer.json").write_text("{}")
    code, _, err = run_cli(compile_args(tmp_path / "relu.onnx", tmp_path / "out"), capsys)
    assert_clean_error(code, err, "input_ids", "not found")
    code, _, err = run_cli(["inspect", tmp_path / "relu.onnx"], capsys)
    assert_clean_error(code, err, "input_ids")


def test_decoder_without_attention_is_diagnosed(tmp_path, exported_decoder, capsys):
    """Attention ops replaced by something unrecognised: the diagnostic names what is missing."""
    proto = onnx.load(str(exported_decoder))
    for n in proto.graph.node:
        if n.op_type == "Attention":
            n.op_type, n.domain = "MysteryAttention", "com.example"
            del n.attribute[:]
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(proto, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    code, _, err = run_cli(["inspect", tmp_path / "model.onnx"], capsys)
    assert_clean_error(code, err, "found 0 attention ops", "6 KV-cache layers")


def test_output_dir_exists(tmp_path, exported_decoder, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(compile_args(exported_decoder, out), capsys)
    assert_clean_error(code, err, "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------------- configs --
@pytest.mark.parametrize("text, needle", [
    ("passes:\n  - name: no_such_pass\n", "passes[0].name: unknown pass 'no_such_pass'"),
    ("passes:\n  - name: remove_unused\n    bogus: 1\n", "passes[0].bogus: unknown key"),
    ("passes:\n  - name: remove_unused\n    allow_noop: maybe\n", "passes[0].allow_noop:"),
    ("passes: []\nverify:\n  max_perplexity_increase: lots\n", "verify.max_perplexity_increase:"),
    ("passes: []\nextra: 1\n", "extra: unknown key"),
    ("passes: [\n", "invalid YAML"),
])
def test_bad_config(tmp_path, exported_decoder, capsys, text, needle):
    assert needle in config_error(tmp_path, exported_decoder, text, capsys)


def test_pass_that_matches_nothing_fails_by_default(tmp_path, exported_decoder, capsys):
    err = config_error(tmp_path, exported_decoder, "passes:\n  - name: eliminate_identity\n", capsys)
    assert "passes[0] (eliminate_identity) matched nothing" in err and "allow_noop" in err


def test_unknown_backend_and_npu_target(tmp_path, exported_decoder, capsys):
    code, _, err = run_cli(compile_args(exported_decoder, tmp_path / "o") + ["--backend", "xla"], capsys)
    assert_clean_error(code, err, "unknown backend 'xla'")
    code, _, err = run_cli(compile_args(exported_decoder, tmp_path / "o") + ["--target", "npu"], capsys)
    assert_clean_error(code, err, "--target npu")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- artifacts --
@pytest.fixture
def artifact_copy(tmp_path, identity_artifact):
    dst = tmp_path / "a"
    shutil.copytree(identity_artifact, dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _load_error(path, capsys):
    return run_cli(["run", path, "--prompt", "x", "--max-new-tokens", "1"], capsys)


def test_tampered_file(artifact_copy, capsys):
    data = artifact_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, _, err = _load_error(artifact_copy, capsys)
    assert_clean_error(code, err, "model.onnx.data", "sha256 mismatch")


def test_missing_file(artifact_copy, capsys):
    (artifact_copy / "tokenizer.json").unlink()
    code, _, err = _load_error(artifact_copy, capsys)
    assert_clean_error(code, err, "tokenizer.json", "missing")


def test_manifest_path_escaping_dir(artifact_copy, capsys):
    _edit_manifest(artifact_copy, lambda m: m["files"].update({"../../secret": "0" * 64}))
    code, _, err = _load_error(artifact_copy, capsys)
    assert_clean_error(code, err, "leaves the artifact directory")


def test_unsupported_format_version(artifact_copy, capsys):
    _edit_manifest(artifact_copy, lambda m: m.update({"format_version": 99}))
    code, _, err = _load_error(artifact_copy, capsys)
    assert_clean_error(code, err, "unsupported format_version 99")


@pytest.mark.parametrize("kv_cache, needle", [
    ({"layout": "kivi", "bits": "8", "group_size": 64, "residual": 32, "symmetric": True}, "kv_cache.bits: expected int"),
    ({"layout": "float", "policy": {"kind": "sink_window", "sinks": 4, "window": "abc"}},
     "kv_cache.policy.window: expected int"),
    ({"layout": "float", "policy": {"kind": "h2o", "sinks": 4, "recent": 32, "budget": None, "ratio": 7,
                                    "score": "accumulated_attention"}}, "kv_cache.policy: sinks, recent, budget"),
    ({"layout": "float", "policy": {"kind": "lru"}}, "kv_cache.policy.kind: unknown 'lru'"),
    ({"layout": "float", "positions": "absolute", "window": 9}, "kv_cache.window: unknown key"),
    ({"layout": "fp8"}, "kv_cache.layout: unknown 'fp8'"),
    ({"layout": "kivi", "bits": True, "group_size": 64, "residual": 32, "symmetric": True}, "kv_cache.bits: expected int"),
])
def test_edited_manifest_cache_section_is_refused_by_type(artifact_copy, capsys, kv_cache, needle):
    """The runtime reads the kv_cache section through the typed contract (runtime/manifest.py):
    a hand-edited value of the wrong type or range is a one-line error, not a crash."""
    _edit_manifest(artifact_copy, lambda m: m.update({"kv_cache": kv_cache}))
    code, _, err = _load_error(artifact_copy, capsys)
    assert_clean_error(code, err, needle)


def test_not_an_artifact(tmp_path, capsys):
    code, _, err = _load_error(tmp_path, capsys)
    assert_clean_error(code, err, "manifest.json", "missing")


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optc.cli", "compile", str(tmp_path / "x.onnx"), "-o",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_export_bad_hf_dir(tmp_path, capsys):
    code, _, err = run_cli(["export", "--hf", tmp_path / "missing", "-o", tmp_path / "m.onnx"], capsys)
    assert_clean_error(code, err, "no config.json")
    (tmp_path / "bloom").mkdir()
    (tmp_path / "bloom" / "config.json").write_text('{"architectures": ["BloomForCausalLM"]}')
    code, _, err = run_cli(["export", "--hf", tmp_path / "bloom", "-o", tmp_path / "m.onnx"], capsys)
    assert_clean_error(code, err, "BloomForCausalLM", "is not one of")
    # a supported architecture whose config transformers cannot read
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    code, _, err = run_cli(["export", "--hf", tmp_path / "gpt", "-o", tmp_path / "m.onnx"], capsys)
    assert_clean_error(code, err, "gpt", "transformers cannot load it", "model_type")
    assert not (tmp_path / "m.onnx").exists()
