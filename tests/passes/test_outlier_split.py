"""outlier_split: W8A8 QDQ MatMuls with calibrated activation-outlier channels computed in float."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optc.config import parse_config
from optc.passes.quant.outlier_split import (ACTIVATION_ZERO_POINT, OutlierSplit, OutlierSplitOptions,
                                             outlier_channels, quantize_weight, simulate)
from optc.runtime.manifest import FLOAT_BRANCH_KEY

from conftest import DECODER_DIR, config_error, run_cli

TOKENIZER = DECODER_DIR / "tokenizer.json"
VOCAB, HIDDEN, FFN = 4096, 64, 96
OUTLIERS = [3, 17, 40]  # hidden channels given large activations


def _tiny_model(seed: int = 0) -> ir.Model:
    """input_ids -> Gather(embedding) -> MatMul(W1) -> Relu -> MatMul(W2) -> logits, with three
    embedding channels 20x larger than the rest (the outliers), and a second MatMul (W3) reading
    the same activation as W1."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32) * 0.5
    emb[:, OUTLIERS] *= 20
    w1 = (rng.standard_normal((HIDDEN, FFN)) / np.sqrt(HIDDEN)).astype(np.float32)
    w3 = (rng.standard_normal((HIDDEN, FFN)) / np.sqrt(HIDDEN)).astype(np.float32)
    w2 = (rng.standard_normal((FFN, 32)) / np.sqrt(FFN)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w1"], ["h1"], name="linear1"),
             helper.make_node("MatMul", ["x", "w3"], ["h3"], name="linear3"),
             helper.make_node("Mul", ["h1", "h3"], ["h"], name="gate"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="linear2")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 32])],
        [numpy_helper.from_array(a, n) for a, n in ((emb, "embedding"), (w1, "w1"), (w2, "w2"), (w3, "w3"))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.serde.deserialize_model(proto)


def _split(model, **options):
    from optc.passes.base import PassContext

    opts = OutlierSplitOptions.model_validate({"calibration": {"samples": 4, "length": 64}, **options})
    ctx = PassContext(tokenizer=TOKENIZER, log=lambda *_: None)
    result = OutlierSplit(opts, ctx)(model)
    return result, ctx


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"input_ids": ids.reshape(1, -1)})[0][0]


IDS = np.random.default_rng(1).integers(0, VOCAB, 50)


def test_split_is_exact_when_every_channel_is_an_outlier():
    ref = _run(_tiny_model(), IDS)
    model = _tiny_model()
    result, _ = _split(model, outlier_fraction=1)
    assert result.modified
    ops = [n.op_type for n in model.graph]
    # the int8 branch is there (with all-zero weights), and the float branch carries everything
    assert ops.count("QuantizeLinear") == 2 and ops.count("Gather") == 3 and ops.count("Add") == 3
    np.testing.assert_array_equal(_run(model, IDS), ref)


