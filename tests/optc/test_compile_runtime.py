"""Walking skeleton: compile -> artifact -> runtime, verification, determinism, generation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli


def test_identity_artifact_reproduces_original(identity_artifact):
    manifest = json.loads((identity_artifact / "manifest.json").read_text())
    v = manifest["verification"]
    assert v["top1_agreement"] == 1.0
    assert v["max_abs_logit_diff"] <= 1e-4
    assert manifest["passes"] == []
    assert manifest["backend"]["name"] == "onnxruntime"
    assert manifest["backend"]["providers"] == ["CPUExecutionProvider"]
    assert set(manifest["files"]) >= {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert manifest["model"]["n_layers"] == 6 and manifest["model"]["kv_heads"] == 2


def test_same_inputs_give_byte_identical_artifact(tmp_path, exported_decoder, identity_artifact):
    from optc.compile import compile_model

    again = tmp_path / "again"
    compile_model(exported_decoder, again, log=lambda *_: None)
    for name in json.loads((identity_artifact / "manifest.json").read_text())["files"] | {"manifest.json": 0}:
        assert (again / name).read_bytes() == (identity_artifact / name).read_bytes(), name


def test_runtime_prefill_decode_match_full_forward(identity_artifact, exported_decoder):
    from optc.canonical import analyze
    from optc.ir import load_model
    from optc.runtime import load
    from optc.verify import ReferenceModel

    m = load(identity_artifact)
    assert m.provider == "CPUExecutionProvider"
    ids = np.array(m.encode("import os\nimport sys\n\n\ndef main(argv):\n    parser = "), np.int64)
    ref = ReferenceModel(exported_decoder, analyze(load_model(exported_decoder))).logits(ids)
    m.reset()
    assert m.kv_bytes == 0
    head = m.prefill(ids[:-4], all_logits=True)
    assert head.shape == (len(ids) - 4, m.config["vocab_size"])
    steps = [m.decode(int(t)) for t in ids[-4:]]
    got = np.concatenate([head, np.stack(steps)])
    assert np.abs(got - ref).max() <= 1e-4
    cfg = m.config
    assert m.kv_bytes == 2 * cfg["n_layers"] * cfg["kv_heads"] * cfg["head_dim"] * 4 * len(ids)


def test_kv_cache_grows_geometrically_without_losing_tokens():
    from optc.runtime.cache import KVCache

    c = KVCache(2, 2, 4, initial_capacity=4)
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((1, 2, n, 4)).astype(np.float32) for n in (3, 1, 1, 6, 1)]
    for ch in chunks:
        c.append([ch, ch + 1], [ch + 2, ch + 3])
    k, v = c.past(1)
    np.testing.assert_array_equal(k, np.concatenate(chunks, axis=2) + 1)
    np.testing.assert_array_equal(v, np.concatenate(chunks, axis=2) + 3)
    assert c.capacity == 16 and c.length == 12


def test_generate_streams_python_and_is_seeded(identity_artifact):
    from optc.runtime import load
    from optc.runtime.sampler import sample

    m = load(identity_artifact)
    prompt = "def parse_args(argv):\n"
    pieces = list(m.generate(prompt, max_new_tokens=40, seed=3, stream=True))
    # streamed: one piece per decoded token (held back only mid-character), none empty
    assert all(pieces) and len(pieces) >= m.last_stats["new_tokens"] // 2 > 0
    text = "".join(pieces)
    assert text == m.generate(prompt, max_new_tokens=40, seed=3)   # same seed, same text
    assert text != m.generate(prompt, max_new_tokens=40, seed=4)   # the seed matters
    # the text is prefill + one decode step per token, sampled with the seeded generator (defaults:
    # temperature 0.8, top-k 40, top-p 0.95), stopped at 40 tokens or the end-of-sequence token
    rng, ids = np.random.default_rng(3), []
    m.reset()
    logits = m.prefill(m.encode(prompt))
    while len(ids) < 40 and (tok := sample(logits, rng, temperature=0.8, top_k=40, top_p=0.95)) != \
            m.config["eos_token_id"]:
        ids.append(tok)
        logits = m.decode(tok)
    assert text == m.tokenizer.decode(ids) and len(ids) == m.last_stats["new_tokens"]


def test_torchscript_export_compiles_and_matches_original_token_for_token(tmp_path, torchscript_decoder, capsys):
    """A decoder exported the optimum way (TorchScript, opset 14) with passes: [] reproduces ONNX
    Runtime on the original graph token for token."""
    from optc.runtime import load
    from optc.verify import ReferenceModel
    from optc.canonical import analyze
    from optc.ir import load_model

    out = tmp_path / "ts-artifact"
    code, stdout, stderr = run_cli(["compile", torchscript_decoder, "-o", out], capsys)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    # every layer's decomposed attention became one Attention op reading the cache directly (GQA:
    # the repeat_kv of keys and values is gone)
    rewrites = manifest["model"]["rewrites"]
    assert rewrites["decomposed_attention_to_Attention"] == 6 and rewrites["repeat_kv_removed"] == 2 * 6, rewrites
    assert manifest["verification"]["top1_agreement"] == 1.0
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4

    m = load(out)
    ref = ReferenceModel(torchscript_decoder, analyze(load_model(torchscript_decoder)))
    ids = m.encode("class Queue:\n    def __init__(self):\n")
    m.reset()
    logits = m.prefill(ids)
    for _ in range(24):  # greedy: the artifact's token must be the original graph's token every step
        tok = int(np.argmax(logits))
        assert tok == int(np.argmax(ref.logits(np.array(ids, np.int64))[-1]))
        ids.append(tok)
        logits = m.decode(tok)


def test_verification_budget_exceeded_fails_and_writes_nothing(tmp_path, exported_decoder, capsys, monkeypatch):
    """The failure path: a report over budget -> exit 1, one line, no artifact, no staging left."""
    import optc.verify

    real = optc.verify.compare

    def degraded(*a, **k):  # stands in for a lossy pass until one lands
        r = real(*a, **k)
        return {**r, "perplexity_increase": 0.5, "top1_agreement": 0.9}

    monkeypatch.setattr(optc.verify, "compare", degraded)
    cfg = tmp_path / "budget.yaml"
    cfg.write_text("passes: []\nverify:\n  max_perplexity_increase: 0.05\n")
    out = tmp_path / "art"
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", out], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "budget exceeded" in err and "+50.00%" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]


def test_dump_ir_and_pass_pipeline(tmp_path, torchscript_decoder, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("passes:\n  - name: eliminate_common_subexpressions\n  - name: remove_unused\n"
                   "    allow_noop: true\nverify:\n  min_top1_agreement: 1.0\n")
    out, dump = tmp_path / "art", tmp_path / "ir"
    code, stdout, err = run_cli(["compile", torchscript_decoder, "-c", cfg, "-o", out, "--dump-ir", dump], capsys)
    assert code == 0, err
    assert sorted(p.name for p in dump.iterdir()) == ["00-canonical.txt", "01-eliminate_common_subexpressions.txt",
                                                      "02-remove_unused.txt"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["eliminate_common_subexpressions", "remove_unused"]
    assert manifest["verification"]["top1_agreement"] == 1.0


def test_run_command_streams_text(identity_artifact, capsys):
    from optc.runtime import load

    code, out, err = run_cli(["run", identity_artifact, "--prompt", "def f(x):\n", "--max-new-tokens", "16"], capsys)
    assert code == 0, err
    # the prompt, then the generation the library gives with the same defaults (seed 0, 16 tokens)
    m = load(identity_artifact)
    assert out == "def f(x):\n" + m.generate("def f(x):\n", max_new_tokens=16)
    assert m.last_stats["new_tokens"] > 0 and "Traceback" not in err


def test_force_replaces_an_existing_artifact_only(tmp_path, exported_decoder, identity_artifact, capsys):
    out = tmp_path / "art"
    shutil.copytree(identity_artifact, out)
    code, _, err = run_cli(["compile", exported_decoder, "-o", out], capsys)
    assert code == 2 and "exists" in err
    (out / "notes.txt").write_text("mine")  # not the artifact's: --force must not delete it
    code, _, err = run_cli(["compile", exported_decoder, "-o", out, "--force"], capsys)
    assert code == 2 and "holds 'notes.txt', which its manifest does not list" in err, err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    code, out_text, err = run_cli(["compile", exported_decoder, "-o", out, "--force"], capsys)
    assert code == 0, err
    # the replaced artifact is the same compile: the id it prints pins it, and equals the first one's
    from optc.runtime import artifact_id, load

    assert artifact_id(out) == artifact_id(identity_artifact) and artifact_id(out) in out_text
    assert load(out, expect=artifact_id(out)).config == load(identity_artifact).config


def test_bench_table_json_and_plot(tmp_path, identity_artifact, exported_decoder, capsys):
    """Smoke-checks the benchmark's outputs (the numbers themselves go to docs/, not asserts)."""
    j, png = tmp_path / "b.json", tmp_path / "b.png"
    code, out, err = run_cli(["bench", identity_artifact, "--original", exported_decoder, "--json", j, "--plot", png,
                              "--prompt-lengths", "16,64", "--decode-tokens", "4"], capsys)
    assert code == 0, err
    report = json.loads(j.read_text())
    assert [r["engine"] for r in report["results"]] == ["artifact (onnxruntime, GQA in place)", "onnxruntime"]
    for r in report["results"]:
        assert set(r["ttft_ms"]) == {"16", "64"} and set(r["decode_ms_per_token"]) == {"128", "2048"}
        # layers, K+V, kv heads, head dim, fp32; tokens: the context, one untimed step, the timed ones
        assert r["kv_bytes"] == 2 * 6 * 2 * 32 * 4 * (128 + 1 + 4)
        assert r["peak_rss_mb"] > 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from optc.bench import format_table

    assert format_table(report) in out  # the table printed is the report written, row for row


