"""weight_quant: weight-only int8/int4 MatMuls as ONNX Runtime's com.microsoft::MatMulNBits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from optc.config import parse_config
from optc.passes.quant.blockwise import dequantize_blockwise, pack, quantize_blockwise, unpack

from conftest import config_error, run_cli


def _reference_rounding(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """The rounded weights, block by block in plain loops (independent of the vectorised packer)."""
    K, N = w.shape
    out = np.zeros_like(w)
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    for n in range(N):
        for k0 in range(0, K, block):
            x = w[k0:k0 + block, n]
            if symmetric:
                scale = np.float32(x[np.argmax(np.abs(x))] / np.float32(-mid))
                zero = mid
            else:
                lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
                scale = np.float32((hi - lo) / np.float32(qmax))
                zero = int(np.clip(np.floor(-lo / scale + 0.5), 0, qmax)) if scale else 0
            inv = np.float32(1) / scale if scale else np.float32(0)
            v = x * inv + np.float32(zero)
            q = np.clip(np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)), 0, qmax)
            out[k0:k0 + block, n] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantised_blocks_are_the_rounded_weights(bits, symmetric):
    rng = np.random.default_rng(bits + 10 * symmetric)
    K, N, block = 200, 12, 32                      # K not a multiple of the block: a padded last block
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[:32, 0] = 0                                  # an all-zero block (scale 0)
    w[32:64, 1] = np.abs(w[32:64, 1])              # a one-sided block (zero point at the edge)
    B, scales, zp = quantize_blockwise(w, bits, block, symmetric)
    k_blocks = -(-K // block)
    assert B.shape == (N, k_blocks, block * bits // 8) and B.dtype == np.uint8
    assert scales.shape == (N, k_blocks) and scales.dtype == np.float32
    assert (zp is None) == symmetric
    if zp is not None:
        assert zp.shape == (N, -(-k_blocks * bits // 8))
    got = dequantize_blockwise(B, scales, zp, bits, block, K)
    np.testing.assert_array_equal(got, _reference_rounding(w, bits, block, symmetric))
    # round to nearest: no element moves by more than half a step (+ float slack); symmetric
    # codes put the largest magnitude on -2^(bits-1), so the other sign's top code clamps a step
    step = np.repeat(np.abs(scales).T, block, axis=0)[:K]
    assert np.all(np.abs(got - w) <= step * (1.0 if symmetric else 0.5) + 1e-6)
    assert np.all(got[:32, 0] == 0)


def test_packing_is_low_bits_first_along_k():
    # MatMulNBits: for 4 bits the first element of a pair sits in the low nibble
    assert pack(np.array([[1, 2, 3]], np.uint8), 4, pad=8).tolist() == [[0x21, 0x83]]
    assert pack(np.array([[1, 2]], np.uint8), 8).tolist() == [[1, 2]]
    assert unpack(np.array([[0x21, 0x83]], np.uint8), 4, 3).tolist() == [[1, 2, 3]]
    w = np.zeros((32, 1), np.float32)
    w[0, 0], w[1, 0] = -1.0, 1.0                   # symmetric: scale 1/8, codes 0 and 16->clamped 15
    B, scales, _ = quantize_blockwise(w, 4, 32, True)
    assert scales[0, 0] == np.float32(0.125) and B[0, 0, 0] == 0xF0  # w0 -> 0 (low), w1 -> 15 (high; +8 clamped)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bytes_equal_onnxruntimes_own_quantiser(bits, symmetric):
    """The numpy quantiser restates MLAS's (what onnxruntime.quantization's MatMulNBitsQuantizer
    calls): the same inputs give the same bytes."""
    pybind = pytest.importorskip("onnxruntime.capi._pybind_state")
    fn = getattr(pybind, f"quantize_matmul_{bits}bits")
    rng = np.random.default_rng(7)
    K, N, block = 200, 24, 32
    w = (rng.standard_normal((K, N)) * rng.uniform(0.01, 2, N)).astype(np.float32)
    k_blocks = -(-K // block)
    B = np.zeros((N, k_blocks, block * bits // 8), np.uint8)
    zp = np.zeros((N, -(-k_blocks * bits // 8)), np.uint8)
    scales = np.zeros((N, k_blocks), np.float32)
    fn(B, w, scales, zp, block, N, K, symmetric)
    ours = quantize_blockwise(w, bits, block, symmetric)
    np.testing.assert_array_equal(ours[0], B)
    np.testing.assert_array_equal(ours[1], scales)
    if not symmetric:
        np.testing.assert_array_equal(ours[2], zp)


def _tiny_model(K=80, N=24, V=40, tied=True) -> ir.Model:
    """input_ids -> Gather(E) -> MatMul(W) -> MatMul(Transpose(E)) = logits: a linear layer and a
    LM head tied to the embedding, the shapes of the canonical decoder's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    E = rng.standard_normal((V, K)).astype(np.float32)
    W = (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h0"], name="embed"),
             helper.make_node("MatMul", ["h0", "W"], ["h1"], name="linear")]
    inits = [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")]
    if tied:
        nodes += [helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="tie"),
                  helper.make_node("MatMul", ["h1", "Et"], ["logits"], name="lm_head")]
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(E.T), "head"))
        nodes.append(helper.make_node("MatMul", ["h1", "head"], ["logits"], name="lm_head"))
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))  # ranks, as canonical graphs have


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"input_ids": ids})[0]