def test_structure_qdq_form_and_a_second_run_matches_nothing():
    model = _tiny_model()
    result, ctx = _split(model, outlier_fraction=0.05)
    assert result.modified
    nodes = list(model.graph)
    q = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert len(q) == 2  # one per activation: x (read by linear1 and linear3) and r
    assert all(n.inputs[2].const_value.numpy().dtype == np.uint8 and
               int(n.inputs[2].const_value.numpy()) == ACTIVATION_ZERO_POINT for n in q)
    wdq = [n for n in nodes if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    assert len(wdq) == 3 and all(n.inputs[0].const_value.numpy().dtype == np.int8 for n in wdq)
    assert all(n.attributes["axis"].as_int() == 1 and n.inputs[1].shape[0] == n.inputs[0].shape[1] for n in wdq)
    # no float [K, N] weight is left: only the outlier rows
    floats = [v for v in model.graph.initializers.values() if v.const_value.numpy().dtype == np.float32
              and v.const_value.numpy().ndim == 2 and v.name != "embedding"]
    assert floats and all(v.name.endswith(".outlier_rows") for v in floats)
    # the calibrated outliers of x are the planted channels (top 5% of 64 = 4 channels)
    layers = ctx.reports["outlier_split"][0]["layers"]
    x_entry = next(e for e in layers if e["input"] == "x")
    assert set(OUTLIERS) <= set(x_entry["outlier_channels"]) and len(x_entry["outlier_channels"]) == 4
    assert x_entry["outlier_range_share"] > 0.8
    assert [m["node"] for m in x_entry["matmuls"]] == ["linear1", "linear3"]
    # a second run finds no float MatMul to quantise (the outlier branches are marked)
    again, _ = _split(model, outlier_fraction=0.05)
    assert not again.modified


@pytest.mark.parametrize("activations", ["per_tensor", "per_token"])
def test_split_beats_naive_w8a8_and_the_graph_computes_what_the_report_simulates(activations):
    ref = _run(_tiny_model(), IDS)
    errors = {}
    for label, frac in (("naive", 0), ("split", 0.05)):
        model = _tiny_model()
        _, ctx = _split(model, outlier_fraction=frac, activations=activations)
        got = _run(model, IDS)
        errors[label] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        report = ctx.reports["outlier_split"][0]["layers"]
        x = next(e for e in report if e["input"] == "x")
        m = x["matmuls"][0]
        assert (m["rel_error_split"] < m["rel_error_naive"] / 3) if frac else m["rel_error_split"] == m["rel_error_naive"]
    assert errors["split"] < errors["naive"] / 2, errors
    assert errors["split"] < 0.02, errors

    # the report's numpy simulation is what ONNX Runtime computes for one MatMul
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((7, HIDDEN)).astype(np.float32)
    xs[:, OUTLIERS] *= 30
    w = rng.standard_normal((HIDDEN, 16)).astype(np.float32)
    outl = np.array([3, 17], np.int64)
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["input_ids_f", "w"], ["logits"], name="mm")], "one",
                          [helper.make_tensor_value_info("input_ids_f", TensorProto.FLOAT, [7, HIDDEN])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [7, 16])],
                          [numpy_helper.from_array(w, "w")])
    one = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]))
    sa = np.float32(np.abs(np.delete(xs, outl, axis=1)).max() / 127)
    sim = simulate(xs, w, outl, None if activations == "per_token" else sa)
    import onnxruntime as ort

    # build the rewritten graph directly with the pass's builders (calibration replaced by the rows' absmax)
    p = OutlierSplit(OutlierSplitOptions(activations=activations), None)
    p._taken = set()
    a = one.graph.inputs[0]
    shared = p._activation_nodes(one.graph, a, HIDDEN, outl, sa)
    mm = next(n for n in one.graph if n.op_type == "MatMul")
    p._rewrite(one.graph, mm, w, "w", outl, shared)
    proto = ir.serde.serialize_model(one)
    onnx.checker.check_model(proto, full_check=True)
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = s.run(None, {"input_ids_f": xs})[0]
    np.testing.assert_allclose(got, sim, rtol=1e-4, atol=1e-4 * np.abs(sim).max())


def test_quantize_outputs_makes_whole_qdq_units():
    """With quantize_outputs every int8 MatMul is DQ -> MatMul -> Q (what QNN's HTP runs in int8),
    and the result stays within one output step or so of the split without it."""
    ref = _run(_tiny_model(), IDS)
    plain = _tiny_model()
    _split(plain, outlier_fraction=0.05)
    model = _tiny_model()
    _split(model, outlier_fraction=0.05, quantize_outputs=True)
    mms = [n for n in model.graph if n.op_type == "MatMul" and n.name.endswith("/int8_matmul")]
    assert len(mms) == 3
    for mm in mms:
        (use,) = [u for u, _ in mm.outputs[0].uses()]
        assert use.op_type == "QuantizeLinear" and all(v.producer().op_type == "DequantizeLinear" for v in mm.inputs)
    a, b = _run(plain, IDS), _run(model, IDS)
    assert np.linalg.norm(b - ref) / np.linalg.norm(ref) < 0.05
    assert np.abs(a - b).max() < 0.05 * np.abs(ref).max()


