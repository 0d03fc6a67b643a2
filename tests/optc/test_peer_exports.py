"""Issue: peer exports. What optimum-onnx's real exporter emits by default (transformers' SDPA
attention at opset 18), for tiny random-initialised decoders of several families
(tests/peer_exports/make_fixtures.py made them; optimum lives in its own venv, not optc's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DECODER_DIR, ROOT, run_cli

PEERS = ROOT / "tests" / "peer_exports"
FAMILIES = ["llama-gqa", "llama-mha", "mistral", "qwen2", "phi3", "gpt-neox", "gemma", "gpt2", "gptj"]
# GPT-2 has learned absolute positions; GPT-J reads RoPE from a precomputed table (no Sin/Cos to match)
ROTARY = [f for f in FAMILIES if f not in ("gpt2", "gptj")]
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


def test_optimum_fp16_export_is_computed_in_float32_within_fp16_rounding(tmp_path):
    """`optimum-cli --dtype fp16`: the canonical form upcasts it to float32 (inputs, cache, weights),
    reports that, and reproduces ONNX Runtime on the fp16 graph to fp16 rounding: |Δlogit| at the
    fp16 resolution of these logits (|logit| up to ~40 with the fixtures' x10 init: fp16 steps of
    0.03 there), nowhere near a wrong graph's whole units; top-1 differs only where the random
    model's top two logits are within that rounding (1 of 512 positions)."""
    import onnx

    manifest = _compile("llama-gqa-fp16", tmp_path / "art")
    v = manifest["verification"]
    assert manifest["model"]["rewrites"]["float16_upcast_to_float32"] > 0
    assert v["top1_agreement"] >= 0.99 and 1e-4 < v["max_abs_logit_diff"] <= 0.05, v
    graph = onnx.load(tmp_path / "art" / "model.onnx", load_external_data=False).graph
    assert {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_")} == {onnx.TensorProto.FLOAT}
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]


@pytest.mark.parametrize("family", ["llama-gqa", "gptj"])
def test_optimum_export_takes_the_kv_quantisation_pass(family, tmp_path):
    manifest = _compile(family, tmp_path / "art", [{"name": "kv_cache_compression", "bits": 8}])
    assert manifest["kv_cache"]["layout"] == "kivi" and manifest["kv_cache"]["bits"] == 8
    assert manifest["verification"]["top1_agreement"] >= 0.9, manifest["verification"]


@pytest.mark.parametrize("family", ["llama-gqa", "gptj"])
def test_optimum_export_takes_h2o_eviction(family, tmp_path):
    """H2O makes each Attention also output its probabilities. GPT-J's query has no declared shape
    (an untyped Cast), where onnx's Attention shape inference gave that output rank 0 and the
    checker refused the pass; the query is now annotated. Until the cache reaches the budget the
    artifact is the export; afterwards the cache stays at the budget."""
    import numpy as np

    from optc.runtime import load

    _compile(family, tmp_path / "dense")
    h2o = {"name": "kv_cache_compression", "eviction": {"budget": 24, "sinks": 2, "recent": 4}}
    manifest = _compile(family, tmp_path / "h2o", [h2o])
    assert manifest["kv_cache"]["policy"]["kind"] == "h2o"
    dense, evicting = load(tmp_path / "dense"), load(tmp_path / "h2o")
    ids = list(range(5, 25))                      # 20 tokens: below the budget, nothing evicted
    np.testing.assert_allclose(evicting.prefill(ids, all_logits=True), dense.prefill(ids, all_logits=True),
                               atol=1e-4)
    for t in range(30):
        evicting.decode(40 + t)
    assert evicting.cache.length == 24


def test_decomposed_rotary_becomes_rotary_embedding_op():
    """optimum leaves RoPE as Sin/Cos/Slice/Neg/Concat arithmetic; every q and k rotation of every
    layer becomes one ONNX RotaryEmbedding, and nothing decomposed is left over."""
    import onnx_ir as ir

    from optc.canonical import canonicalize

    for family in ROTARY:
        model = ir.load(PEERS / family / "model.onnx")
        info = canonicalize(model)
        ops = [n.op_type for n in model.graph]
        assert info.rotary == "RotaryEmbedding", family
        assert info.rewrites["decomposed_rotary_to_RotaryEmbedding"] == ops.count("RotaryEmbedding") == 2 * info.n_layers
        assert "Neg" not in ops and ops.count("Cos") == ops.count("Sin") == 1, (family, ops.count("Cos"))


