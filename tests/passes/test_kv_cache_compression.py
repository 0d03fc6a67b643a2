"""kv_cache_compression: KIVI int8 / int4 KV cache, stored compressed by the runtime."""

from __future__ import annotations


import numpy as np
import pytest

from optc.config import parse_config

from conftest import DATA_DIR, config_error


@pytest.fixture(scope="module")
def kv_artifacts(tmp_path_factory, exported_decoder):
    """int8 and int4 artifacts compiled under the issue's budgets (+1% / +5% perplexity)."""
    from optc.compile import compile_model
    from optc.registry import default_registry

    out = {}
    for bits, budget in ((8, 0.01), (4, 0.05)):
        cfg = parse_config({"passes": [{"name": "kv_cache_compression", "bits": bits}],
                            "verify": {"max_perplexity_increase": budget}}, default_registry())
        path = tmp_path_factory.mktemp("kv") / f"int{bits}"
        out[bits] = (path, compile_model(exported_decoder, path, config=cfg, log=lambda *_: None))
    return out


def test_graph_structure_and_idempotence(exported_decoder):
    from optc.canonical import canonicalize
    from optc.ir import load_model, to_checked_proto
    from optc.passes.base import PassContext
    from optc.passes.kv_cache import KVQuantize, KVQuantizeOptions

    model = load_model(exported_decoder)
    ctx = PassContext(decoder=canonicalize(model))
    opts = KVQuantizeOptions(bits=4)
    assert KVQuantize(opts, ctx)(model).modified
    names = {v.name: v for v in model.graph.inputs}
    assert not any(n.startswith("past_key_values.") and n.endswith((".key", ".value")) for n in names)
    for i in range(6):
        for kind in ("key", "value"):
            base = f"past_key_values.{i}.{kind}"
            assert names[f"{base}.q"].dtype.name == "UINT8" and names[f"{base}.q"].shape[3] == 16  # 32 dims, packed
            assert {f"{base}.scale", f"{base}.zero", f"{base}.residual"} <= set(names)
    ops = [n.op_type for n in model.graph]
    assert ops.count("BitShift") == 12 and ops.count("Attention") == 6
    assert ctx.runtime.kv_cache.to_dict() == {"layout": "kivi", "positions": "absolute", "bits": 4,
                                                "group_size": 64, "residual": 32, "symmetric": False,
                                                "key_quant": "per_channel"}
    to_checked_proto(model, "test")
    assert not KVQuantize(opts, ctx)(model).modified


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_accuracy_within_budget_and_cache_stored_compressed(kv_artifacts, bits):
    from optc.runtime import load

    path, manifest = kv_artifacts[bits]
    v = manifest["verification"]
    print(f"int{bits}: perplexity {v['perplexity_increase']:+.4%}, top-1 {v['top1_agreement']:.2%}, "
          f"max |Δlogit| {v['max_abs_logit_diff']}")
    assert v["perplexity_increase"] <= (0.01 if bits == 8 else 0.05)
    assert v["top1_agreement"] >= 0.98
    assert v["max_abs_logit_diff"] > 0  # the cache really is quantised
    assert manifest["kv_cache"]["layout"] == "kivi" and manifest["kv_cache"]["bits"] == bits

    m = load(path)
    ids = m.encode((DATA_DIR / "stream.txt").read_text())[:2048]
    m.reset()
    m.prefill(ids[:1024])
    at_1024 = m.kv_bytes
    m.prefill(ids[1024:2048])
    per_token = (m.kv_bytes - at_1024) / 1024
    fp32_per_token = 2 * 6 * 2 * 32 * 4
    ratio = per_token / fp32_per_token
    print(f"int{bits}: {per_token:.1f} bytes/token = {ratio:.3f}x fp32")
    assert ratio <= (0.27 if bits == 8 else 0.15)
    # generation runs on the compressed cache: it holds the prompt and every decoded token, and the
    # same seed gives the same text
    text = m.generate("def main(argv):", max_new_tokens=24, seed=0)
    stats = m.last_stats
    assert 0 < stats["new_tokens"] <= 24 and m.cache.length == stats["prompt_tokens"] + stats["new_tokens"]
    assert text == m.generate("def main(argv):", max_new_tokens=24, seed=0)


def test_quantizer_round_trip_error_is_bounded():
    from optc.runtime.cache.kivi import dequantize, quantize

    x = np.random.default_rng(0).standard_normal((1, 2, 64, 32)).astype(np.float32)
    x[..., 5] *= 20  # an outlier channel: per-channel key scales keep it from swamping the others
    for bits, sym in ((8, True), (4, False)):
        q, s, z = quantize(x, bits, sym, axis=2)
        err = np.abs(dequantize(q, s, z, bits, sym) - x)
        step = s.astype(np.float32)
        assert (err <= step * 0.51 + 1e-6).all(), bits


@pytest.mark.parametrize("opts, needle", [
    ("bits: 3", "passes[0].bits: Input should be 4 or 8"),
    ("bits: 8\n    group_size: 0", "passes[0].group_size: Input should be greater than 0"),
    ("bits: 8\n    group_size: 24", "passes[0].group_size: 24 does not divide head_dim 32"),
    ("bits: 8\n    residual: -1", "passes[0].residual:"),
])
def test_bad_kv_configs(tmp_path, exported_decoder, capsys, opts, needle):
    err = config_error(tmp_path, exported_decoder, f"passes:\n  - name: kv_cache_compression\n    {opts}\n", capsys)
    assert needle in err, err


