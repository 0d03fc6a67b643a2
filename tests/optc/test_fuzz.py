"""Property-based fuzzing (hypothesis) of what a user or an edited file hands optc: the pass
configuration loader, the artifact manifest loader and the runtime's token input.

The property each time: a clean result, or optc's own error (OptcError; for the Python API also
its TypeError/ValueError subclasses), never another exception. A bounded, derandomized run is in
every tier (a few hundred examples, seconds); `OPTC_FUZZ_LONG=1` adds the long run of the same
properties (marker `fuzz`, `make test-fuzz`). A case the fuzzer found is kept below as an explicit
regression test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT

LONG = os.environ.get("OPTC_FUZZ_LONG") == "1"
# examples run per property and outcome; written as JSON to $OPTC_FUZZ_TALLY when set
# (scripts/security_counts.py reads it for docs/security.md)
TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _write_tally():
    yield
    if os.environ.get("OPTC_FUZZ_TALLY"):
        Path(os.environ["OPTC_FUZZ_TALLY"]).write_text(json.dumps({f"{p}/{o}": n for (p, o), n in TALLY.items()}))


def bounded(n):
    """The default tier's run: deterministic (derandomized, no example database), n examples."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def long(n):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------ strategies --
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 3),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


# ------------------------------------------------------------------- (a) the config loader --
def _registry():
    from optc.registry import default_registry

    return default_registry()


PASS_NAMES = sorted(_registry().names())
OPTION_KEYS = sorted({k for name in PASS_NAMES for k in _registry().get(name).options_model.model_fields}
                     | {"name", "bogus", "eviction", "mode"})


@st.composite
def config_documents(draw):
    """YAML-able documents shaped like pass configs: real pass names and option keys with
    values of any type, and the odd top-level key or non-mapping."""
    options = st.dictionaries(st.sampled_from(OPTION_KEYS), json_values, max_size=3)
    named = st.builds(lambda name, opts: {"name": name, **opts}, st.sampled_from(PASS_NAMES), options)
    passes = draw(st.lists(named | options | json_values, max_size=4))
    doc = {"passes": passes}
    if draw(st.booleans()):
        doc["verify"] = draw(st.dictionaries(st.sampled_from(["max_perplexity_increase", "min_top1_agreement",
                                                              "max_abs_logit_diff", "other"]), json_values,
                                             max_size=3) | json_values)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=6))] = draw(json_values)
    return draw(st.sampled_from([doc, doc, doc, passes, doc.get("verify")]))


def _yaml_texts():
    import yaml

    from_docs = config_documents().map(lambda d: yaml.safe_dump(d, sort_keys=False, allow_unicode=True))
    real = [p.read_text() for p in sorted((ROOT / "configs").glob("*.yaml"))]
    mutated = st.builds(lambda text, i, junk: text[:i] + junk + text[i + len(junk):], st.sampled_from(real),
                        st.integers(0, 400), st.text(max_size=6))
    return st.one_of(from_docs, mutated, st.text(max_size=80))


_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="optc-fuzz-config-"))


def check_config_text(text: str) -> None:
    from optc.config import PipelineConfig, load_config
    from optc.errors import OptcError

    path = _CONFIG_DIR / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    registry = _registry()
    try:
        config = load_config(path, registry)
    except OptcError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))  # one line, saying what and where
        TALLY["config", "refused"] += 1
        return
    TALLY["config", "accepted"] += 1
    assert isinstance(config, PipelineConfig)
    # what is accepted prints back as a config that loads to the same thing (optc config show)
    path.write_text(config.to_yaml())
    assert load_config(path, registry) == config


@bounded(200)
@given(_yaml_texts())
def test_fuzz_config_loader(text):
    check_config_text(text)


@pytest.mark.fuzz
@pytest.mark.skipif(not LONG, reason="long fuzzing run: OPTC_FUZZ_LONG=1")
@long(20_000)
@given(_yaml_texts())
def test_fuzz_config_loader_long(text):
    check_config_text(text)