def test_min_range_share_splits_only_activations_whose_outliers_take_that_much_range():
    """x's planted outliers take > 80% of its range and stay split; r's top channels take less than
    min_range_share of its range, so r's MatMul is naive W8A8 (no Gather, no float branch), and the
    report says which channels were kept in int8."""
    full, ctx_full = _split(_tiny_model(), outlier_fraction=0.05)
    shares = {e["input"]: e["outlier_range_share"] for e in ctx_full.reports["outlier_split"][0]["layers"]}
    assert shares["x"] > 0.8 and shares["r"] < 0.8
    model = _tiny_model()
    _, ctx = _split(model, outlier_fraction=0.05, min_range_share=0.8)
    layers = {e["input"]: e for e in ctx.reports["outlier_split"][0]["layers"]}
    assert layers["x"]["outlier_channels"] and "kept_in_int8" not in layers["x"]
    assert layers["r"]["outlier_channels"] == [] and len(layers["r"]["kept_in_int8"]) == 5
    assert layers["r"]["matmuls"][0]["rel_error_split"] == layers["r"]["matmuls"][0]["rel_error_naive"]
    ops = [n.op_type for n in model.graph]
    assert ops.count("Gather") == 2 and ops.count("Add") == 2  # embedding + x's outliers; linear1, linear3
    ref = _run(_tiny_model(), IDS)
    naive, _ = _split(_tiny_model(), outlier_fraction=0)
    err = {label: np.linalg.norm(_run(m, IDS) - ref) / np.linalg.norm(ref)
           for label, m in (("full", full.model), ("partial", model), ("naive", naive.model))}
    assert err["full"] < err["partial"] < err["naive"], err


@pytest.mark.parametrize("fraction", [0.05, 0])
def test_onnxruntime_lowering_stacks_matmuls_sharing_an_input_exactly(fraction):
    """backends/onnxruntime_int8.py: linear1 and linear3 read x, so their int8 MatMuls (and outlier
    branches) become one, split back by columns; ONNX Runtime then runs one MatMulIntegerToFloat
    fewer, and the logits are those of the unstacked graph."""
    import onnxruntime as ort

    from optc.backends import onnxruntime_int8

    model = _tiny_model()
    _split(model, outlier_fraction=fraction)
    before = _run(model, IDS)
    assert onnxruntime_int8.lower(model, log=lambda *_: None) == 1
    nodes = list(model.graph)
    branches = [n for n in nodes if FLOAT_BRANCH_KEY in n.metadata_props]
    assert [n.op_type for n in nodes].count("Split") == 1 and len(branches) == (2 if fraction else 0)
    assert sum(n.name.endswith("/stacked_int8_matmul") for n in nodes) == 1
    np.testing.assert_allclose(_run(model, IDS), before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(Path(tempfile.mkdtemp()) / "optimized.onnx")
    ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert fused.count("MatMulIntegerToFloat") == 2 and fused.count("MatMul") == (2 if fraction else 0)
    # nothing left to stack; whole QDQ units (quantize_outputs, for NPUs) and float graphs are left alone
    assert onnxruntime_int8.lower(model, log=lambda *_: None) == 0
    for graph in (_tiny_model(), _split(_tiny_model(), outlier_fraction=0.05, quantize_outputs=True)[0].model):
        assert onnxruntime_int8.lower(graph, log=lambda *_: None) == 0


def test_selection_and_weight_codes():
    absmax = np.array([1.0, 9.0, 0.5, 7.0, 6.0])
    assert outlier_channels(absmax, 6.0, None).tolist() == [1, 3]           # LLM.int8()'s threshold: > 6
    assert outlier_channels(np.arange(300.0), None, None).tolist() == [297, 298, 299]  # default: top 1%
    assert outlier_channels(absmax, 0.6, None).tolist() == [0, 1, 3, 4]
    assert outlier_channels(absmax, None, 0.4).tolist() == [1, 3]           # top ceil(0.4 * 5) = 2
    assert outlier_channels(absmax, None, 0.0).tolist() == []
    assert outlier_channels(absmax, None, 1.0).tolist() == [0, 1, 2, 3, 4]
    w = np.array([[1.0, -2.0], [100.0, 0.0], [-0.5, 1.0]], np.float32)
    codes, scale = quantize_weight(w, np.array([1]))
    assert codes[1].tolist() == [0, 0]                                       # the outlier row is not in int8
    assert scale.tolist() == pytest.approx([1 / 127, 2 / 127])              # scales from the other rows
    assert codes[0].tolist() == [127, -127] and codes[2].tolist() == [-64, 64]


def test_skip_and_nothing_to_do():
    from optc.passes.base import PassConfigError

    model = _tiny_model()
    result, _ = _split(model, outlier_fraction=0.05, skip=["lm_head"])
    assert result.modified and any(n.op_type == "MatMul" and n.name == "linear2" for n in model.graph)
    with pytest.raises(PassConfigError, match="'nope\\*' matches no constant-weight float MatMul"):
        _split(_tiny_model(), skip=["nope*"])
    model = _tiny_model()
    result, _ = _split(model, skip=["linear*"])
    assert not result.modified and [n.op_type for n in model.graph].count("QuantizeLinear") == 0


def test_missing_tokenizer_and_unknown_input_are_one_line_errors():
    from optc.errors import OptcError
    from optc.passes.base import PassContext

    with pytest.raises(OptcError, match="calibration needs a tokenizer"):
        OutlierSplit(OutlierSplitOptions(), PassContext(log=lambda *_: None))(_tiny_model())
    model = _tiny_model()
    model.graph.inputs.append(ir.Value(name="mystery", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1])))
    with pytest.raises(OptcError, match="cannot feed graph input 'mystery'"):
        _split(model)


