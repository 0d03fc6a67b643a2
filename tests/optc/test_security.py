"""Reliability and security regressions: what --force may delete, artifact trust (ids, links,
staging directories), crash leftovers. Each case is checked before any work and loses nothing."""

from __future__ import annotations

import json
import os
import re
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


def test_an_empty_output_directory_is_written_into_and_a_folder_without_manifest_is_named_so(tmp_path):
    """`mkdir out` before compiling loses nothing, so it needs no --force; a non-empty folder
    without a manifest is refused by --force with that reason in plain words."""
    from optc.artifact import check_output_dir, publish
    from optc.errors import OptcError

    out = tmp_path / "out"
    out.mkdir()
    check_output_dir(out, force=False)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "manifest.json").write_text("{}")
    publish(staging, out, force=False)
    assert (out / "manifest.json").is_file() and not staging.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    with pytest.raises(OptcError, match=re.escape("is not an optc artifact (it has no manifest.json)")):
        check_output_dir(mine, force=True)
    assert (mine / "a.txt").read_text() == "x"


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


# ------------------------------------------------ token-id bounds from the compiled tables --
def _edited_copy(tmp_path, artifact, edit):
    copy = tmp_path / "a"
    shutil.copytree(artifact, copy)
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    return copy


def test_an_edited_vocab_size_cannot_widen_the_token_bound(tmp_path, identity_artifact, capsys):
    """An unpinned manifest is not digest-protected: a raised vocab_size must not let an id past
    the real embedding table (on a TVM library that read is out of bounds). The bound is the
    compiled graph's own table; a manifest that disagrees is refused before anything runs."""
    from optc.runtime import ArtifactError, load

    assert load(identity_artifact).vocab_size == 4096
    copy = _edited_copy(tmp_path, identity_artifact, lambda m: m["model"].update(vocab_size=100_000_001))
    with pytest.raises(ArtifactError, match="model.vocab_size 100000001 does not match the compiled embedding "
                                            "table's 4096 rows"):
        load(copy)
    code, _, err = run_cli(["run", copy, "--prompt", "x", "--max-new-tokens", "1"], capsys)
    _refused(code, err, "does not match the compiled embedding table's 4096 rows")


def test_the_manifest_names_the_embedding_table_and_the_graph_decides_the_bound(identity_artifact, model):
    from optc.runtime.onnx_graph import embedding_rows

    manifest = json.loads((identity_artifact / "manifest.json").read_text())
    assert manifest["model"]["embedding"]  # what a TVM artifact's parameters are looked up by
    assert embedding_rows((identity_artifact / "model.onnx").read_bytes()) == 4096
    model.reset()
    model.prefill([4095])
    model.reset()
    with pytest.raises(ValueError, match=r"token id 4096 is outside the vocabulary \(0..4095\)"):
        model.prefill([4096])


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["model"].update(n_layers="6"), "model.n_layers: expected int, got str"),
    (lambda m: m["model"].update(vocab_size=-1), "model.vocab_size: 1..2147483647, got -1"),
    (lambda m: m["model"].update(head_dim=10**12), "model.head_dim: 1..2147483647"),
    (lambda m: m["model"].update(num_heads=7), "num_heads (7) is not a multiple of kv_heads"),
    (lambda m: m["model"].update(bos_token_id=10**6), "model.bos_token_id: 1000000 is outside the vocabulary"),
    (lambda m: m["model"].update(context=True), "model.context: expected int, got bool"),
    (lambda m: m["model"].update(rewrites=[]), "model.rewrites: expected dict"),
    (lambda m: m["model"].update(shell="rm -rf"), "model.shell: unknown key"),
    (lambda m: m.update(model=[1, 2]), "model: expected an object, got list"),
    # consistent with itself, not with the compiled graph: refused before a step runs
    (lambda m: m["model"].update(kv_heads=1), "has 1 on axis 1, the compiled graph 2"),
    (lambda m: m["model"].update(head_dim=64), "has 64 on axis 3, the compiled graph 32"),
    (lambda m: m["model"].update(n_layers=7), "backend.kv_outputs: 6 layers, the model has 7"),
    (lambda m: m["backend"].update(providers="CPUExecutionProvider"), "backend.providers: expected list"),
    (lambda m: m["backend"].update(kv_outputs=[["a"]] * 6), "backend.kv_outputs[0]: expected [key output"),
    (lambda m: m["backend"]["kv_outputs"].__setitem__(0, ["logits", "nope"]), "output 'nope' is not an output"),
    (lambda m: m["backend"].update(graph=7), "backend.graph: expected str, got int"),
    (lambda m: m["backend"].update(plugin="evil.so"), "backend.plugin: unknown key"),
    (lambda m: m.update(backend="onnxruntime"), "unknown backend None"),
    (lambda m: m.update(tokenizer=["tokenizer.json"]), "tokenizer: expected the tokenizer file's name"),
])
def test_edited_model_and_backend_sections_are_refused(tmp_path, identity_artifact, capsys, edit, needle):
    copy = _edited_copy(tmp_path, identity_artifact, edit)
    code, _, err = run_cli(["run", copy, "--prompt", "x", "--max-new-tokens", "1"], capsys)
    _refused(code, err, needle)


