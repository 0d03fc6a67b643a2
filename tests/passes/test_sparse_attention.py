"""sparse_attention sink_window: StreamingLLM attention sinks + window, positions by cache slot."""

from __future__ import annotations

import numpy as np
import pytest

from optc.config import parse_config

from conftest import DATA_DIR, config_error, run_cli


def _compile(src, out, passes, verify=True):
    from optc.compile import compile_model
    from optc.registry import default_registry

    cfg = parse_config({"passes": passes}, default_registry())
    return compile_model(src, out, config=cfg, verify=verify, log=lambda *_: None)


SW = {"name": "sparse_attention", "mode": "sink_window"}


def test_structure_and_idempotence(exported_decoder):
    from optc.canonical import canonicalize
    from optc.ir import load_model, to_checked_proto
    from optc.passes.base import PassContext
    from optc.passes.attention import SinkWindow, SinkWindowOptions
    from optc.runtime.manifest import KEY_POSITION_IDS as KEY_POSITIONS

    model = load_model(exported_decoder)
    ctx = PassContext(decoder=canonicalize(model))
    opts = SinkWindowOptions(sinks=4, window=60)
    assert SinkWindow(opts, ctx)(model).modified
    g = model.graph
    assert KEY_POSITIONS in {v.name for v in g.inputs}
    outputs = {v.name: v for v in g.outputs}
    for i in range(6):
        new_key = outputs[f"present.{i}.key"].producer().inputs[1]
        assert new_key.producer().op_type != "RotaryEmbedding"  # the cache holds keys before RoPE
    attn = [n for n in g if n.op_type == "Attention"]
    assert all(n.inputs[1].producer().op_type == "RotaryEmbedding" for n in attn)  # rotated by cache slot
    assert sum(n.op_type == "RotaryEmbedding" for n in g) == 12  # 6 query + 6 whole-cache key rotations
    assert ctx.runtime.kv_cache.to_dict() == {"layout": "float", "positions": "cache_slot",
                                                "policy": {"kind": "sink_window", "sinks": 4, "window": 60}}
    to_checked_proto(model, "test")
    assert not SinkWindow(opts, ctx)(model).modified


@pytest.mark.slow
def test_exact_while_nothing_is_evicted(tmp_path, exported_decoder):
    """Up to sinks + window tokens nothing is evicted, so slot positions = text positions and the
    rewritten graph (pre-RoPE cache, re-rotation every step) must equal the dense model."""
    manifest = _compile(exported_decoder, tmp_path / "a", [dict(SW, sinks=4, window=252)])
    v = manifest["verification"]
    assert v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] <= 1e-4


@pytest.mark.slow
def test_cache_stays_bounded_and_generation_stays_sane(tmp_path, exported_decoder):
    from optc.runtime import load

    _compile(exported_decoder, tmp_path / "a", [dict(SW, sinks=4, window=60)], verify=False)
    m = load(tmp_path / "a")
    # the fused ONNX Runtime path keeps up to `slack` rows that left the window in its buffer
    # (hidden from attention) and compacts them in batches (runtime/cache/window.py)
    rows = 64 + (m._window.slack if m._window is not None else 0)
    ids = m.encode((DATA_DIR / "stream.txt").read_text())[:600]
    m.reset()
    logits = m.prefill(ids[:200])  # chunked: 200 > window
    assert m.cache.length <= rows
    nll = []
    for t in ids[200:]:
        x = logits.astype(np.float64)
        nll.append(np.log(np.exp(x - x.max()).sum()) + x.max() - x[t])
        logits = m.decode(t)
        assert m.cache.length <= rows
    assert 2 * 6 * 2 * 32 * 4 * 64 <= m.kv_bytes <= 2 * 6 * 2 * 32 * 4 * rows
    ppl = float(np.exp(np.mean(nll)))
    print(f"perplexity over 400 streamed tokens with a 64-token cache: {ppl:.1f}")
    assert ppl < 300  # the dense model is ~90 on held-out text; a broken cache gives thousands
    m.generate("def main(argv):", max_new_tokens=120, seed=0)  # longer than the cache
    assert m.last_stats["prompt_tokens"] + m.last_stats["new_tokens"] > 64 and 64 <= m.cache.length <= rows