def test_partial_rotary_is_folded_into_one_rotary_embedding_op():
    """GPT-NeoX rotates a quarter of each head and passes the rest through (Phi3 writes the same split
    over the whole head): cat(rotary(k[..., :r]), k[..., r:]) becomes one RotaryEmbedding with
    rotary_embedding_dim=r, whose output is the new key itself, which sink_window needs. Exactness
    against ONNX Runtime is the identity test above."""
    import onnx_ir as ir

    from optc.canonical import canonicalize

    for family, rotary_dim in (("gpt-neox", 2), ("phi3", None)):
        model = ir.load(PEERS / family / "model.onnx")
        info = canonicalize(model)
        ropes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
        assert info.rewrites["partial_rotary_folded"] == len(ropes) == 2 * info.n_layers, family
        assert {r.attributes.get_int("rotary_embedding_dim", None) for r in ropes} == {rotary_dim}, family
        new_key = {v.name: v for v in model.graph.outputs}["present.0.key"].producer().inputs[1]
        assert new_key.producer().op_type == "RotaryEmbedding", family


@pytest.mark.parametrize("family", ["phi3", "gpt-neox"])
def test_sink_window_compiles_on_fused_qkv_and_partial_rotary_exports(family, tmp_path):
    manifest = _compile(family, tmp_path / "art",
                        [{"name": "sparse_attention", "mode": "sink_window", "sinks": 2, "window": 16}])
    assert manifest["kv_cache"]["policy"]["kind"] == "sink_window"


def test_positions_computed_inside_the_graph_become_an_input():
    """optimum's Gemma export has no position_ids input: transformers computed
    arange(past_len, past_len + seq) from the cache. That tensor feeds the rotary tables only, so it
    becomes a position_ids input (what sink_window needs to number tokens by cache slot); the
    Range stays for the causal mask. Exactness against ONNX Runtime is the identity test above."""
    import onnx_ir as ir

    from optc.canonical import canonicalize

    model = ir.load(PEERS / "gemma" / "model.onnx")
    assert "position_ids" not in [v.name for v in model.graph.inputs]
    info = canonicalize(model)
    assert info.rewrites["position_ids_exposed_as_input"] == 1
    [positions] = [v for v in model.graph.inputs if v.name == "position_ids"]
    assert positions.dtype == ir.DataType.INT64 and len(positions.shape) == 2
    assert any(user.op_type != "Shape" for user, _ in positions.uses())  # it feeds the rotary tables
    assert "Range" in {n.op_type for n in model.graph}  # the mask still computes its own positions
    # an export that already has the input is left alone
    other = ir.load(PEERS / "llama-gqa" / "model.onnx")
    assert "position_ids_exposed_as_input" not in canonicalize(other).rewrites