def _weight_quant(model, **options):
    from optc.passes.quant import WeightQuant, WeightQuantOptions

    return WeightQuant(WeightQuantOptions(**options))(model)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tied", [True, False])
def test_onnxruntime_multiplies_by_exactly_the_dequantised_weights(bits, tied):
    """The layout as ONNX Runtime reads it: MatMulNBits' output is A @ dequantised W (to fp32
    rounding), for a plain weight and for a LM head tied to the embedding (Transpose(E))."""
    from optc.ir import to_checked_proto

    model = _tiny_model(tied=tied)
    ids = np.array([[1, 5, 7, 39], [0, 2, 3, 4]], np.int64)
    before = _run(model, ids)
    E = model.graph.initializers["E"].const_value.numpy()
    # accuracy_level 0: ONNX Runtime multiplies float A by the dequantised weights, which this
    # test reproduces exactly (4, the default, also rounds A to int8 blocks)
    assert _weight_quant(model, bits=bits, block_size=16, accuracy_level=0).modified
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ops == [("", "Gather"), ("com.microsoft", "MatMulNBits"), ("com.microsoft", "MatMulNBits")]
    assert model.opset_imports["com.microsoft"] == 1
    assert "W" not in model.graph.initializers and "head" not in model.graph.initializers
    np.testing.assert_array_equal(model.graph.initializers["E"].const_value.numpy(), E)  # the Gather's table stays
    to_checked_proto(model, "test")
    after = _run(model, ids)

    nodes = list(model.graph)
    weights = []
    for node in nodes[1:]:
        a = {k: v.value for k, v in node.attributes.items()}
        zp = node.inputs[3].const_value.numpy() if len(node.inputs) > 3 else None
        weights.append(dequantize_blockwise(node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy(),
                                            zp, a["bits"], a["block_size"], a["K"]))
    expected = E[ids] @ weights[0] @ weights[1]
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-4)
    rel = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert rel < (0.01 if bits == 8 else 0.15), rel
    assert not _weight_quant(model, bits=bits, block_size=16).modified  # nothing left to quantise


def test_float16_weights_get_float16_scales_and_run():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    K, N = 64, 24
    W = (rng.standard_normal((K, N)) / 8).astype(np.float16)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm")], "fp16",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3, K])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, [2, 3, N])],
                          [numpy_helper.from_array(W, "W")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    assert _weight_quant(model, bits=4, block_size=16, accuracy_level=0).modified
    node = list(model.graph)[0]
    assert node.op_type == "MatMulNBits" and node.inputs[2].const_value.numpy().dtype == np.float16
    x = rng.standard_normal((2, 3, K)).astype(np.float16)
    import onnxruntime as ort

    y = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    w = dequantize_blockwise(*(v.const_value.numpy() for v in node.inputs[1:]), 4, 16, K)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), x.astype(np.float32) @ w, atol=3e-3)  # fp16 accumulation