# ------------------------------------------------------------------------------- eviction --
def test_eviction_structure(exported_decoder):
    from optc.canonical import canonicalize
    from optc.ir import load_model, to_checked_proto
    from optc.passes.base import PassContext
    from optc.passes.kv_cache import H2OEviction, H2OEvictionOptions

    model = load_model(exported_decoder)
    ctx = PassContext(decoder=canonicalize(model))
    opts = H2OEvictionOptions(ratio=0.5)
    assert H2OEviction(opts, ctx)(model).modified
    outs = {v.name for v in model.graph.outputs}
    assert {f"optc.attn.{i}" for i in range(6)} <= outs
    attn = [n for n in model.graph if n.op_type == "Attention"]
    assert len(attn) == 6 and all(n.attributes["qk_matmul_output_mode"].value == 3 for n in attn)
    assert ctx.runtime.kv_cache.to_dict()["policy"] == {"kind": "h2o", "sinks": 4, "recent": 32, "budget": None,
                                                          "ratio": 0.5, "score": "accumulated_attention"}
    to_checked_proto(model, "test")
    assert not H2OEviction(opts, ctx)(model).modified


@pytest.mark.slow
@pytest.mark.parametrize("ratio, budget", [(0.5, 0.03), (0.25, 0.05)])
def test_eviction_accuracy_and_bounded_cache(tmp_path, exported_decoder, ratio, budget):
    from optc.compile import compile_model
    from optc.registry import default_registry
    from optc.runtime import load

    cfg = parse_config({"passes": [{"name": "kv_cache_compression", "eviction": {"ratio": ratio}}],
                        "verify": {"max_perplexity_increase": budget}}, default_registry())
    manifest = compile_model(exported_decoder, tmp_path / "a", config=cfg, log=lambda *_: None)
    v = manifest["verification"]
    print(f"eviction {ratio:.0%}: perplexity {v['perplexity_increase']:+.3%}, top-1 {v['top1_agreement']:.2%}")
    assert 0 < v["perplexity_increase"] <= budget
    m = load(tmp_path / "a")
    ids = m.encode((DATA_DIR / "stream.txt").read_text())[:400]
    m.reset()
    m.prefill(ids[:100])
    for t in ids[100:]:
        m.decode(t)
    assert m.cache.length == int(np.ceil(ratio * 400))
    assert m.kv_bytes == 2 * 6 * 2 * 32 * 4 * m.cache.length


def test_h2o_keeps_the_most_attended_tokens():
    from optc.runtime.cache import H2OCache

    from optc.runtime.manifest import H2OPolicy

    c = H2OCache(1, 1, 2, policy=H2OPolicy(sinks=1, recent=1, budget=4, ratio=None))
    keys = np.arange(6, dtype=np.float32).reshape(1, 1, 6, 1).repeat(2, axis=3)
    c.append([keys], [keys])
    probs = np.array([0.0, 0.1, 0.5, 0.05, 0.3, 0.05], np.float32).reshape(1, 1, 1, 6)
    c.observe([probs])
    c.enforce_budget(tokens_seen=6)
    # sink 0 and recent 5 stay; of the middle 1..4 the two most attended (2 and 4) stay
    assert c.past(0)[0][0, 0, :, 0].tolist() == [0.0, 2.0, 4.0, 5.0]


@pytest.mark.parametrize("opts, needle", [
    ("eviction: {budget: 30}", "passes[0].eviction.budget: Value error, budget (30) must exceed sinks + recent (36)"),
    ("eviction: {budget: 100, ratio: 0.5}", "passes[0].eviction: Value error, give exactly one of budget"),
    ("eviction: {ratio: 1.5}", "passes[0].eviction.ratio: Input should be less than 1"),
    ("eviction: {ratio: 0.5, score: random}", "passes[0].eviction.score:"),
    ("bits: 8\n    eviction: {ratio: 0.5}", "passes[0] (kv_cache_compression): its kv_quantize and h2o_eviction parts "
                                            "cannot be combined: eviction over a quantised cache is not supported yet"),
    ("symmetric: true", "passes[0]: Value error, set bits (quantisation), eviction, or both"),
])
def test_bad_eviction_configs(tmp_path, exported_decoder, capsys, opts, needle):
    err = config_error(tmp_path, exported_decoder, f"passes:\n  - name: kv_cache_compression\n    {opts}\n", capsys)
    assert needle in err, err


def test_quantised_cache_evicts_across_store_and_residual():
    from optc.runtime.cache.kivi import QuantizedKVCache, dequantize

    c = QuantizedKVCache(1, 1, 4, bits=8, group_size=2, residual=1, symmetric=True, key_quant="per_token")
    tokens = np.arange(1, 8, dtype=np.float32)[None, None, :, None].repeat(4, axis=3)  # token t holds t
    c.append([tokens], [tokens])
    assert c.length == 7 and c.q[(0, "key")].length == 6  # 3 groups stored, 1 token in the residual
    c.evict(start=1, count=4)  # keep tokens 1, 6, 7
    feeds = c.feeds()
    stored = dequantize(feeds["past_key_values.0.key.q"], np.repeat(feeds["past_key_values.0.key.scale"], 2, -1),
                        None, 8, True)
    kept = np.concatenate([stored, feeds["past_key_values.0.key.residual"]], axis=2)[0, 0, :, 0]
    np.testing.assert_allclose(kept, [1, 6, 7], rtol=0.01)
    assert c.length == 3
