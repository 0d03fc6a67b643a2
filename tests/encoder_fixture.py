"""A tiny BERT-style encoder built in seconds, for the fast tier: token embedding, then `layers`
layers of multi-head attention (Q/K/V projections, Softmax over Add(scaled Q·Kᵀ, additive mask)),
a residual add and a LayerNormalization, as `optc export` lays an encoder out (input_ids,
attention_mask, token_type_ids -> last_hidden_state). Random weights: for structure, contracts,
artifacts and the runtime; the real all-MiniLM-L6-v2 is in the slow tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ["the", "a", "model", "token", "layer", "text", "runs", "on", "edge", "small", "is", "of"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def build_tiny_encoder(out_dir: Path, *, layers: int = 2, hidden: int = 8, heads: int = 2, seed: int = 0) -> Path:
    """Write model.onnx (+ tokenizer.json, sentence-transformers' side files) into out_dir."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    vocab = len(SPECIAL) + len(WORDS)
    d = hidden // heads
    inits = [numpy_helper.from_array(rng.normal(size=(vocab, hidden)).astype(np.float32), "embeddings.word"),
             numpy_helper.from_array(np.array([0, 0, heads, d], np.int64), "shape.heads"),
             numpy_helper.from_array(np.array([0, 0, hidden], np.int64), "shape.hidden"),
             numpy_helper.from_array(np.float32(1 / np.sqrt(d)), "scale"),
             numpy_helper.from_array(np.float32(1), "one"),
             numpy_helper.from_array(np.float32(-1e4), "neg"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
             numpy_helper.from_array(np.ones(hidden, np.float32), "ln.scale"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "ln.bias")]
    nodes = [helper.make_node("Gather", ["embeddings.word", "input_ids"], ["h0"]),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mask_f"], ["mask_inv"]),
             helper.make_node("Mul", ["mask_inv", "neg"], ["mask_neg"]),
             helper.make_node("Unsqueeze", ["mask_neg", "axes12"], ["mask_add"])]
    value_info = []
    h = "h0"
    for i in range(layers):
        for w in ("q", "k", "v"):
            inits.append(numpy_helper.from_array((rng.normal(size=(hidden, hidden)) / np.sqrt(hidden))
                                                 .astype(np.float32), f"l{i}.{w}.weight"))
            nodes += [helper.make_node("MatMul", [h, f"l{i}.{w}.weight"], [f"l{i}.{w}"]),
                      helper.make_node("Reshape", [f"l{i}.{w}", "shape.heads"], [f"l{i}.{w}.heads"])]
        nodes += [helper.make_node("Transpose", [f"l{i}.q.heads"], [f"l{i}.qt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", [f"l{i}.k.heads"], [f"l{i}.kt"], perm=[0, 2, 3, 1]),
                  helper.make_node("Transpose", [f"l{i}.v.heads"], [f"l{i}.vt"], perm=[0, 2, 1, 3]),
                  helper.make_node("MatMul", [f"l{i}.qt", f"l{i}.kt"], [f"l{i}.scores"]),
                  helper.make_node("Mul", [f"l{i}.scores", "scale"], [f"l{i}.scaled"]),
                  helper.make_node("Add", [f"l{i}.scaled", "mask_add"], [f"l{i}.masked"]),
                  helper.make_node("Softmax", [f"l{i}.masked"], [f"l{i}.probs"], axis=-1),
                  helper.make_node("MatMul", [f"l{i}.probs", f"l{i}.vt"], [f"l{i}.ctx"]),
                  helper.make_node("Transpose", [f"l{i}.ctx"], [f"l{i}.ctx_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"l{i}.ctx_t", "shape.hidden"], [f"l{i}.attn"]),
                  helper.make_node("Add", [h, f"l{i}.attn"], [f"l{i}.res"])]
        out = "last_hidden_state" if i == layers - 1 else f"h{i + 1}"
        nodes.append(helper.make_node("LayerNormalization", [f"l{i}.res", "ln.scale", "ln.bias"], [out], axis=-1))
        value_info.append(helper.make_tensor_value_info(f"l{i}.probs", TensorProto.FLOAT,
                                                        ["batch", heads, "sequence_length", "sequence_length"]))
        h = out
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence_length"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence_length", hidden])
    graph = helper.make_graph(nodes, "tiny_encoder", inputs, [output], inits, value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    onnx.helper.set_model_props(model, {"optc.context": "64"})
    onnx.checker.check_model(model, full_check=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    onnx.save(model, str(path))
    write_tokenizer(out_dir / "tokenizer.json")
    (out_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    (out_dir / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"},
                                                      {"type": "sentence_transformers.models.Normalize"}]))
    return path


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer over WORDS, [CLS] text [SEP], like BERT's template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    tok.save(str(path))


def write_pairs(path: Path, n: int = 6) -> Path:
    """Query/document pairs over the tiny vocabulary (the held-out set's format)."""
    rng = np.random.default_rng(1)
    with path.open("w") as fh:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS, 10))
            fh.write(json.dumps({"query": q, "document": q + " " + " ".join(rng.choice(WORDS, 6))}) + "\n")
    return path


def tiny_artifact(tmp_path: Path) -> Path:
    """The tiny encoder compiled (identity pipeline, verified on write_pairs) into tmp_path/artifact."""
    from optc.compile import compile_model

    model = build_tiny_encoder(tmp_path / "model")
    compile_model(model, tmp_path / "artifact", eval_text=write_pairs(tmp_path / "pairs.jsonl"), log=lambda *_: None)
    return tmp_path / "artifact"