@pytest.mark.parametrize("options,message", [
    ("outlier_threshold: 6\n    outlier_fraction: 0.01", "passes[0]: Value error, give outlier_threshold or "
                                                          "outlier_fraction, not both"),
    ("outlier_fraction: 1.5", "passes[0].outlier_fraction: Input should be less than or equal to 1"),
    ("outlier_threshold: -1", "passes[0].outlier_threshold: Input should be greater than or equal to 0"),
    ("weights: int4", "passes[0].weights: Input should be 'int8'"),
    ("activations: per_channel", "passes[0].activations: Input should be 'per_tensor' or 'per_token'"),
    ("calibration: {samples: 0}", "passes[0].calibration.samples: Input should be greater than or equal to 1"),
    ("calibration: {samples: 2.0}", "passes[0].calibration.samples: Value error, expected an integer"),
    ("calibration: {txt: a.jsonl}", "passes[0].calibration.txt: unknown key"),
    ("skip: ['']", "passes[0].skip: Value error, an empty entry matches nothing"),
    ("threshold: 6", "passes[0].threshold: unknown key"),
    ("min_range_share: 1", "passes[0].min_range_share: Input should be less than 1"),
    ("activations: per_token\n    quantize_outputs: true", "passes[0]: Value error, quantize_outputs needs "
                                                           "activations: per_tensor"),
])
def test_bad_options_are_one_line(tmp_path, capsys, options, message):
    err = config_error(tmp_path, tmp_path / "model.onnx", f"passes:\n  - name: outlier_split\n    {options}\n", capsys)
    assert message in err, err


def test_options_normal_form_budget_and_conflict_with_weight_quant(tmp_path, exported_decoder, capsys):
    from optc.registry import default_registry

    reg = default_registry()
    cfg = parse_config({"passes": [{"name": "outlier_split", "outlier_fraction": 0.01}]}, reg)
    assert cfg.to_dict()["passes"] == [{
        "name": "outlier_split", "allow_noop": False, "weights": "int8", "activations": "per_tensor",
        "outlier_threshold": None, "outlier_fraction": 0.01, "min_range_share": 0.0, "skip": [],
        "quantize_outputs": False,
        "activation_bits": 8, "calibration": {"text": None, "samples": 16, "length": 256}}]
    assert reg.get("outlier_split").lossy
    assert reg.get("outlier_split").declared_perplexity_budget(cfg.passes[0].options) == 0.02
    err = config_error(tmp_path, exported_decoder, "passes:\n  - name: outlier_split\n  - name: weight_quant\n"
                                                   "    bits: 8\n", capsys)
    assert "passes[0] (outlier_split) and passes[1] (weight_quant) cannot be combined: both quantise the " \
           "MatMul weights" in err, err


