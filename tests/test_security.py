"""Reliability and security regressions: what --force may delete, artifact trust (ids, links,
staging directories), crash leftovers. Each case is checked before any work and loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from conftest import run_cli


def _refused(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


# ------------------------------------------------------------------- --force and the output --
def test_force_never_deletes_a_folder_of_user_files(tmp_path, exported_decoder, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(["compile", exported_decoder, "-o", out, "--force"], capsys)
    _refused(code, err, "--force replaces only an optc artifact", "nothing was deleted")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_force_never_replaces_the_input_models_folder_or_a_parent(tmp_path, exported_decoder, capsys):
    project = tmp_path / "project"
    model_dir = project / "model"
    model_dir.mkdir(parents=True)
    for f in exported_decoder.parent.iterdir():
        shutil.copy(f, model_dir / f.name)
    (model_dir / "notes.md").write_text("keep")
    model = model_dir / exported_decoder.name
    for out in (model_dir, project, tmp_path):
        code, _, err = run_cli(["compile", model, "-o", out, "--force"], capsys)
        _refused(code, err, "contains the input model")
    assert (model_dir / "notes.md").read_text() == "keep" and model.is_file()


def test_output_is_never_the_current_directory_or_holds_the_config(tmp_path, exported_decoder, capsys,
                                                                   monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    cfg = work / "c.yaml"
    cfg.write_text("passes: []\n")
    monkeypatch.chdir(work)
    code, _, err = run_cli(["compile", exported_decoder, "-o", ".", "--force"], capsys)
    _refused(code, err, "the current directory")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "elsewhere" / "..", "--force"],
                           capsys)
    _refused(code, err, "contains")
    assert cfg.read_text() == "passes: []\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_refused_before_any_work(tmp_path, exported_decoder, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(["compile", exported_decoder, "-o", ro / "art"], capsys)
        _refused(code, err, "cannot write into")
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- artifact trust --
def test_artifact_id_pins_what_is_loaded(tmp_path, identity_artifact):
    from optc.runtime import ArtifactError, artifact_id, load

    art_id = artifact_id(identity_artifact)
    assert art_id.startswith("sha256:") and len(art_id) == 7 + 64
    load(identity_artifact, expect=art_id)
    copy = tmp_path / "a"
    shutil.copytree(identity_artifact, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["model"]["vocab_size"] += 1  # any edit of the manifest (and so of any file's digest) changes the id
    (copy / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    with pytest.raises(ArtifactError, match="is not the expected"):
        load(copy, expect=art_id)
    with pytest.raises(ValueError, match="an artifact id"):
        load(identity_artifact, expect="deadbeef")


def test_manifest_that_is_a_link_is_refused(tmp_path, identity_artifact, capsys):
    copy = tmp_path / "a"
    shutil.copytree(identity_artifact, copy)
    outside = tmp_path / "elsewhere.json"
    (copy / "manifest.json").rename(outside)
    (copy / "manifest.json").symlink_to(outside)
    code, _, err = run_cli(["run", copy, "--prompt", "x", "--max-new-tokens", "1"], capsys)
    _refused(code, err, "manifest.json: is a symbolic link")


def test_a_staging_directory_is_never_loadable(tmp_path, identity_artifact, capsys):
    from optc.artifact import write_manifest

    copy = tmp_path / ".art.optc-staging-1-x"
    shutil.copytree(identity_artifact, copy)
    m = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {k: v for k, v in m.items() if k not in ("files", "format_version")}, staging=True)
    code, _, err = run_cli(["run", copy, "--prompt", "x", "--max-new-tokens", "1"], capsys)
    _refused(code, err, "an unfinished compile's staging directory")


def test_stale_staging_of_a_killed_compile_is_cleaned_and_permissions_are_ordinary(tmp_path, exported_decoder):
    from optc.compile import compile_model

    out = tmp_path / "art"
    dead = tmp_path / ".art.optc-staging-999999999-abc"   # no such process
    dead.mkdir()
    (dead / "model.onnx").write_text("half written")
    alive = tmp_path / f".art.optc-staging-{os.getpid()}-xyz"  # a compile still running: kept
    alive.mkdir()
    compile_model(exported_decoder, out, verify=False, log=lambda *_: None)
    assert not dead.exists() and alive.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# ------------------------------------------------------------------------- the Python API --
@pytest.fixture(scope="module")
def model(identity_artifact):
    from optc.runtime import load

    return load(identity_artifact)


@pytest.mark.parametrize("ids, exc, needle", [
    ([1.7, 2.0], TypeError, "token ids must be integers"),
    (["12", "13"], TypeError, "token ids must be integers"),
    ("12 13", TypeError, "got a string"),
    ([True, False], TypeError, "token ids must be integers"),
    ([[1, 2], [3, 4]], ValueError, "one-dimensional"),
    ([], ValueError, "at least one token"),
    ([1, 10**9], ValueError, "outside the vocabulary"),
    ([-1], ValueError, "outside the vocabulary"),
])
def test_prefill_refuses_ids_it_would_have_coerced(model, ids, exc, needle):
    model.reset()
    with pytest.raises(exc, match=needle):
        model.prefill(ids)


def test_decode_needs_a_prefill_and_an_integer(model):
    model.reset()
    with pytest.raises(ValueError, match=r"decode\(\) before prefill"):
        model.decode(5)
    model.prefill([0, 5, 6])
    for bad in (1.7, "12", True, None):
        with pytest.raises(TypeError, match="a token id must be an integer"):
            model.decode(bad)
    model.decode(7)


@pytest.mark.parametrize("kw, exc, needle", [
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens: must be >= 0"),
    ({"top_k": -1}, ValueError, "top_k: must be >= 0"),
    ({"top_p": 0.0}, ValueError, "top_p: in"),
    ({"top_p": float("nan")}, ValueError, "top_p: in"),
    ({"temperature": float("nan")}, ValueError, "temperature: a finite number"),
    ({"temperature": -1}, ValueError, "temperature"),
    ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens: expected an integer"),
])
def test_generate_refuses_nonsense_sampling_options(model, kw, exc, needle):
    with pytest.raises(exc, match=needle):
        model.generate("def f(", **kw)


def test_cli_run_with_nan_temperature_is_a_clean_error(identity_artifact, capsys):
    code, _, err = run_cli(["run", identity_artifact, "--prompt", "x", "--temperature", "nan"], capsys)
    _refused(code, err, "temperature: a finite number")


# ------------------------------------------------------------------------ the input model --
@pytest.mark.parametrize("edit, needle", [
    (lambda e: e.__setitem__("offset", "abc"), "external-data offset 'abc' is not a non-negative integer"),
    (lambda e: e.__setitem__("basepath", "/etc"), "unknown external-data key 'basepath'"),
    (lambda e: e.__setitem__("__class__", "x"), "unknown external-data key '__class__'"),
])
def test_external_data_entries_beyond_the_spec_are_refused(tmp_path, exported_decoder, capsys, edit, needle):
    import onnx

    proto = onnx.load(str(exported_decoder), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e.value for e in t.external_data}
    edit(entries)
    del t.external_data[:]
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)
    for f in exported_decoder.parent.iterdir():
        if f.name != exported_decoder.name:
            shutil.copy(f, tmp_path / f.name)
    onnx.save(proto, str(tmp_path / exported_decoder.name))
    code, _, err = run_cli(["compile", tmp_path / exported_decoder.name, "-o", tmp_path / "art"], capsys)
    _refused(code, err, needle)
    assert not (tmp_path / "art").exists()


def test_duplicate_external_data_location_is_refused(tmp_path, exported_decoder, capsys):
    """CVE-2026-34445 style: a second `location` entry that a loader might honour instead."""
    import onnx

    proto = onnx.load(str(exported_decoder), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    t.external_data.insert(0, onnx.StringStringEntryProto(key="location", value="../../../etc/passwd"))
    for f in exported_decoder.parent.iterdir():
        if f.name != exported_decoder.name:
            shutil.copy(f, tmp_path / f.name)
    onnx.save(proto, str(tmp_path / exported_decoder.name))
    code, _, err = run_cli(["compile", tmp_path / exported_decoder.name, "-o", tmp_path / "art"], capsys)
    _refused(code, err, "external-data key 'location' given twice")


# --------------------------------------------------------------- configs that claim nonsense --
@pytest.mark.parametrize("text, needle", [
    ("passes:\n  - name: sink_window\n    window: 1000000000000\n",
     "passes[0].window: sinks + window (1000000000004) exceeds the model's trained context (512)"),
    ("passes:\n  - name: kv_quantize\n    bits: 8\n    group_size: 1000000000000\n",
     "passes[0].residual: residual + group_size (1000000000032) exceeds the model's trained context (512)"),
    ("passes:\n  - name: kv_quantize\n    bits: 8\n    residual: 100000000000000000000000\n",
     "exceeds the model's trained context (512): nothing would ever be stored quantised"),
    ("passes:\n  - name: h2o_eviction\n    budget: 4096\n", "passes[0].budget: budget (4096) is not below"),
    ("passes:\n  - name: kv_quantize\n    bits: 8.0\n", "passes[0].bits: Value error, expected an integer, got 8.0"),
    ("passes:\n  - name: h2o_eviction\n    ratio: .inf\n", "passes[0].ratio: Input should be a finite number"),
    ("passes: []\nverify:\n  max_perplexity_increase: .nan\n", "verify.max_perplexity_increase: Input should be a finite"),
    ("passes:\n  - name: remove_unused\n    allow_noop: true\n    allow_noop: false\n", "duplicate key 'allow_noop'"),
    ("passes: []\npasses: []\n", "duplicate key 'passes'"),
    ("passes: " + "[" * 100000 + "]" * 100000 + "\n", "invalid YAML"),
])
def test_configs_that_claim_what_they_cannot_deliver_are_refused(tmp_path, exported_decoder, capsys, text, needle):
    from conftest import config_error

    err = config_error(tmp_path, exported_decoder, text, capsys)
    assert needle in err, err


def test_non_utf8_config_and_eval_text_are_clean_errors(tmp_path, exported_decoder, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"passes: []\n# \xff\xfe\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "a"], capsys)
    _refused(code, err, "not UTF-8 text")
    txt = tmp_path / "eval.txt"
    txt.write_bytes(b"def f():\n    return '\xff'\n")
    code, _, err = run_cli(["compile", exported_decoder, "--eval-text", txt, "-o", tmp_path / "b"], capsys)
    _refused(code, err, "eval.txt: not UTF-8 text")


def test_malformed_tokenizer_is_refused(tmp_path, exported_decoder, capsys):
    tok = tmp_path / "tok.json"
    tok.write_text('{"version": "1.0", "model": 42}')
    code, _, err = run_cli(["compile", exported_decoder, "--tokenizer", tok, "-o", tmp_path / "a"], capsys)
    _refused(code, err, "tok.json: not a tokenizers JSON file")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("so, needle", [
    ({"intra_op_num_threads": "two"}, "intra_op_num_threads: an integer thread count"),
    ({"inter_op_num_threads": True}, "inter_op_num_threads: an integer thread count"),
    ({"graph_optimization_level": "FAST"}, "graph_optimization_level: one of"),
    ({"log_file": "/tmp/x"}, "session_options.log_file: unknown key"),
])
def test_edited_session_options_are_refused_by_type(tmp_path, identity_artifact, capsys, so, needle):
    copy = tmp_path / "a"
    shutil.copytree(identity_artifact, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["backend"]["session_options"].update(so)
    (copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", copy, "--prompt", "x", "--max-new-tokens", "1"], capsys)
    _refused(code, err, needle)


# ----------------------------------------------------------------------------------- signing --
def test_signed_artifact_loads_only_with_a_trusted_key(tmp_path, identity_artifact, capsys):
    from optc.runtime import ArtifactError, load

    art = tmp_path / "a"
    shutil.copytree(identity_artifact, art)
    for key in ("release.key", "other.key"):
        code, _, err = run_cli(["keygen", tmp_path / key], capsys)
        assert code == 0, err
    assert stat.S_IMODE((tmp_path / "release.key").stat().st_mode) == 0o600
    with pytest.raises(ArtifactError, match="manifest.sig: missing"):
        load(art, trusted_keys=[tmp_path / "release.key.pub"])
    code, out, err = run_cli(["sign", art, "--key", tmp_path / "release.key"], capsys)
    assert code == 0, err
    load(art, trusted_keys=[tmp_path / "release.key.pub"])                    # a key file
    load(art, trusted_keys=[(tmp_path / "release.key.pub").read_text()])      # PEM text
    with pytest.raises(ArtifactError, match="not a trusted key"):
        load(art, trusted_keys=[tmp_path / "other.key.pub"])
    # a re-hashed manifest (an attacker who swapped a file and wrote its new digest) fails
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["tokenizer.json"] = "0" * 64
    (art / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    code, _, err = run_cli(["run", art, "--prompt", "x", "--max-new-tokens", "1",
                            "--trusted-key", tmp_path / "release.key.pub"], capsys)
    _refused(code, err, "the signature does not match manifest.json")


def test_force_may_replace_a_signed_artifact(tmp_path, exported_decoder, identity_artifact, capsys):
    art = tmp_path / "a"
    shutil.copytree(identity_artifact, art)
    run_cli(["keygen", tmp_path / "k"], capsys)
    run_cli(["sign", art, "--key", tmp_path / "k"], capsys)
    code, _, err = run_cli(["compile", exported_decoder, "-o", art, "--force"], capsys)
    assert code == 0, err
    assert not (art / "manifest.sig").exists()  # a new artifact is unsigned until signed again
