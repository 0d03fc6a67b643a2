"""weight_quant method: awq (activation-aware scales, 1/s folded into the op before each MatMul)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from optc.config import parse_config

from conftest import DECODER_DIR, config_error, run_cli

# a few short windows keep calibration to a second on pycoder-5m
FAST_CALIBRATION = {"samples": 3, "length": 64}


@pytest.mark.parametrize("options,message", [
    ("method: gptq", "passes[0].method: Input should be 'rtn' or 'awq'"),
    ("alphas: [0.5]", "passes[0]: Value error, alphas is an option of method: awq (method is rtn)"),
    ("calibration: {samples: 4}", "passes[0]: Value error, calibration is an option of method: awq (method is rtn)"),
    ("method: rtn\n    alphas: [0.5]", "alphas is an option of method: awq"),
    ("method: awq\n    alphas: []", "passes[0].alphas: Value error, an empty grid searches nothing"),
    ("method: awq\n    alphas: [0, 1.5]", "passes[0].alphas: Value error, each alpha must be in [0, 1], got 1.5"),
    ("method: awq\n    alphas: [0.5, 0.5]", "passes[0].alphas: Value error, an alpha is given twice"),
    ("method: awq\n    alphas: 0.5", "passes[0].alphas: Input should be a valid list"),
    ("method: awq\n    calibration: {bogus: 1}", "passes[0].calibration.bogus: unknown key"),
    ("method: awq\n    calibration: {samples: 0}", "passes[0].calibration.samples: Input should be greater than or "
                                                    "equal to 1"),
    ("method: awq\n    calibration: {samples: 2.0}", "passes[0].calibration.samples: Value error, expected an integer"),
    ("clip: true", "passes[0]: Value error, clip is an option of method: awq (method is rtn)"),
    ("method: awq\n    clip: maybe", "passes[0].clip: Input should be a valid boolean"),
    ("method: awq\n    clip_ratios: [1]", "passes[0].clip_ratios: unknown key"),
])
def test_bad_awq_options_are_one_line(tmp_path, capsys, options, message):
    err = config_error(tmp_path, tmp_path / "model.onnx",
                       f"passes:\n  - name: weight_quant\n    bits: 4\n    {options}\n", capsys)
    assert message in err, err


def test_normal_form_rtn_unchanged_awq_filled_in(capsys):
    from optc.registry import default_registry

    reg = default_registry()
    rtn = parse_config({"passes": [{"name": "weight_quant", "bits": 4, "method": "rtn"}]}, reg).to_dict()["passes"]
    # rtn records exactly the keys it had before awq existed (its artifacts stay byte-identical)
    assert rtn == [{"name": "weight_quant", "allow_noop": False, "bits": 4, "block_size": 32, "symmetric": False,
                    "accuracy_level": 4, "skip": []}]
    awq = parse_config({"passes": [{"name": "weight_quant", "bits": 4, "method": "awq"}]}, reg)
    d = awq.to_dict()["passes"][0]
    assert d["method"] == "awq" and d["alphas"] == [i / 20 for i in range(20)]
    assert d["calibration"] == {"text": None, "samples": 16, "length": 256} and d["clip"] is False
    # the normal form reads back as the same config
    assert parse_config(awq.to_dict(), reg).to_dict() == awq.to_dict()
    code, out, _ = run_cli(["passes"], capsys)
    block = out.split("weight_quant", 1)[1].split("\n\n")[0]
    assert code == 0 and "method: Literal['rtn', 'awq'] = 'rtn'" in block and "alphas:" in block
    assert "calibration: " in block and "awq only: text, samples, length" in block


def test_clip_search_never_worse_per_block_than_no_clip():
    """auto-clip picks, per block and column, the ratio with the least error of that block's part
    of the output; ratio 1.0 (no clip) is in the grid, so no block gets worse, and a weight with one
    far outlier per block gets clipped."""
    from optc.passes.quant import awq

    rng = np.random.default_rng(1)
    K, N, bs = 96, 8, 32
    x = rng.standard_normal((64, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[::bs] *= 12  # one outlier per block: round-to-nearest spends the range on it
    np.testing.assert_array_equal(awq.clip_to(w, np.ones((K // bs, N), np.float32), bs), w)
    ratios = awq.clip_search(x, w, bits=4, block_size=bs, symmetric=False)
    assert ratios.shape == (K // bs, N) and set(np.unique(ratios)) <= set(np.float32(awq.CLIP_RATIOS))

    def block_errors(q):
        d = (q - w).reshape(K // bs, bs, N)
        return np.sum(np.matmul(x.reshape(-1, K // bs, bs).transpose(1, 0, 2), d) ** 2, axis=1)

    plain = block_errors(awq.quantized(w, 4, bs, False))
    clipped = block_errors(awq.quantized(awq.clip_to(w, ratios, bs), 4, bs, False))
    assert np.all(clipped <= plain * (1 + 1e-6)) and clipped.sum() < plain.sum() and ratios.min() < 1


def _compile(model, out, passes, **kw):
    from optc.compile import compile_model
    from optc.registry import default_registry

    cfg = parse_config({"passes": passes}, default_registry())
    return compile_model(model, out, config=cfg, log=lambda *_: None, **kw)


def test_alpha_zero_is_rtn_byte_for_byte(tmp_path, exported_decoder):
    """s = mean|x|^0 = 1: the graph and weights are round-to-nearest's, byte for byte; the
    report says alpha 0 and no error change for every activation."""
    rtn = _compile(exported_decoder, tmp_path / "rtn", [{"name": "weight_quant", "bits": 4}], verify=False)
    awq = _compile(exported_decoder, tmp_path / "awq", [{"name": "weight_quant", "bits": 4, "method": "awq",
                                                         "alphas": [0], "calibration": FAST_CALIBRATION}],
                   verify=False)
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "rtn" / name).read_bytes() == (tmp_path / "awq" / name).read_bytes(), name
    assert "pass_reports" not in rtn
    (report,) = awq["pass_reports"]["weight_quant"]
    assert report["method"] == "awq" and len(report["groups"]) == 6 * 4 + 1  # qkv, o, gate/up, down; LM head
    for g in report["groups"]:
        assert g["alpha"] == 0 and g["fold"] == "none" and g["rel_error_awq"] == g["rel_error_rtn"] > 0, g


def _logits(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from optc.calibration import feeds_for

    s = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(["logits"], feeds_for(model.graph.inputs, ids))[0]


def _folded_in_float(exported_decoder, **options):
    """The canonical decoder with awq's 1/s folded and every scaled weight replaced by diag(s) W
    in float (no quantisation): it must compute what the original computes."""
    from optc.canonical import canonicalize
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.passes.quant import WeightQuant, WeightQuantOptions

    model = load_model(exported_decoder)
    ctx = PassContext(decoder=canonicalize(model), tokenizer=DECODER_DIR / "tokenizer.json", bos_token_id=0,
                      log=lambda *_: None)
    ids = np.array([0, 5, 77, 300, 12, 9, 41, 2048, 7, 7, 100, 3] * 4, np.int64)
    before = _logits(model, ids)
    p = WeightQuant(WeightQuantOptions(bits=4, method="awq", calibration=FAST_CALIBRATION, **options), ctx)
    todo = p.select(model.graph)
    scales = p.awq_scales(model, todo)
    for node, (source, transposed, _) in todo:
        if node in scales:
            w = source.const_value.numpy()
            w = (w.T if transposed else w) * scales[node][:, None]
            name = f"{source.name}.awq_float.{node.name}"
            v = ir.Value(name=name, shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(np.ascontiguousarray(w, np.float32), name=name))
            model.graph.register_initializer(v)
            node.replace_input_with(1, v)
    return before, _logits(model, ids), ctx.reports["weight_quant"][0], scales


def test_folded_scales_are_exact_in_float(exported_decoder):
    """RMSNorm weights, W_v's columns (o_proj's input, tied over GQA's query heads) and W_up's
    columns (down's input) take 1/s; with the weights only scaled, the logits are the original's."""
    before, after, report, scales = _folded_in_float(exported_decoder, alphas=[0.5])
    folds = [g["fold"] for g in report["groups"]]
    assert folds.count("norm") == 6 * 2 + 1 and folds.count("attention") == 6 and folds.count("matmul") == 6, folds
    assert all(not np.allclose(s, 1) for s in scales.values())  # every MatMul was scaled
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_mul_fallback_is_exact_in_float(exported_decoder):
    """An activation also read by a MatMul that stays float (k_proj of layer 0 skipped) cannot
    fold into the RMSNorm: the group gets Mul(x, 1/s), still exact."""
    before, after, report, _ = _folded_in_float(exported_decoder, alphas=[0.5], skip=["node_linear_1"])
    folds = [g["fold"] for g in report["groups"]]
    assert folds[0] == "mul" and folds.count("norm") == 6 * 2, folds
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_awq_int4_compiles_within_budget_and_is_deterministic(tmp_path, exported_decoder, capsys):
    """Through `optc compile` with verification (the declared +5% budget at block 32) and byte for
    byte the same artifact when compiled again."""
    import json

    cfg = tmp_path / "awq.yaml"
    cfg.write_text("passes:\n  - name: weight_quant\n    bits: 4\n    method: awq\n")
    for out in ("a", "b"):
        code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / out], capsys)
        assert code == 0, err
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    v = manifest["verification"]
    assert manifest["verify_budget"]["max_perplexity_increase"] == 0.05
    assert v["perplexity_increase"] <= 0.05 and v["top1_agreement"] >= 0.8, v
    groups = manifest["pass_reports"]["weight_quant"][0]["groups"]
    assert all(g["rel_error_awq"] <= g["rel_error_rtn"] for g in groups)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_awq_after_a_pass_that_adds_inputs_is_one_line(tmp_path, exported_decoder, capsys):
    """awq calibrates the graph as it stands: after sink_window (which adds key positions as an
    input) the compile stops in one line, and writes nothing."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes:\n  - name: sink_window\n    sinks: 4\n    window: 60\n"
                   "  - name: weight_quant\n    bits: 4\n    method: awq\n    alphas: [0.5]\n"
                   "    calibration: {samples: 2, length: 32}\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "calibration: cannot feed graph input 'optc.key_position_ids'" in err
    assert "run this pass before passes that add inputs" in err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_weight_quant_comes_before_layer_routing(tmp_path, exported_decoder):
    """After layer_routing a routable layer's MatMuls sit in an If branch, out of reach of the
    weight rewrite and of awq's calibration: that order is refused in one line; the other
    compiles, quantises every MatMul, and routes (o_proj as MatMulNBits on the residual path)."""
    import onnx

    from compile_helpers import compile_with, token_ids
    from optc.errors import OptcError
    from optc.pipeline import check_contracts, plan
    from optc.registry import default_registry

    reg = default_registry()
    awq = {"name": "weight_quant", "bits": 4, "method": "awq", "alphas": [0.25, 0.5],
           "calibration": {"samples": 2, "length": 32}}
    lr = {"name": "layer_routing", "max_skip": 1}
    for wq in (awq, {"name": "outlier_split"}):
        with pytest.raises(OptcError, match=r"passes\[1\] \((weight_quant|outlier_split)\) must come before passes"
                                            r"\[0\] \(layer_routing\) in the config: layer_routing moves") as e:
            check_contracts(plan(parse_config({"passes": [lr, wq]}, reg), reg))
        assert "\n" not in str(e.value)
    model = compile_with(exported_decoder, tmp_path / "a", [awq, lr])
    graph = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph

    def ops(g):
        return [n.op_type for n in g.node] + [o for n in g.node for a in n.attribute if a.g.node for o in ops(a.g)]

    assert "MatMul" not in ops(graph) and ops(graph).count("MatMulNBits") == 25  # (qkv and gate/up packed)
    model.prefill(token_ids(100, seed=2))
    assert len(model.skipped_layers) == 1