@pytest.mark.parametrize("opts, needle", [
    ("window: 0", "passes[0].window: Input should be greater than 0"),
    ("sinks: 300", "passes[0].sinks: Value error, sinks (300) must not exceed window (252)"),
    ("sinks: -1", "passes[0].sinks: Input should be greater than or equal to 0"),
])
def test_bad_sparse_configs(tmp_path, exported_decoder, capsys, opts, needle):
    err = config_error(tmp_path, exported_decoder,
                       f"passes:\n  - name: sparse_attention\n    mode: sink_window\n    {opts}\n", capsys)
    assert needle in err, err


def test_unknown_mode_is_rejected_not_ignored(tmp_path, exported_decoder, capsys):
    err = config_error(tmp_path, exported_decoder, "passes:\n  - name: sparse_attention\n    mode: dilated\n",
                       capsys)
    assert "passes[0].mode: Input should be 'sink_window' or 'block_sparse'" in err, err


# KIVI stores a group once residual + group_size tokens are cached (32 + 64 by default): a sink_window
# cache of 4 + 60 tokens never gets there, so the "int8" cache would stay float, silently
@pytest.mark.parametrize("kv_first", [False, True])
def test_kivi_that_a_sink_window_cache_never_fills_is_refused(tmp_path, exported_decoder, capsys, kv_first):
    import yaml

    kv = {"name": "kv_cache_compression", "bits": 8, "key_quant": "per_token"}
    sw = dict(SW, sinks=4, window=60)
    passes = [kv, sw] if kv_first else [sw, kv]
    err = config_error(tmp_path, exported_decoder, yaml.safe_dump({"passes": passes}), capsys)
    first, second = ("kv_cache_compression -> kv_quantize", "sparse_attention -> sink_window")[::1 if kv_first else -1]
    assert (f"passes[0] ({first}) and passes[1] ({second}) cannot be combined: the cache never holds more than 64 "
            f"tokens, but kv_quantize acts only once 96 are cached") in err, err
    # groups that fit in the window pass the check (residual 16 + group 32 <= 64)
    from optc.config import parse_config
    from optc.pipeline import check_contracts, plan
    from optc.registry import default_registry

    reg = default_registry()
    fits = [dict(kv, group_size=32, residual=16), sw]
    check_contracts(plan(parse_config({"passes": fits}, reg), reg))


@pytest.mark.parametrize("passes, needle", [
    ([dict(SW), {"name": "kv_cache_compression", "bits": 8}],
     "passes[0] (sparse_attention -> sink_window) and passes[1] (kv_cache_compression -> kv_quantize) cannot be "
     "combined: one evicts single tokens, which the other's per-channel key groups cannot give up"),
    ([{"name": "kv_cache_compression", "bits": 8}, dict(SW)],
     "passes[0] (kv_cache_compression -> kv_quantize) and passes[1] (sparse_attention -> sink_window) cannot be "
     "combined: one evicts single tokens, which the other's per-channel key groups cannot give up"),
    ([{"name": "kv_cache_compression", "eviction": {"ratio": 0.5}}, dict(SW)],
     "cannot be combined: both set the cache's eviction policy"),
    ([dict(SW, mode="block_sparse"), {"name": "kv_cache_compression", "eviction": {"ratio": 0.5}}],
     "passes[0] (sparse_attention -> block_sparse) and passes[1] (kv_cache_compression -> h2o_eviction) cannot be "
     "combined: block_sparse prefill cannot report the attention scores that H2O eviction needs"),
    ([{"name": "kv_cache_compression", "eviction": {"ratio": 0.5}}, dict(SW, mode="block_sparse")],
     "passes[0] (kv_cache_compression -> h2o_eviction) and passes[1] (sparse_attention -> block_sparse) cannot be "
     "combined: block_sparse prefill cannot report the attention scores that H2O eviction needs"),
])
def test_combinations_not_supported_yet_fail_clearly(tmp_path, exported_decoder, capsys, passes, needle):
    import yaml

    err = config_error(tmp_path, exported_decoder, yaml.safe_dump({"passes": passes}), capsys)
    assert needle in err, err