# ------------------------------------------------------------------ (b) the manifest loader --
@pytest.fixture(scope="module")
def artifact_copy(identity_artifact, tmp_path_factory):
    """One copy whose manifest each example rewrites (the other files stay as compiled)."""
    copy = tmp_path_factory.mktemp("fuzz") / "a"
    shutil.copytree(identity_artifact, copy)
    return copy, json.loads((identity_artifact / "manifest.json").read_text())


def _paths(value, prefix=()):
    """Every key path into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, prefix + (i,))


# the sections the runtime reads; the rest (passes, verification, ...) it only carries
READ = ("format_version", "model", "backend", "kv_cache", "tokenizer", "files")


@st.composite
def manifest_edits(draw, original):
    """The real manifest with one to three edits: a value replaced by any JSON value, a key
    removed, or an unknown key added; or, now and then, a random JSON document."""
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values | st.dictionaries(st.sampled_from(READ + ("optc_staging",)), json_values))
    m = json.loads(json.dumps(original))
    paths = [p for p in _paths(m) if p and p[0] in READ]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = m
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(json_values | st.integers(-2**63, 2**64) | st.just(10**12))
            elif action == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif isinstance(parent, dict):
                # (names past the file system's limits too: a listed file may be named anything)
                key = draw(st.text(min_size=1, max_size=8) | st.text(alphabet="a/\x00", min_size=250, max_size=600))
                parent[key] = draw(json_values)
        except (KeyError, IndexError, TypeError):  # an earlier edit changed this path's shape
            pass
    return m


def check_manifest(artifact_copy, manifest) -> None:
    from optc.errors import OptcError
    from optc.runtime import ArtifactError, load

    root, _ = artifact_copy
    (root / "manifest.json").write_text(json.dumps(manifest))
    try:
        model = load(root)
    except ArtifactError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        TALLY["manifest", "refused"] += 1
        return
    TALLY["manifest", "accepted"] += 1
    # whatever was accepted still bounds token ids by the compiled table
    assert model.vocab_size == 4096
    try:
        model.prefill([4096])
    except OptcError:
        pass
    else:
        raise AssertionError("an id past the compiled table reached the graph")
    model.reset()
    model.prefill([1, 2, 3])


def _manifest_examples(n, style):
    def decorate(fn):
        @style(n)
        @given(data=st.data())
        def test(artifact_copy, data):
            fn(artifact_copy, data.draw(manifest_edits(artifact_copy[1])))
        test.__name__ = fn.__name__
        return test
    return decorate


@_manifest_examples(80, bounded)
def test_fuzz_manifest_loader(artifact_copy, manifest):
    check_manifest(artifact_copy, manifest)


@pytest.mark.fuzz
@pytest.mark.skipif(not LONG, reason="long fuzzing run: OPTC_FUZZ_LONG=1")
@_manifest_examples(2_000, long)
def test_fuzz_manifest_loader_long(artifact_copy, manifest):
    check_manifest(artifact_copy, manifest)


# ------------------------------------------------------------------ (c) the token input --
token_inputs = st.one_of(
    json_values,
    st.lists(st.integers(0, 4095), min_size=1, max_size=12),
    st.lists(st.integers(-2**70, 2**70), min_size=1, max_size=6),
    st.lists(st.one_of(st.integers(0, 4095), st.floats(), st.booleans(), st.text(max_size=3)), max_size=6),
    st.lists(st.lists(st.integers(0, 4095), max_size=3), max_size=3),
    st.binary(max_size=8),
    st.builds(lambda dt, xs: np.array(xs).astype(dt), st.sampled_from(
        ["int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float64", "bool", "complex64"]),
        st.lists(st.integers(-5, 5000), max_size=6)),
    st.builds(lambda xs: np.array(xs, dtype=object), st.lists(st.integers(0, 4095), max_size=4)),
    st.builds(range, st.integers(-3, 3), st.integers(-3, 12)),
    st.tuples(st.integers(0, 4095), st.integers(0, 4095)),
)


def _valid(ids) -> bool:
    """What prefill must accept: a non-empty 1-D sequence of (non-bool) integers in the vocabulary."""
    if isinstance(ids, (str, bytes, dict)):
        return False
    arr = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
    if arr.ndim != 1 or arr.size == 0 or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        return False
    return bool(((arr >= 0) & (arr < 4096)).all())


def check_prefill(model, ids) -> None:
    from optc.errors import OptcError

    model.reset()
    try:
        with np.errstate(all="ignore"):
            valid = _valid(ids)
    except (ValueError, TypeError, OverflowError):  # numpy cannot even make an array of it
        valid = False
    try:
        logits = model.prefill(ids)
    except (OptcError, TypeError, ValueError) as e:
        assert not valid, f"refused a valid input {ids!r}: {e}"
        assert "\n" not in str(e) and str(e), repr(str(e))
        TALLY["prefill", "refused"] += 1
        return
    TALLY["prefill", "accepted"] += 1
    assert valid, f"accepted {ids!r}"
    assert logits.shape == (4096,) and np.isfinite(logits).all()


@pytest.fixture(scope="module")
def model(identity_artifact):
    from optc.runtime import load

    return load(identity_artifact)


@bounded(200)
@given(ids=token_inputs)
def test_fuzz_prefill_token_input(model, ids):
    check_prefill(model, ids)


@pytest.mark.fuzz
@pytest.mark.skipif(not LONG, reason="long fuzzing run: OPTC_FUZZ_LONG=1")
@long(10_000)
@given(ids=token_inputs)
def test_fuzz_prefill_token_input_long(model, ids):
    check_prefill(model, ids)


# ------------------------------------------------------------ cases the fuzzer found --
def test_found_a_control_character_in_yaml_is_a_one_line_error(tmp_path, capsys):
    """Found by test_fuzz_config_loader (text='\\x1f'): PyYAML's reader error has no `problem`
    and its text spans two lines, so the CLI printed a two-line error."""
    from conftest import run_cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes: []\n\x1f\n")
    code, _, err = run_cli(["config", "show", cfg], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "invalid YAML (unacceptable character #x001f: special characters are not allowed)" in err, err


@pytest.mark.parametrize("text, needle", [
    # found by test_fuzz_config_loader_long: a key holding a newline was echoed raw (two lines)
    ("passes: []\n? '\n\n  '\n: null\n", "'\\n': unknown key (expected 'passes', 'verify')"),
    ("passes:\n  - name: remove_unused\n    ? 'a\n\n  b'\n    : 1\n", "passes[0].'a\\nb': unknown key"),
    # found while fixing it: a list as a key crashed the duplicate-key check (TypeError)
    ("? [a]\n: 1\n", "invalid YAML (found unhashable key)"),
    # and keys of two types could not be sorted for the message (TypeError)
    ("1: x\nb: y\n", "1: unknown key"),
])
def test_found_yaml_keys_of_any_kind_give_one_line_errors(tmp_path, capsys, text, needle):
    from conftest import run_cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _, err = run_cli(["config", "show", cfg], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("edit, needle", [
    # found by test_fuzz_manifest_loader_long: names holding a newline were echoed raw (two lines)
    (lambda m: m["model"].update({"\n": None}), "model.'\\n': unknown key"),
    (lambda m: m["files"].update({"\n": "0" * 64}), "/'\\n': missing file listed in the manifest"),
    (lambda m: m["backend"]["session_options"].update({"a\nb": 1}), "session_options.'a\\nb': unknown key"),
    (lambda m: m["kv_cache"].update({"\x1b[2J": 1}), "kv_cache.'\\x1b[2J': unknown key"),
])
def test_found_manifest_names_of_any_kind_give_one_line_errors(tmp_path, identity_artifact, capsys, edit, needle):
    from conftest import run_cli

    copy = tmp_path / "a"
    shutil.copytree(identity_artifact, copy)
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", copy, "--prompt", "x", "--max-new-tokens", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