@pytest.mark.slow
def test_lossy_passes_declare_a_budget_when_the_config_sets_none(tmp_path, exported_decoder, capsys, monkeypatch):
    cfg = tmp_path / "lossy.yaml"
    cfg.write_text("passes:\n  - name: kv_cache_compression\n    bits: 8\n"
                   "  - name: sparse_attention\n    mode: sink_window\n    key_quant: per_token\n")
    # (the stray key above must be refused: key_quant belongs to kv_cache_compression)
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "x"], capsys)
    assert code == 2 and "passes[1].key_quant: unknown key" in err, err

    cfg.write_text("passes:\n  - name: kv_cache_compression\n    bits: 8\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "a"], capsys)
    assert code == 0, err
    budget = json.loads((tmp_path / "a" / "manifest.json").read_text())["verify_budget"]
    assert budget["max_perplexity_increase"] == 0.01 and budget["source"] == "declared by passes"

    import optc.verify

    real = optc.verify.compare
    monkeypatch.setattr(optc.verify, "compare", lambda *a, **k: {**real(*a, **k), "perplexity_increase": 0.02})
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "b"], capsys)
    assert code == 1 and "perplexity increase +2.00% > budget +1.00%" in err, err
    assert not (tmp_path / "b").exists()


def test_running_past_the_trained_context_warns_once_per_sequence(identity_artifact, capsys):
    """pycoder-5m was trained on 512 positions: a longer sequence runs (benchmarks go there on
    purpose) but says so, once per sequence, as one line in the CLI."""
    import warnings

    from conftest import run_cli
    from optc.errors import PastContextWarning
    from optc.runtime import load

    m = load(identity_artifact)
    ids = m.encode("x = 1\n" * 200)
    assert len(ids) > 512
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.prefill(ids[:512])
        assert not caught
        m.prefill(ids[512:514])
        m.decode(5)
        m.reset()
        m.prefill(ids)
    past = [w for w in caught if issubclass(w.category, PastContextWarning)]
    assert [str(w.message).split(":")[0] for w in past] == [
        "position 513 is past the model's trained context (512 tokens)",
        f"position {len(ids) - 1} is past the model's trained context (512 tokens)"]
    code, out, err = run_cli(["run", identity_artifact, "--prompt", "x = 1\n" * 200, "--max-new-tokens", "1"], capsys)
    assert code == 0, err
    warned = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith("warning: position ") and "sink_window" in warned[0], err
    assert "Traceback" not in err and "PastContextWarning" not in err
