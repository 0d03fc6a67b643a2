"""Issue: ONNX Runtime fast path. The canonical attention lowered to com.microsoft.GroupQueryAttention
(backends/onnxruntime_fused.py) writing the runtime's cache in place must give the logits of the
generic graph, step for step, across cache growth; artifacts the lowering does not take say why
and keep the generic path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DECODER_DIR, ROOT

PEERS = ROOT / "tests" / "peer_exports"
TOKENIZER = DECODER_DIR / "tokenizer.json"


def _compile(model: Path, out: Path, passes=None, options=None, log=None) -> dict:
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.registry import default_registry

    cfg = parse_config({"passes": passes or []}, default_registry())
    return compile_model(model, out, config=cfg, tokenizer=TOKENIZER, verify_length=64,
                         backend_options=options or {}, log=log or (lambda *_: None))


def _stream(artifact: Path, ids: list[int], prompt: int):
    import optc.runtime

    m = optc.runtime.load(artifact)
    rows = [m.prefill(ids[:prompt], all_logits=True)]
    rows += [m.decode(t)[None] for t in ids[prompt:-1]]
    return m, np.concatenate(rows)


@pytest.mark.slow  # 320 steps of two graphs per export: ~1 min of the fast tier
@pytest.mark.parametrize("export", ["exported_decoder", "torchscript_decoder"])
def test_fused_path_matches_the_generic_graph_step_for_step(export, request, tmp_path):
    """pycoder-5m from dynamo (native RotaryEmbedding) and from the TorchScript exporter (rotary
    rewritten from Sin/Cos arithmetic): prefill 200 tokens and decode 120 more. The cache outgrows
    its first buffer (256 entries), so the executor rebinds the new one. Every logit matches the
    generic graph's."""
    model = request.getfixturevalue(export)
    logs: list[str] = []
    fused = _compile(model, tmp_path / "fused", log=logs.append)
    generic = _compile(model, tmp_path / "generic", options={"fused_attention": False})
    assert fused["backend"]["kv_in_place"]["op"] == "com.microsoft.GroupQueryAttention"
    assert "kv_in_place" not in generic["backend"]
    assert any("lowered to com.microsoft.GroupQueryAttention" in line for line in logs), logs
    assert fused["verification"]["top1_agreement"] == 1.0 and fused["verification"]["max_abs_logit_diff"] <= 1e-4

    ids = [int(i) for i in np.random.default_rng(0).integers(1, 4096, size=320)]
    m, a = _stream(tmp_path / "fused", ids, prompt=200)
    _, b = _stream(tmp_path / "generic", ids, prompt=200)
    assert a.shape == (319, 4096)  # (the model's trained context is 512: no warning)
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert m.cache.length == 319 and m.cache.capacity == 512  # grew once, in place after that
    # the executor's bound buffers are the cache's own arrays: nothing is copied per step
    assert m.executor._bound["past_key_values.0.key"] is m.cache.keys[0].data
    assert m.executor._bound["present.0.key"] is m.cache.keys[0].data
    # a decode step rebinds nothing: the cache hands out the same buffer map until a buffer grows
    assert m.cache.buffers(1) is m.executor._bound_buffers
    # the generate loop samples from the executor's own logits array (no copy): same text
    import optc.runtime

    g = optc.runtime.load(tmp_path / "generic")
    for kw in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}):
        assert m.generate("def add(a, b):", max_new_tokens=40, **kw) == g.generate("def add(a, b):", max_new_tokens=40,
                                                                                    **kw)


@pytest.fixture(scope="module")
def fused_artifact(tmp_path_factory, exported_decoder) -> Path:
    out = tmp_path_factory.mktemp("fused") / "art"
    _compile(exported_decoder, out)
    return out