def test_skip_keeps_named_matmuls_and_a_skip_that_matches_nothing_is_an_error():
    from optc.passes.base import PassConfigError

    model = _tiny_model()
    assert _weight_quant(model, bits=8, block_size=16, skip=["lm_head"]).modified
    assert [n.op_type for n in model.graph] == ["Gather", "MatMulNBits", "Transpose", "MatMul"]
    model = _tiny_model()
    assert _weight_quant(model, bits=8, block_size=16, skip=["lin*"]).modified
    assert [n.op_type for n in model.graph] == ["Gather", "MatMul", "MatMulNBits"]
    with pytest.raises(PassConfigError, match="'embeddings' matches no constant-weight MatMul"):
        _weight_quant(_tiny_model(), bits=8, skip=["embeddings"])
    model = _tiny_model()
    assert not _weight_quant(model, bits=8, skip=["lm_head", "linear"]).modified  # everything skipped
    assert [n.op_type for n in model.graph] == ["Gather", "MatMul", "Transpose", "MatMul"]


@pytest.mark.parametrize("options,message", [
    ("bits: 3", "passes[0].bits: Input should be 4 or 8"),
    ("bits: 8.0", "passes[0].bits: Value error, expected an integer, got 8.0"),
    ("bits: 4\n    block_size: 48", "passes[0].block_size: Value error, must be a power of two >= 16"),
    ("bits: 4\n    block_size: 8", "passes[0].block_size: Value error, must be a power of two >= 16"),
    ("bits: 4\n    accuracy_level: 5", "passes[0].accuracy_level: Input should be 0, 1, 2, 3 or 4"),
    ("bits: 4\n    skip: ['']", "passes[0].skip: Value error, an empty entry matches nothing"),
    ("bits: 4\n    skip: lm_head", "passes[0].skip: Input should be a valid list"),
    ("bits: 4\n    group_size: 32", "passes[0].group_size: unknown key"),
    ("block_size: 32", "passes[0].bits: Field required"),
])
def test_bad_options_are_one_line(tmp_path, capsys, options, message):
    # the config is read before the model: the model path need not exist
    err = config_error(tmp_path, tmp_path / "model.onnx", f"passes:\n  - name: weight_quant\n    {options}\n", capsys)
    assert message in err, err


def test_options_in_normal_form_and_declared_budget():
    from optc.registry import default_registry

    reg = default_registry()
    cfg = parse_config({"passes": [{"name": "weight_quant", "bits": 4}]}, reg)
    assert cfg.to_dict()["passes"] == [{"name": "weight_quant", "allow_noop": False, "bits": 4, "block_size": 32,
                                        "symmetric": False, "accuracy_level": 4, "skip": []}]
    entry = reg.get("weight_quant")
    assert entry.lossy
    assert entry.declared_perplexity_budget(cfg.passes[0].options) == 0.05
    assert entry.declared_perplexity_budget(entry.options_model(bits=8)) == 0.01
    assert entry.declared_perplexity_budget(entry.options_model(bits=4, block_size=128)) == 0.10


def _compile(model, out, passes, **kw):
    from optc.compile import compile_model
    from optc.registry import default_registry

    cfg = parse_config({"passes": passes}, default_registry())
    return compile_model(model, out, config=cfg, log=lambda *_: None, **kw)