@pytest.mark.parametrize("broken, needle", [
    ([1], "found 1 attention ops (standard ONNX Attention or the MatMul-Softmax-MatMul pattern) for 2 KV-cache "
          "layers; layer 1: Attribute axis mismatch: expected -1, got 2. (at node '/model/layers.1/self_attn/"),
    ([0, 1], "found 0 attention ops (standard ONNX Attention or the MatMul-Softmax-MatMul pattern) for 2 KV-cache "
             "layers; layers 0-1: Attribute axis mismatch: expected -1, got 2. (at node '/model/layers.0/self_attn/"),
])
def test_attention_that_does_not_match_is_named_per_layer(broken, needle, tmp_path, capsys):
    """When a layer's attention is not recognised, `optc inspect` (and compile) say which layers,
    why the closest rule failed there and at which node, in one line: layers with the same reason
    are grouped. (Here the softmax of the broken layers runs over the wrong axis.)"""
    import onnx

    proto = onnx.load(PEERS / "llama-gqa" / "model.onnx")
    for node in proto.graph.node:
        if node.op_type == "Softmax" and any(f"layers.{i}/" in node.name for i in broken):
            next(a for a in node.attribute if a.name == "axis").i = 2
    onnx.save(proto, tmp_path / "model.onnx")
    code, _, err = run_cli(["inspect", tmp_path / "model.onnx"], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_grouped_query_attention_reads_the_cache_itself():
    """optimum's GQA exports repeat the KV heads between the cache and attention (transformers'
    repeat_kv: Unsqueeze at axis 2, Expand, Reshape); the canonical Attention op does grouped-query
    attention itself, so each layer's Attention reads present.N.key/.value directly. An MHA export
    has no repeat_kv and nothing is rewritten there."""
    import onnx_ir as ir

    from optc.canonical import canonicalize

    for family, repeated in (("llama-gqa", True), ("qwen2", True), ("llama-mha", False)):
        model = ir.load(PEERS / family / "model.onnx")
        info = canonicalize(model)
        outputs = {v.name: v for v in model.graph.outputs}
        attention = {n.name: n for n in model.graph if n.op_type == "Attention"}
        for layer in info.layers:
            node = attention[layer.attention]
            assert node.inputs[1] is outputs[f"present.{layer.index}.key"], family
            assert node.inputs[2] is outputs[f"present.{layer.index}.value"], family
        assert info.rewrites.get("repeat_kv_removed") == (2 * info.n_layers if repeated else None), family
        assert (info.kv_heads < info.num_heads) == repeated, family


@pytest.mark.parametrize("kind, needle", [
    ("key", "layer 1: no single Attention op reads present.1.key; the key input of Attention node "
            "'node_Attention_1' is not repeat_kv of it: the Unsqueeze does not add the repeat axis after the KV "
            "heads (axes [2]) (at node '/model/layers.1/self_attn/Reshape_4')"),
    ("value", "Attention node 'node_Attention_1': its value input is not the layer's present tensor "
              "'present.1.value' (nor repeat_kv of it: the Unsqueeze does not add the repeat axis after the KV "
              "heads (axes [2]) (at node '/model/layers.1/self_attn/Reshape_6'))"),
])
def test_kv_head_repetition_that_is_not_repeat_kv_is_refused_saying_why(kind, needle, tmp_path, capsys):
    """A layer whose key or value reaches attention through something that is not repeat_kv (here
    the Unsqueeze inserts the repeat axis at 1, not 2: other numbers, same ops) is refused in one
    line naming the layer, the rule's failed check and the node; nothing is compiled."""
    import onnx

    proto = onnx.load(PEERS / "llama-gqa" / "model.onnx")
    [unsqueeze] = [n for n in proto.graph.node if n.op_type == "Unsqueeze" and n.input[0] == f"present.1.{kind}"]
    axes = onnx.helper.make_node("Constant", [], ["axes_1"],
                                 value=onnx.helper.make_tensor("axes_1", onnx.TensorProto.INT64, [1], [1]))
    proto.graph.node.insert(list(proto.graph.node).index(unsqueeze), axes)
    unsqueeze.input[1] = "axes_1"
    onnx.save(proto, tmp_path / "model.onnx")
    code, _, err = run_cli(["inspect", tmp_path / "model.onnx"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err


@pytest.mark.parametrize("family, needle", [("gpt2", "learned absolute positions"),
                                            ("gptj", "RoPE read from a precomputed table")])
def test_positions_without_rotary_ops_are_refused_by_sink_window_saying_so(family, needle, tmp_path, capsys):
    """GPT-2 and GPT-J compile (identity above), but GPT-2's positions are learned embeddings added
    to the input and GPT-J reads its rotary from a precomputed sin/cos table (interleaved): nothing
    optc can re-assign per cache slot, and sink_window says so in one line."""
    cfg = tmp_path / "sw.yaml"
    cfg.write_text("passes:\n  - name: sparse_attention\n    mode: sink_window\n    sinks: 4\n    window: 60\n")
    out = tmp_path / "art"
    code, _, err = run_cli(["compile", PEERS / family / "model.onnx", "-c", cfg, "-o", out, "--tokenizer",
                            TOKENIZER], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_a_cache_cast_to_its_own_type_on_the_way_out_is_the_cache():
    """GPT-J writes present.N.key as Cast(Concat(past, new), to=float) on a float cache (keys only); the cast
    is dropped (reported) so that the cache is recognised, and KV quantisation compiles on it."""
    import onnx_ir as ir

    from optc.canonical import canonicalize

    model = ir.load(PEERS / "gptj" / "model.onnx")
    info = canonicalize(model)
    assert info.rewrites["noop_output_cast_removed"] == info.n_layers  # the keys only
    outputs = {v.name: v for v in model.graph.outputs}
    assert outputs["present.0.key"].producer().op_type == "Concat" and outputs["present.0.key"].type is not None


def _stream_logits(artifact: Path, ids: list[int], prompt: int) -> np.ndarray:
    import optc.runtime

    m = optc.runtime.load(artifact)
    rows = [m.prefill(ids[:prompt])]
    rows += [m.decode(t) for t in ids[prompt:-1]]
    return np.stack(rows)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama-gqa", "gpt-neox", "gemma"])
def test_sink_window_on_optimum_export_matches_the_same_weights_exported_by_optc(family, tmp_path):
    """The same checkpoint through two exporters: optimum's decomposed rotary + SDPA, and torch
    dynamo's native RotaryEmbedding + Attention. With sink_window evicting (sinks 2, window 16, a
    90-token stream) both artifacts give the same logits at every step: the rewritten rotary
    re-positions the cache exactly as the native op does. GPT-NeoX rotates a quarter of each head:
    dynamo writes that as Concat(RotaryEmbedding(k[..., :r]), k[..., r:]), which folds too. optimum's
    Gemma computes its positions inside the graph: they become an input the runtime feeds."""
    from optc.export import export_decoder

    native = export_decoder(PEERS / family, tmp_path / "dynamo" / "model.onnx", log=lambda *_: None)
    passes = [{"name": "sparse_attention", "mode": "sink_window", "sinks": 2, "window": 16}]
    logits = []
    for name, model in (("optimum", PEERS / family / "model.onnx"), ("dynamo", native)):
        from optc.compile import compile_model
        from optc.config import parse_config
        from optc.registry import default_registry

        out = tmp_path / f"art-{name}"
        manifest = compile_model(model, out, config=parse_config({"passes": passes}, default_registry()),
                                 tokenizer=TOKENIZER, verify_length=64, log=lambda *_: None)
        assert manifest["kv_cache"]["policy"]["kind"] == "sink_window", manifest["kv_cache"]
        if family == "gpt-neox":
            assert manifest["model"]["rewrites"]["partial_rotary_folded"] == 2 * manifest["model"]["n_layers"]
        ids = [int(i) for i in np.random.default_rng(0).integers(1, 4096, size=90)]
        logits.append(_stream_logits(out, ids, prompt=10))
    optimum, dynamo = logits
    assert optimum.shape == (80, 4096)
    assert np.abs(optimum - dynamo).max() <= 1e-4, np.abs(optimum - dynamo).max()
    assert (optimum.argmax(-1) == dynamo.argmax(-1)).all()


def test_unmatched_rotary_is_refused_by_sink_window_in_one_line(tmp_path, capsys):
    """A rotary form the canonicaliser does not match stays decomposed, and sink_window refuses it
    in one line naming what it needs and why the rule did not match; nothing is written. (Here
    cos/sin are built from cat(freqs, Identity(freqs)): the same numbers, but the rule cannot see
    that both halves are one tensor.)"""
    import onnx

    proto = onnx.load(PEERS / "llama-gqa" / "model.onnx")
    [cat] = [n for n in proto.graph.node if n.name == "/model/rotary_emb/Concat_1"]
    proto.graph.node.insert(list(proto.graph.node).index(cat),
                            onnx.helper.make_node("Identity", [cat.input[1]], ["freqs_copy"]))
    cat.input[1] = "freqs_copy"
    onnx.save(proto, tmp_path / "model.onnx")
    cfg = tmp_path / "sw.yaml"
    cfg.write_text("passes:\n  - name: sparse_attention\n    mode: sink_window\n    sinks: 4\n    window: 60\n")
    out = tmp_path / "art"
    code, _, err = run_cli(["compile", tmp_path / "model.onnx", "-c", cfg, "-o", out, "--tokenizer", TOKENIZER],
                           capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "RotaryEmbedding" in err and "not rewritten: cos is not Cos(cat(freqs, freqs))" in err, err
    assert not out.exists()