@pytest.mark.slow
def test_sink_window_composes_with_lossless_passes(tmp_path, exported_decoder):
    manifest = _compile(exported_decoder, tmp_path / "a", [
        {"name": "eliminate_common_subexpressions"}, dict(SW, sinks=4, window=252), {"name": "remove_unused",
                                                                                    "allow_noop": True}])
    assert manifest["verification"]["top1_agreement"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sparse_first", "kv_first"])
def test_sink_window_composes_with_quantised_cache(tmp_path, exported_decoder, order):
    """sink_window + int8 KV (per-token keys) in either order: bounded, compressed, as accurate
    as sink_window alone within quantisation noise."""
    from optc.runtime import load

    sw = dict(SW, sinks=4, window=60)
    kv = {"name": "kv_cache_compression", "bits": 8, "key_quant": "per_token", "group_size": 32, "residual": 16}
    manifest = _compile(exported_decoder, tmp_path / "a", [sw, kv] if order == "sparse_first" else [kv, sw])
    assert manifest["kv_cache"]["layout"] == "kivi" and manifest["kv_cache"]["policy"]["kind"] == "sink_window"
    alone = _compile(exported_decoder, tmp_path / "b", [sw])["verification"]
    v = manifest["verification"]
    assert abs(v["perplexity_increase"] - alone["perplexity_increase"]) < 0.002
    assert v["top1_agreement"] >= alone["top1_agreement"] - 0.01
    m = load(tmp_path / "a")
    ids = m.encode((DATA_DIR / "stream.txt").read_text())[:400]
    m.reset()
    m.prefill(ids[:150])
    for t in ids[150:]:
        m.decode(t)
        assert m.cache.length <= 64
    assert m.kv_bytes < 0.45 * 2 * 6 * 2 * 32 * 4 * 64  # int8 store + a small fp32 residual


# --------------------------------------------------------------------------- block_sparse --
BS = {"name": "sparse_attention", "mode": "block_sparse"}


def _prefill_logits(artifact, ids):
    from optc.runtime import load

    m = load(artifact)
    m.reset()
    return m.prefill(np.asarray(ids), all_logits=True)


def test_block_sparse_structure(exported_decoder):
    from optc.canonical import canonicalize
    from optc.ir import load_model, to_checked_proto
    from optc.passes.base import PassContext
    from optc.passes.attention import BlockSparse, BlockSparseOptions

    model = load_model(exported_decoder)
    ctx = PassContext(decoder=canonicalize(model))
    opts = BlockSparseOptions(block_size=16, budget_blocks=4)
    assert BlockSparse(opts, ctx)(model).modified
    ifs = [n for n in model.graph if n.op_type == "If"]
    assert len(ifs) == 6 and not any(n.op_type == "Attention" for n in model.graph)
    then = ifs[0].attributes["then_branch"].value
    # dropped blocks are never computed: QK^T multiplies the queries by *gathered* key blocks only
    score_mm = [n for n in then if n.op_type == "MatMul" and n.inputs[1].producer().op_type == "Transpose"
                and n.inputs[1].producer().inputs[0].producer().op_type == "Reshape"
                and n.inputs[1].producer().inputs[0].producer().inputs[0].producer().op_type == "GatherND"]
    assert len(score_mm) == 1
    assert [n.op_type for n in ifs[0].attributes["else_branch"].value] == ["Attention"]
    to_checked_proto(model, "test")
    assert not BlockSparse(opts, ctx)(model).modified


@pytest.mark.slow
def test_block_sparse_with_every_block_selected_equals_dense(tmp_path, exported_decoder, identity_artifact):
    """budget >= number of blocks: the sparse branch must reproduce dense attention exactly,
    which checks its gather / causal-mask / padding arithmetic (250 tokens: not a block multiple)."""
    _compile(exported_decoder, tmp_path / "a", [dict(BS, block_size=16, budget_blocks=16)], verify=False)
    ids = __import__("optc.runtime", fromlist=["load"]).load(identity_artifact).encode(
        (DATA_DIR / "stream.txt").read_text())[:250]
    diff = np.abs(_prefill_logits(tmp_path / "a", ids) - _prefill_logits(identity_artifact, ids)).max()
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_block_sparse_prefill_accuracy(tmp_path, exported_decoder, identity_artifact):
    _compile(exported_decoder, tmp_path / "a", [dict(BS, block_size=16, budget_blocks=4)], verify=False)
    from optc.runtime import load

    ids = load(identity_artifact).encode((DATA_DIR / "stream.txt").read_text())[:256]
    sparse, dense = _prefill_logits(tmp_path / "a", ids), _prefill_logits(identity_artifact, ids)
    assert np.abs(sparse[:16] - dense[:16]).max() <= 1e-4  # the first block sees everything it may
    agree = (sparse.argmax(-1) == dense.argmax(-1)).mean()

    def ppl(lg):
        x = lg[:-1].astype(np.float64)
        lp = x - x.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        return np.exp(-lp[np.arange(len(ids) - 1), np.asarray(ids[1:])].mean())

    print(f"block_sparse 16x4 at 256 tokens: top-1 {agree:.2%}, perplexity {ppl(sparse) / ppl(dense) - 1:+.2%}")
    assert agree >= 0.85 and ppl(sparse) / ppl(dense) - 1 <= 0.03
    assert np.abs(sparse - dense).max() > 1e-3  # later blocks really were sparse


@pytest.mark.parametrize("opts, needle", [
    ("window: 100", "passes[0]: Value error, window does not apply to mode block_sparse"),
    ("budget_blocks: 2", "passes[0].budget_blocks: Value error, budget_blocks (2) must be at least"),
    ("block_size: 1", "passes[0].block_size: Input should be greater than 1"),
])
def test_bad_block_sparse_configs(tmp_path, exported_decoder, capsys, opts, needle):
    err = config_error(tmp_path, exported_decoder,
                       f"passes:\n  - name: sparse_attention\n    mode: block_sparse\n    {opts}\n", capsys)
    assert needle in err, err


@pytest.mark.slow
def test_block_sparse_composes_with_int8_cache(tmp_path, exported_decoder, identity_artifact):
    manifest = _compile(exported_decoder, tmp_path / "a", [dict(BS, block_size=16, budget_blocks=4),
                                                           {"name": "kv_cache_compression", "bits": 8}])
    assert manifest["kv_cache"]["layout"] == "kivi"
    v = manifest["verification"]
    # lossy pipelines are verified both ways; the prefill mode is where block_sparse shows
    assert [m["decode_tokens_per_prompt"] for m in v["modes"]] == [16, 224]
    assert v["modes"][1]["top1_agreement"] >= 0.99  # decode path: int8 noise only
    assert 0.85 <= v["top1_agreement"] == v["modes"][0]["top1_agreement"] < 0.99
    from optc.runtime import load

    ids = load(identity_artifact).encode((DATA_DIR / "stream.txt").read_text())[:256]
    sparse_only = tmp_path / "b"
    _compile(exported_decoder, sparse_only, [dict(BS, block_size=16, budget_blocks=4)], verify=False)
    # an empty cache holds nothing to quantise: prefill equals block_sparse alone
    assert np.abs(_prefill_logits(tmp_path / "a", ids) - _prefill_logits(sparse_only, ids)).max() <= 1e-4


@pytest.mark.slow
def test_verify_length_reaches_the_sparse_branch(tmp_path, exported_decoder, capsys):
    """256-token verification prompts are dense-equivalent for 64-token blocks; --verify-length
    512 makes compile-time verification see block_sparse's real cost."""
    import json

    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes:\n  - name: sparse_attention\n    mode: block_sparse\n    budget_blocks: 4\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "a", "--verify-length", "512"],
                             capsys)
    assert code == 0, err
    prefill_mode = json.loads((tmp_path / "a" / "manifest.json").read_text())["verification"]["modes"][0]
    assert prefill_mode["tokens"] == 8 * 512 and prefill_mode["top1_agreement"] < 1.0
