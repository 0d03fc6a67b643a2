"""kv_quantize `scales: static`: an int8 cache with fixed per-layer/head/channel scales calibrated on
text, kept in place by ONNX Runtime's GroupQueryAttention on the fused path (issue 17: int8 KV no
slower than fp32 KV), and run by the generic graph elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compile_helpers import compile_with, fused_and_generic, token_ids
from conftest import run_cli
from optc.config import parse_config
from optc.errors import OptcError
from optc.registry import default_registry

STATIC = {"name": "kv_quantize", "bits": 8, "scales": "static"}


@pytest.fixture(scope="module")
def static_pair(exported_decoder, tmp_path_factory):
    return fused_and_generic(exported_decoder, tmp_path_factory.mktemp("static"), [STATIC])


def _scale(model, layer: int, kind: str) -> np.ndarray:
    """The fused graph's GQA scale initializer of `layer` ([1, H, 1, D])."""
    import onnx

    graph = onnx.load(str(model.root / "model.onnx")).graph
    init = {t.name: t for t in graph.initializer}[f"optc.gqa.{kind[0]}_scale.{layer}"]
    return onnx.numpy_helper.to_array(init)


def test_the_cache_is_int8_in_place_on_the_fused_path(static_pair):
    import onnx

    fused, generic = static_pair
    for m in (fused, generic):
        assert m.manifest["kv_cache"] == {"layout": "int8", "positions": "absolute"}
        assert m.cache.keys[0].dtype == np.int8
    graph = onnx.load(str(fused.root / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 6
    for node in gqa:
        attrs = {a.name: a for a in node.attribute}
        assert attrs["kv_cache_bit_width"].i == 8 and attrs["k_quant_type"].s == b"PER_CHANNEL"
    assert {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_key_values")} == \
        {onnx.TensorProto.INT8}


def test_gqa_stores_the_keys_the_generic_graph_stores(static_pair, exported_decoder, tmp_path):
    """Layer 0 reads the embeddings alone, so both paths compute the same rotated keys there: GQA's
    int8 cache holds exactly round-half-even(x / scale), saturated to [-128, 127], of the float
    artifact's cached keys, as the generic graph does. Later layers' float inputs differ in the
    last bits (fused ops), so a rounding may flip: at most one step, in a few percent of entries."""
    fused, generic = static_pair
    ids = token_ids(120, seed=3)
    for m in (fused, generic):
        m.reset()
        m.prefill(ids)
    floats = compile_with(exported_decoder, tmp_path / "float", [])
    floats.prefill(ids)
    for kind, cache in (("key", "keys"), ("value", "values")):
        x = getattr(floats.cache, cache)[0].view()
        want = np.clip(np.rint(x / _scale(fused, 0, kind)), -128, 127).astype(np.int8)
        assert np.array_equal(getattr(fused.cache, cache)[0].view(), want), kind
        assert np.array_equal(getattr(generic.cache, cache)[0].view(), want), kind
        for layer in range(1, 6):
            a = getattr(fused.cache, cache)[layer].view().astype(int)
            b = getattr(generic.cache, cache)[layer].view().astype(int)
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.05, (kind, layer)


def test_decode_agrees_with_the_generic_graph_and_the_float_cache(static_pair, exported_decoder, tmp_path):
    """The same next tokens as the generic graph (the int8 roundings above aside) and nearly those
    of the float cache, over 80 decode steps; the cache takes a quarter of the float bytes."""
    fused, generic = static_pair
    floats = compile_with(exported_decoder, tmp_path / "float", [])
    ids = token_ids(200, seed=5)
    agree_generic, agree_float, diffs = [], [], []
    for m in (fused, generic, floats):
        m.reset()
    logits = [m.prefill(ids[:120]) for m in (fused, generic, floats)]
    for t in ids[120:]:
        agree_generic.append(logits[0].argmax() == logits[1].argmax())
        agree_float.append(logits[0].argmax() == logits[2].argmax())
        diffs.append(float(np.abs(logits[0] - logits[1]).max()))
        logits = [m.decode(int(t)) for m in (fused, generic, floats)]
    assert np.mean(agree_generic) >= 0.97 and np.median(diffs) < 0.1, (np.mean(agree_generic), np.median(diffs))
    assert np.mean(agree_float) >= 0.95, np.mean(agree_float)
    assert fused.kv_bytes * 4 == floats.kv_bytes


def test_rotary_pairs_bound_the_key_scales():
    """A rotated key channel's scale covers its pair's norm (RoPE moves magnitude between the two
    channels as the position grows); an unrotated channel (partial rotary) keeps its own absmax."""
    from optc.passes.kv_cache.static_int8 import scales_from_absmax

    absmax = np.array([3.0, 1.0, 4.0, 2.0, 5.0, 6.0], np.float32)
    partner = np.array([2, 3, 0, 1, 4, 5])  # half-split over the first 4 channels
    got = scales_from_absmax(absmax, 1, 6, partner).ravel() * 127
    np.testing.assert_allclose(got, [5.0, np.sqrt(5), 5.0, np.sqrt(5), 5.0, 6.0], rtol=1e-6)
    np.testing.assert_allclose(scales_from_absmax(absmax, 1, 6).ravel() * 127, absmax, rtol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"bits": 4, "scales": "static"}, "scales: static stores int8"),
    ({"bits": 8, "scales": "static", "group_size": 32}, "group_size: KIVI's options"),
    ({"bits": 8, "calibration": {"samples": 4}}, "calibration: only scales: static calibrates"),
])
def test_bad_static_options_are_one_line_errors(options, message):
    with pytest.raises(OptcError, match=message) as e:
        parse_config({"passes": [{"name": "kv_quantize", **options}]}, default_registry())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("other, message", [
    ({"name": "sink_window", "sinks": 4, "window": 60}, "the policy evicts or moves cached tokens"),
    ({"name": "token_dropping", "mode": "prefill"}, "its later layers keep caches of their own length"),
    ({"name": "layer_routing", "max_skip": 1}, "a skipped layer's cache stops"),
])
def test_static_scales_refuse_what_moves_the_cache(other, message):
    from optc.pipeline import check_contracts, plan

    registry = default_registry()
    with pytest.raises(OptcError, match=message) as e:
        check_contracts(plan(parse_config({"passes": [other, STATIC]}, registry), registry))
    assert "\n" not in str(e.value)


def test_an_int8_manifest_with_a_policy_is_refused(static_pair):
    from optc.runtime.artifact import ArtifactError
    from optc.runtime.model import Model

    fused, _ = static_pair
    manifest = json.loads((fused.root / "manifest.json").read_text())
    manifest["kv_cache"]["policy"] = {"kind": "sink_window", "sinks": 4, "window": 60}
    with pytest.raises(ArtifactError, match="kv_cache.policy: unknown key"):
        Model(fused.root, manifest)


@pytest.mark.parametrize("backend, needle", [
    (["--backend", "tvm"], "error: tvm backend: kv_quantize scales: static keeps an int8 cache"),
    (["--target", "npu"], "error: --target npu: runs a plain float cache"),
])
def test_other_backends_refuse_the_static_cache_in_one_line(backend, needle, tmp_path, exported_decoder, capsys):
    """(After the calibration's progress bar, which redraws one line with carriage returns.)"""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes:\n  - name: kv_quantize\n    bits: 8\n    scales: static\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "out", *backend], capsys)
    last = err.split("\r")[-1]
    assert code == 2 and last.count("\n") == 1 and "Traceback" not in err and last.startswith(needle), err
    assert not (tmp_path / "out").exists()