TVM_SECTION = {
    "name": "tvm", "library": "model.so", "params": "params.safetensors", "device": "cpu",
    "target": {"kind": "llvm"}, "target_kind": "llvm", "sparse_prefill_min_tokens": None,
    "segments": [{"name": "cache", "inputs": {"past_key_values.0.key": 1, "past_key_values.0.value": 1},
                  "granularity": 1}],
    "buckets": [{"name": "prefill_32", "tokens": 32, "segments": [0], "inputs": ["input_ids"], "params": ["w"]},
                {"name": "decode_64", "tokens": 1, "segments": [64], "inputs": ["input_ids"], "params": ["w"]}],
    "kv_outputs": [["optc.new.0.key", "optc.new.0.value"]], "attention_outputs": [],
}


@pytest.mark.parametrize("path, value, needle", [
    (("buckets", 0, "tokens"), 0, "buckets[0].tokens: 1..2147483647, got 0"),
    (("buckets", 0, "tokens"), "32", "buckets[0].tokens: expected int, got str"),
    (("buckets", 1, "segments"), [64, 64], "buckets[1].segments: 1 capacities"),
    (("buckets", 1, "segments"), [-1], "buckets[1].segments: 1 capacities"),
    (("buckets", 0, "branch"), "both", "buckets[0].branch: 'dense' or 'sparse'"),
    (("buckets", 0, "branch"), "sparse", "sparse_prefill_min_tokens: needed by the 'sparse' buckets"),
    (("buckets", 0, "params"), "w", "buckets[0].params: expected list"),
    (("buckets", 0, "extra"), 1, "buckets[0].extra: unknown key"),
    (("buckets",), [], "buckets: no compiled shape"),
    (("segments", 0, "inputs", "past_key_values.0.key"), 0, "segments[0].inputs.past_key_values.0.key: expected a"),
    (("device",), "tpu", "backend.device: 'cpu' or 'cuda', got 'tpu'"),
    (("library",), None, "backend.library: expected str, got NoneType"),
    (("loader",), "ctypes", "backend.loader: unknown key"),
])
def test_tvm_backend_section_is_type_checked_before_the_library_loads(path, value, needle):
    """The TVM section (buckets included) is checked by the contract alone: no TVM needed, and
    nothing of the artifact, the native library least of all, is touched before it passes."""
    import copy as _copy

    from optc.runtime.manifest import ManifestError, TvmBackend

    TvmBackend.from_dict(TVM_SECTION, n_layers=1)
    section = _copy.deepcopy(TVM_SECTION)
    target = section
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ManifestError, match=re.escape(needle)):
        TvmBackend.from_dict(section, n_layers=1)


def test_tvm_cuda_backend_section_as_the_backend_writes_it_is_accepted():
    """The CUDA build adds `cuda`, `schedules` and `bool_loops_kept_scalar` (backends/tvm/pipeline.py);
    the contract must know them, or every GPU artifact is refused at load (CI caught exactly that)."""
    from optc.runtime.manifest import ManifestError, TvmBackend

    section = {**TVM_SECTION, "device": "cuda", "target": {"kind": "cuda", "arch": "sm_90"}, "target_kind": "cuda",
               "cuda": {"arch": "sm_90"}, "schedules": "dlight (TVM's default GPU schedules)",
               "bool_loops_kept_scalar": 3}
    assert TvmBackend.from_dict(section, n_layers=1).device == "cuda"
    with pytest.raises(ManifestError, match=re.escape("bool_loops_kept_scalar: expected int, got str")):
        TvmBackend.from_dict({**section, "bool_loops_kept_scalar": "3"}, n_layers=1)


# ------------------------------------------------------------- absurd input-graph shapes --
def _with_input_dim(tmp_path, exported_decoder, name, axis, value):
    import onnx

    proto = onnx.load(str(exported_decoder), load_external_data=False)
    dim = next(i for i in proto.graph.input if i.name == name).type.tensor_type.shape.dim[axis]
    dim.Clear()
    dim.dim_value = value
    for f in exported_decoder.parent.iterdir():
        if f.name != exported_decoder.name:
            shutil.copy(f, tmp_path / f.name)
    onnx.save(proto, str(tmp_path / exported_decoder.name))
    return tmp_path / exported_decoder.name


@pytest.mark.parametrize("name, axis, value, needle", [
    ("input_ids", 1, 10**12, "input 'input_ids' axis 1 has dimension 1,000,000,000,000 (a static dimension "
                             "must be 0..2,147,483,647)"),
    ("input_ids", 0, -5, "input 'input_ids' axis 0 has dimension -5"),
    ("past_key_values.0.key", 3, -1, "input 'past_key_values.0.key' axis 3 has dimension -1"),
    ("past_key_values.0.value", 1, 2**63 - 1, "axis 1 has dimension 9,223,372,036,854,775,807"),
    ("input_ids", 1, 10**9, "input 'input_ids' has a fixed sequence length of 1,000,000,000"),
    ("attention_mask", 0, 3, "input 'attention_mask' has a fixed batch of 3"),
])
def test_absurd_input_graph_dimensions_are_refused(tmp_path, exported_decoder, capsys, name, axis, value, needle):
    model = _with_input_dim(tmp_path, exported_decoder, name, axis, value)
    code, _, err = run_cli(["compile", model, "-o", tmp_path / "art"], capsys)
    _refused(code, err, needle)
    assert not (tmp_path / "art").exists()