def test_configured_but_matched_nothing_fails_the_compile(tmp_path, exported_decoder, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes:\n  - name: outlier_split\n    skip: ['*']\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "passes[0] (outlier_split) matched nothing in the graph" in err
    cfg.write_text("passes:\n  - name: outlier_split\n    calibration: {text: no/such.jsonl}\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "passes[0].calibration.text: no/such.jsonl: no such file" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_decoder_compiles_within_budget_and_reports_per_layer(tmp_path, exported_decoder):
    """pycoder-5m, every linear layer W8A8 with the top 1% of channels split off: verified by the
    compile (its declared budget +2%), and the manifest holds the per-layer report."""
    import json

    from optc.compile import compile_model
    from optc.registry import default_registry

    cfg = parse_config({"passes": [{"name": "outlier_split", "outlier_fraction": 0.01,
                                    "calibration": {"samples": 8}}],
                        "verify": {"min_top1_agreement": 0.9}}, default_registry())
    out = tmp_path / "art"
    logs = []
    compile_model(exported_decoder, out, config=cfg, log=logs.append)
    man = json.loads((out / "manifest.json").read_text())
    # the ONNX Runtime backend stacked Q/K/V (into GQA's packed query) and gate/up of every layer
    assert any("int8 MatMuls (outlier_split) stacked into 12 by shared input (6 as GroupQueryAttention" in line
               for line in logs), [line for line in logs if "onnxruntime" in line]
    assert man["verification"]["perplexity_increase"] <= 0.02
    layers = man["pass_reports"]["outlier_split"][0]["layers"]
    assert sum(len(e["matmuls"]) for e in layers) == 6 * 7 + 1
    assert all(len(e["outlier_channels"]) == int(np.ceil(0.01 * e["channels"])) for e in layers)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == len(layers)


@pytest.mark.npu
def test_qdq_matmuls_run_on_qnn_htp_with_no_cpu_fallback(tmp_path):
    """The int8 part in whole QDQ units (quantize_outputs) runs on QNN's HTP backend (the x86
    simulator) with CPU fallback disabled: every node on QNN (counted from ORT's profile), and the
    result equals ONNX Runtime's CPU EP on the same graph to within one output step."""
    qnn = pytest.importorskip("onnxruntime_qnn")
    import json

    import onnxruntime as ort
    from onnx.utils import Extractor

    model = _tiny_model()
    _split(model, outlier_fraction=0, quantize_outputs=True)
    proto = ir.serde.serialize_model(model)
    sub = Extractor(proto).extract_model(["x"], ["h1", "h3"])  # the MatMuls reading x: QDQ units only
    for v in list(sub.graph.input) + list(sub.graph.output):
        dims = v.type.tensor_type.shape.dim
        for d, n in zip(dims, (1, 8, HIDDEN if v.name == "x" else FFN)):
            d.ClearField("dim_param")
            d.dim_value = n
    assert {n.op_type for n in sub.graph.node} == {"QuantizeLinear", "DequantizeLinear", "MatMul"}
    try:
        ort.register_execution_provider_library("QNNExecutionProvider", qnn.get_library_path())
    except Exception as e:  # registered already by an earlier test in this process
        assert "already registered" in str(e).lower(), e
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    so.log_severity_level = 3
    so.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path()})
    s = ort.InferenceSession(sub.SerializeToString(), so)
    x = np.random.default_rng(3).standard_normal((1, 8, HIDDEN)).astype(np.float32) * 0.5
    x[..., OUTLIERS] *= 20
    got = s.run(None, {"x": x})
    events = json.loads(open(s.end_profiling()).read())
    providers = [e["args"].get("provider") for e in events if e.get("cat") == "Node" and "provider" in e.get("args", {})]
    assert providers and set(providers) == {"QNNExecutionProvider"}, set(providers)
    ref = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    steps = {i.name: numpy_helper_scale(sub, i.name) for i in sub.graph.output}
    for name, a, b in zip(steps, got, ref):
        assert np.abs(a - b).max() <= 1.01 * steps[name], (name, np.abs(a - b).max(), steps[name])


def numpy_helper_scale(proto, output: str) -> float:
    """The output step of the DequantizeLinear producing `output`."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if output in n.output)
    return float(numpy_helper.to_array(inits[node.input[1]]))