def test_decoder_structure_and_deterministic_artifact(tmp_path, exported_decoder):
    """Every linear layer and the tied LM head of the shipped decoder become MatMulNBits; two
    compiles of the same inputs and config are byte-identical."""
    import onnx

    passes = [{"name": "weight_quant", "bits": 4}]
    _compile(exported_decoder, tmp_path / "a", passes, verify=False)
    _compile(exported_decoder, tmp_path / "b", passes, verify=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.onnx.data" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    proto = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False)
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    # packed qkv (the fused ONNX Runtime path stacks the three), o, packed gate/up, down per layer + LM head
    assert ops.count(("com.microsoft", "MatMulNBits")) == 6 * 4 + 1
    consts = {t.name for t in proto.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in consts for n in proto.graph.node)
    # the float weights are gone: int4 + fp32 scales + zero points, plus the fp32 embedding table
    float_size = (tmp_path / "a" / "model.onnx.data").stat().st_size
    assert float_size < 0.45 * exported_decoder.with_name("model.onnx.data").stat().st_size


def test_skip_lm_head_on_the_decoder(exported_decoder):
    from optc.canonical import canonicalize
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.passes.quant import WeightQuant, WeightQuantOptions

    model = load_model(exported_decoder)
    ctx = PassContext(decoder=canonicalize(model))
    assert WeightQuant(WeightQuantOptions(bits=4, skip=["lm_head"]), ctx)(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 6 * 7
    head = next(v for v in model.graph.outputs if v.name == "logits").producer()
    assert head.op_type == "MatMul" and head.inputs[1].producer().op_type == "Transpose"  # tied, still float


def test_nothing_to_quantise_fails_the_compile(tmp_path, exported_decoder, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes:\n  - name: weight_quant\n    bits: 8\n    skip: ['*']\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "passes[0] (weight_quant) matched nothing in the graph" in err
    cfg.write_text("passes:\n  - name: weight_quant\n    bits: 8\n    skip: [lm_head, 'nothing_*']\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "passes[0].skip: 'nothing_*' matches no" in err, err
    assert not (tmp_path / "out").exists()


def test_tvm_backend_refuses_in_one_line(tmp_path, exported_decoder, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes:\n  - name: weight_quant\n    bits: 4\n")
    code, _, err = run_cli(["compile", exported_decoder, "-c", cfg, "-o", tmp_path / "out", "--backend", "tvm"],
                           capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: tvm backend: the weight_quant pass lowers to ONNX Runtime's "
                          "com.microsoft::MatMulNBits"), err
    assert not (tmp_path / "out").exists()


def test_composes_with_kv_quantize_and_sink_window(tmp_path, exported_decoder):
    """It touches MatMul weights only: with a quantised, windowed cache the artifact compiles and
    generates (accuracy of the combination: the slow test below)."""
    from optc.runtime import load

    passes = [{"name": "sink_window", "sinks": 4, "window": 60},
              {"name": "kv_quantize", "bits": 8, "key_quant": "per_token", "group_size": 32, "residual": 16},
              {"name": "weight_quant", "bits": 8}]
    manifest = _compile(exported_decoder, tmp_path / "a", passes, verify=False)
    assert [p["name"] for p in manifest["passes"]] == ["sink_window", "kv_quantize", "weight_quant"]
    assert manifest["kv_cache"]["layout"] == "kivi" and manifest["kv_cache"]["policy"]["kind"] == "sink_window"
    m = load(tmp_path / "a")
    m.generate("def f(x):", max_new_tokens=80, temperature=0)
    # the generation outgrew the window: the cache is full at sinks + window and mostly int8 (a
    # 16-token fp32 residual; 0.52x measured), against the fp32 cache's 2 x 6 layers x 2 heads x
    # 32 dims x 4 bytes a token. (With the default group_size 64 and residual 32, a 64-token window
    # never fills a group: the cache stays fp32.)
    assert m.last_stats["prompt_tokens"] + m.last_stats["new_tokens"] > 64 and m.cache.length == 64
    assert 0 < m.kv_bytes < 0.55 * 2 * 6 * 2 * 32 * 4 * 64


@pytest.mark.slow
def test_int8_weights_are_close_to_fp32(tmp_path, exported_decoder):
    """Verified by the compile itself against ONNX Runtime on the original graph."""
    manifest = _compile(exported_decoder, tmp_path / "a", [{"name": "weight_quant", "bits": 8}])
    v = manifest["verification"]
    assert manifest["verify_budget"]["max_perplexity_increase"] == 0.01
    assert v["top1_agreement"] >= 0.97, v
    assert v["max_abs_logit_diff"] <= 0.5, v
    assert abs(v["perplexity_increase"]) <= 0.01, v


@pytest.mark.slow
def test_int4_with_int8_kv_within_the_summed_budget(tmp_path, exported_decoder):
    manifest = _compile(exported_decoder, tmp_path / "a", [{"name": "kv_quantize", "bits": 8},
                                                           {"name": "weight_quant", "bits": 4}])
    assert manifest["verify_budget"]["max_perplexity_increase"] == pytest.approx(0.06)
    assert manifest["verification"]["top1_agreement"] >= 0.8, manifest["verification"]


PEER = Path(__file__).resolve().parents[1] / "peer_exports" / "llama-gqa" / "model.onnx"


def test_torchscript_export_without_intermediate_shapes():
    """optimum-cli's export (TorchScript) records no intermediate shapes: its projections and
    untied LM head are quantised all the same; the rotary MatMul (no constant weight) is not."""
    from optc.canonical import canonicalize
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.passes.quant import WeightQuant, WeightQuantOptions

    model = load_model(PEER)
    ctx = PassContext(decoder=canonicalize(model))
    assert WeightQuant(WeightQuantOptions(bits=4, block_size=16), ctx)(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 2 * 7 + 1 and ops.count("MatMul") == 1


@pytest.mark.slow
def test_torchscript_export_verified(tmp_path):
    from conftest import DECODER_DIR

    manifest = _compile(PEER, tmp_path / "a", [{"name": "weight_quant", "bits": 8, "block_size": 16}],
                        tokenizer=DECODER_DIR / "tokenizer.json", verify_length=64)
    v = manifest["verification"]
    # a tiny random model: flat next-token distributions, so near-ties flip more often than in a trained one
    assert abs(v["perplexity_increase"]) <= 0.01 and v["top1_agreement"] >= 0.9, v


def test_embedding_table_in_int4(tmp_path, exported_decoder):
    """embedding: true stores the token embedding table as symmetric int4 blocks along the hidden
    axis (GatherBlockQuantized): the float table is gone from the weights file, the stored blocks
    dequantise to the table within one int4 step, and the model still predicts like the int4 one
    with a float table."""
    import onnx

    from optc.passes.quant.blockwise import dequantize_blockwise
    from optc.runtime import load

    wq = {"name": "weight_quant", "bits": 4}
    _compile(exported_decoder, tmp_path / "float_table", [wq], verify=False)
    _compile(exported_decoder, tmp_path / "int4_table", [{**wq, "embedding": True}], verify=False)
    proto = onnx.load(str(tmp_path / "int4_table" / "model.onnx"))
    (gather,) = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert not [n for n in proto.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    data, scales = inits[gather.input[0]], inits[gather.input[2]]
    vocab, hidden = data.shape[0], data.shape[1] * 2
    # the same blocks as a [hidden, vocab] MatMulNBits weight: dequantised, row t is token t's embedding
    table = dequantize_blockwise(data.reshape(vocab, hidden // 32, 16), scales, None, 4, 32, hidden).T
    ref = onnx.load(str(exported_decoder))
    floats = {t.name: onnx.numpy_helper.to_array(t) for t in ref.graph.initializer}
    original = next(v for v in floats.values() if v.shape == (vocab, hidden))
    assert np.abs(table - original).max() <= np.abs(original).max() / 7 + 1e-6  # (within one int4 step)
    size = lambda d: (tmp_path / d / "model.onnx.data").stat().st_size  # noqa: E731
    assert size("int4_table") < size("float_table") - vocab * hidden * 3  # (4 bytes -> half a byte each)
    a, b = load(tmp_path / "float_table"), load(tmp_path / "int4_table")
    ids = np.random.default_rng(3).integers(1, 4096, 120)
    agree = [a.prefill(ids[:60]).argmax() == b.prefill(ids[:60]).argmax()]
    agree += [a.decode(int(t)).argmax() == b.decode(int(t)).argmax() for t in ids[60:]]
    assert np.mean(agree) >= 0.8, np.mean(agree)