# ------------------------------------- external data and listed files that leave their folder --
@pytest.mark.parametrize("kind", ["dotdot", "inner_dotdot", "absolute", "symlink_file", "symlink_dir"])
def test_external_data_locations_that_leave_the_model_folder_are_refused(tmp_path, exported_decoder, capsys, kind):
    """CVE-2022-25882 (`../`), CVE-2024-27318 (`a/../../`, the bypass of its first fix) and
    CVE-2026-27489 (a symbolic link, of the file or of a folder on the way): the resolved
    location must lie inside the model's folder, whatever the spelling."""
    import onnx

    model_dir, outside = tmp_path / "m", tmp_path / "outside"
    model_dir.mkdir()
    outside.mkdir()
    data = exported_decoder.parent / (exported_decoder.name + ".data")
    shutil.copy(data, outside / data.name)  # real weights: only the location is wrong
    location = {"dotdot": f"../outside/{data.name}", "inner_dotdot": f"sub/../../outside/{data.name}",
                "absolute": str(outside / data.name), "symlink_file": "link.data",
                "symlink_dir": f"sub/{data.name}"}[kind]
    if kind == "symlink_file":
        (model_dir / "link.data").symlink_to(outside / data.name)
    if kind == "symlink_dir":
        (model_dir / "sub").symlink_to(outside, target_is_directory=True)
    proto = onnx.load(str(exported_decoder), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(model_dir / exported_decoder.name))
    shutil.copy(exported_decoder.parent / "tokenizer.json", model_dir)
    code, _, err = run_cli(["compile", model_dir / exported_decoder.name, "-o", tmp_path / "art"], capsys)
    _refused(code, err, "outside the model directory")
    assert not (tmp_path / "art").exists()


def test_a_listed_artifact_file_that_links_outside_is_refused(tmp_path, identity_artifact, capsys):
    """CVE-2026-27489's class in the artifact: a listed file replaced by a symbolic link to an
    identical file elsewhere (its digest still matches) is refused: it leaves the artifact."""
    art = tmp_path / "a"
    shutil.copytree(identity_artifact, art)
    elsewhere = tmp_path / "tokenizer.json"
    (art / "tokenizer.json").rename(elsewhere)
    (art / "tokenizer.json").symlink_to(elsewhere)
    code, _, err = run_cli(["run", art, "--prompt", "x", "--max-new-tokens", "1"], capsys)
    _refused(code, err, "path 'tokenizer.json' leaves the artifact directory")


@pytest.mark.parametrize("name, needle", [
    ("a\x00b", "path 'a\\x00b' is not a file name"),
    ("a" * 5000, "File name too long"),
    ("/".join(["a" * 300] * 3), "File name too long"),
])
def test_listed_names_the_file_system_cannot_take_are_refused(tmp_path, identity_artifact, capsys, name, needle):
    """Found probing the manifest loader by hand: a NUL byte (ValueError) or a name past the
    file system's limits (OSError) in `files` crashed the load (exit 3)."""
    copy = _edited_copy(tmp_path, identity_artifact, lambda m: m["files"].update({name: "0" * 64}))
    code, _, err = run_cli(["run", copy, "--prompt", "x", "--max-new-tokens", "1"], capsys)
    _refused(code, err, needle)
    assert len(err) < 300, err


def _gather_graph(table_via: str | None) -> bytes:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(np.zeros((37, 4), np.int8 if table_via else np.float32), "E")]
    table = "E"
    if table_via == "DequantizeLinear":
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "scale"))
        nodes.append(helper.make_node("DequantizeLinear", ["E", "scale"], ["E_f"]))
        table = "E_f"
    elif table_via == "Cast":
        nodes.append(helper.make_node("Cast", ["E"], ["E_f"], to=TensorProto.FLOAT))
        table = "E_f"
    ids = "input_ids" if table_via != "other_input" else "other"
    nodes.append(helper.make_node("Gather", [table, ids], ["h"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(ids, TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g).SerializeToString()


@pytest.mark.parametrize("via, rows", [(None, 37), ("DequantizeLinear", 37), ("Cast", 37), ("other_input", None)])
def test_embedding_rows_are_read_from_the_graph_bytes(via, rows):
    from optc.runtime.onnx_graph import embedding_rows

    assert embedding_rows(_gather_graph(via)) == rows


@pytest.mark.parametrize("data", [b"", b"\xff" * 20, b"\x3a\x05abc", _gather_graph(None)[:40]])
def test_embedding_rows_of_broken_bytes_is_none_or_a_wire_error(data):
    from optc.runtime.onnx_graph import WireError, embedding_rows

    try:
        assert embedding_rows(data) is None
    except WireError:
        pass