def test_fused_graph_has_no_per_step_concat_and_one_gqa_per_layer(fused_artifact):
    import onnx

    manifest = json.loads((fused_artifact / "manifest.json").read_text())
    graph = onnx.load(fused_artifact / "model.onnx", load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == manifest["model"]["n_layers"]
    assert "Attention" not in ops and "RotaryEmbedding" not in ops
    n = manifest["model"]["n_layers"]
    # Q/K/V read as one packed weight; each residual Add + RMSNorm pair is one op
    assert all(len(node.input) == 9 and node.input[1] == node.input[2] == "" for node in graph.node
               if node.op_type == "GroupQueryAttention")
    assert ops.count("MatMul") == 4 * n + 1  # packed qkv, o, packed gate/up, down per layer + the LM head
    assert ops.count("Split") == n  # (gate | up)
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * n  # every norm but the first (no residual yet)
    assert not [n for n in graph.node if n.op_type == "Concat" and any(i.startswith("past_key_values.")
                                                                        for i in n.input)]


def test_int4_weights_pack_qkv_exactly(tmp_path, exported_decoder, monkeypatch):
    """weight_quant runs before the lowering, so the fused path sees three MatMulNBits per layer
    for Q/K/V and two for the MLP's gate and up: it stacks each group into one (blocks run along
    K, so the output columns just stack; gate/up are split after). The logits are bit for bit
    those of the same lowering with the ops left apart (at accuracy_level 4, where activations are
    quantised per block, a different graph around them would not be)."""
    import onnx

    from optc.backends import onnxruntime_fused

    passes = [{"name": "weight_quant", "bits": 4, "block_size": 32}]
    _compile(exported_decoder, tmp_path / "packed", passes)
    monkeypatch.setattr(onnxruntime_fused, "_packed_nbits", lambda *_: None)
    _compile(exported_decoder, tmp_path / "apart", passes)
    count = {}
    for kind in ("packed", "apart"):
        graph = onnx.load(tmp_path / kind / "model.onnx", load_external_data=False).graph
        count[kind] = sum(n.op_type == "MatMulNBits" for n in graph.node)
    n = json.loads((tmp_path / "packed" / "manifest.json").read_text())["model"]["n_layers"]
    assert (count["packed"], count["apart"]) == (4 * n + 1, 7 * n + 1)  # (Q/K/V and gate/up packed)
    ids = [int(i) for i in np.random.default_rng(1).integers(1, 4096, size=160)]
    _, a = _stream(tmp_path / "packed", ids, prompt=100)
    _, b = _stream(tmp_path / "apart", ids, prompt=100)
    assert np.array_equal(a, b), np.abs(a - b).max()


@pytest.fixture(scope="module")
def sink_window_artifacts(tmp_path_factory, exported_decoder):
    out = tmp_path_factory.mktemp("sink_window")
    logs: list[str] = []
    sw = [{"name": "sink_window", "sinks": 4, "window": 60}]
    fused = _compile(exported_decoder, out / "fused", sw, log=logs.append)
    generic = _compile(exported_decoder, out / "generic", sw, options={"fused_attention": False})
    return out, fused, generic, logs


@pytest.mark.parametrize("slack", [0.0, 0.25, 1.0])
def test_sink_window_on_the_fused_path_equals_the_generic_artifact(slack, sink_window_artifacts, monkeypatch):
    """sink_window lowered to GQA: keys rotated once at their slot in a bounded buffer, rows that
    left the window hidden by an attention bias until the buffer is compacted (every `slack`
    steps), the sinks' keys placed before the visible window. Over 500 tokens with a 64-token
    window (hundreds of evictions, tens of compactions) every logit is the generic artifact's,
    whose graph re-rotates the whole cache by slot every step."""
    import optc.runtime.cache.window as window_mod

    out, fused, generic, logs = sink_window_artifacts
    assert fused["backend"]["kv_in_place"]["attention_bias_input"] and "kv_in_place" not in generic["backend"]
    assert any("sink_window on the fused path" in line for line in logs), logs
    assert fused["verification"]["top1_agreement"] == 1.0 and fused["verification"]["max_abs_logit_diff"] <= 1e-4
    monkeypatch.setattr(window_mod, "SLACK_FRACTION", slack)
    ids = [int(i) for i in np.random.default_rng(2).integers(1, 4096, size=500)]
    m, a = _stream(out / "fused", ids, prompt=100)  # (prefilled in chunks of window / 2, as the generic one)
    g, b = _stream(out / "generic", ids, prompt=100)
    assert m._window.capacity == 64 + int(60 * slack) and m.cache.length <= m._window.capacity
    assert g.cache.length == 64
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()
    # the buffer never grew past the window's capacity (no reallocation while streaming)
    assert m.cache.capacity == 256 and m.cache.buffers(1) is m.executor._bound_buffers


def test_sink_window_keeps_the_generic_path_where_keys_cannot_be_moved(tmp_path, exported_decoder, monkeypatch):
    """The runtime moves rotated keys to new slots by rotating them back; rotary tables that are
    not angle x position (checked on the graph's own tables) keep the generic path, saying why."""
    from optc.backends import onnxruntime_fused

    monkeypatch.setattr(onnxruntime_fused, "_inv_freq", lambda *_: None)
    logs: list[str] = []
    manifest = _compile(exported_decoder, tmp_path / "art", [{"name": "sink_window", "sinks": 4, "window": 60}],
                        log=logs.append)
    assert "kv_in_place" not in manifest["backend"]
    assert any("generic attention path" in line and "not plain rotations" in line for line in logs), logs


@pytest.mark.parametrize("passes, why", [
    ([{"name": "kv_cache_compression", "bits": 8}], "the kivi cache layout is stored by the runtime"),
    ([{"name": "kv_cache_compression", "eviction": {"ratio": 0.5}}], "the h2o cache policy rewrites the cache"),
    ([{"name": "sparse_attention", "mode": "block_sparse", "block_size": 16, "budget_blocks": 16}],
     "block-sparse prefill selects key blocks from the cache itself"),
])
def test_cache_passes_keep_the_generic_path_and_say_why(passes, why, tmp_path, exported_decoder):
    logs: list[str] = []
    manifest = _compile(exported_decoder, tmp_path / "art", passes, log=logs.append)
    assert "kv_in_place" not in manifest["backend"]
    assert any(line.startswith("onnxruntime: generic attention path") and why in line for line in logs), logs


def test_heads_ort_cannot_fuse_keep_the_generic_path(tmp_path):
    """ONNX Runtime's CPU GQA takes head sizes in multiples of 16 (the fixtures have 8)."""
    logs: list[str] = []
    manifest = _compile(PEERS / "llama-gqa" / "model.onnx", tmp_path / "art", log=logs.append)
    assert "kv_in_place" not in manifest["backend"]
    assert any("head_dim 8 (ONNX Runtime's CPU GroupQueryAttention takes multiples of 16)" in line
               for line in logs), logs


def test_positions_past_the_rotary_tables_are_refused(fused_artifact):
    import optc.runtime
    from optc.errors import InvalidValue

    m = optc.runtime.load(fused_artifact)
    limit = m.executor.kv_in_place.max_positions
    assert limit == 4096  # 4 x pycoder-5m's 512-token context, at least 4,096
    m.cache.buffers(limit)  # (the runtime would get here by decoding; skip the work)
    m.cache.advance(limit - 1)
    m.position = limit - 1
    with pytest.warns(Warning, match="past the model's trained context"):
        m.decode(5)  # the last position the tables cover
    with pytest.raises(InvalidValue, match="past this artifact's rotary tables"):
        m.decode(5)


@pytest.mark.parametrize("edit, needle", [
    (lambda k: k.update(op="com.microsoft.MultiHeadAttention"), "kv_in_place.op: 'com.microsoft.GroupQueryAttention'"),
    (lambda k: k.update(cache_inputs=k["cache_inputs"][:1]), "kv_in_place.cache_inputs: [key input, value input]"),
    (lambda k: k.update(max_positions=0), "kv_in_place.max_positions: 1.."),
    (lambda k: k.update(seqlens_input="nope"), "'nope' is not an input"),
    (lambda k: k.update(extra=1), "kv_in_place.extra: unknown key"),
    (lambda k: k.update(attention_bias_input="x"), "attention_bias_input and rotary_inv_freq"),
    (lambda k: k.update(attention_bias_input="x", rotary_inv_freq=[0.5], pruned_past_input="y"),
     "pruned_attention_bias_input goes with pruned_past_input (token_dropping) and attention_bias_input"),
    (lambda k: k.update(pruned_attention_bias_input="x"), "pruned_attention_bias_input goes with"),
    (lambda k: k.update(pruned_past_input="optc.gqa.pruned_past_length"), "'optc.gqa.pruned_past_length' is not an "
                                                                          "input"),
])
def test_an_edited_kv_in_place_section_is_refused(edit, needle, fused_artifact):
    import re

    from optc.runtime.artifact import ArtifactError
    from optc.runtime.model import Model

    manifest = json.loads((fused_artifact / "manifest.json").read_text())
    edit(manifest["backend"]["kv_in_place"])
    with pytest.raises(ArtifactError, match=re.escape(needle)):
        Model(fused_artifact, manifest)  # the contract, not the file hashes, is what is tested here


def test_pruned_layers_without_their_length_input_are_refused(fused_artifact):
    """A manifest that says token_dropping pruned the later layers, on a fused graph that gives
    them no length of their own, was edited: one line, before anything runs."""
    from optc.runtime.artifact import ArtifactError
    from optc.runtime.model import Model

    manifest = json.loads((fused_artifact / "manifest.json").read_text())
    manifest["kv_cache"]["pruned_from_layer"] = 2
    with pytest.raises(ArtifactError, match="pruned layers with the pruned-length input") as e:
        Model(fused_artifact, manifest)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_a_prefill_computes_the_last_tokens_logits_only(fused, fused_artifact, exported_decoder, tmp_path):
    """The LM head reads the step's last `optc.logit_rows` rows: a prompt's prefill asks for one
    (the executor hands back a single row), a teacher-forced one for every row, and the last
    row is the same either way; decode is unchanged."""
    import onnx

    import optc.runtime

    path = fused_artifact if fused else tmp_path / "generic"
    if not fused:
        _compile(exported_decoder, path, options={"fused_attention": False})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["backend"]["logit_rows_input"] == "optc.logit_rows"
    graph = onnx.load(path / "model.onnx", load_external_data=False).graph
    assert "optc.logit_rows" in {i.name for i in graph.input}
    m = optc.runtime.load(path)
    ids = [int(i) for i in np.random.default_rng(2).integers(1, 4096, size=90)]
    every = m.prefill(ids[:80], all_logits=True)
    after_every = [m.decode(t) for t in ids[80:]]
    m.reset()
    rows = []  # logit rows the executor handed back per step
    name = "run_in_place" if fused else "run"
    original = getattr(m.executor, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        rows.append((out if fused else out[0]).shape[1])
        return out

    setattr(m.executor, name, spy)
    last = m.prefill(ids[:80])
    assert rows == [1]
    np.testing.assert_allclose(last, every[-1], atol=1e-5)
    for t, want in zip(ids[80:], after_every):
        np.testing.assert_allclose(m.decode(t), want, atol=1e-5)
