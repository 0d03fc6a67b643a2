"""The encoder's manifest section (runtime/manifest.py EncoderSpec) is typed like every other
section: a hand-edited value is one ArtifactError naming the key; the model's kind decides which
class loads an artifact; EncoderModel.embed refuses what is not a list of texts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optc.runtime.artifact import ArtifactError
from optc.runtime.manifest import KEPT_TOKEN_SIZES, EncoderSpec, ModelSpec, model_kind

GOOD = {"kind": "encoder", "n_layers": 6, "num_heads": 12, "hidden_size": 384, "vocab_size": 30522, "context": 512,
        "norm": "LayerNormalization", "mlp": "GELU", "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "output": "last_hidden_state", "rewrites": {}, "max_length": 256, "pad_token_id": 0, "pooling": "mean",
        "pooling_weights": KEPT_TOKEN_SIZES, "normalize": True, "embedding": "embeddings.word_embeddings.weight"}


def test_round_trip_in_one_key_order():
    spec = EncoderSpec.from_dict(dict(reversed(list(GOOD.items()))))
    assert spec.to_dict() == GOOD and list(spec.to_dict()) == list(GOOD)


@pytest.mark.parametrize("edit, message", [
    ({"bogus": 1}, r"model\.bogus: unknown key"),
    ({"n_layers": "6"}, r"model\.n_layers: expected int, got str"),
    ({"normalize": 1}, r"model\.normalize: expected bool, got int"),
    ({"kind": "rnn"}, r"model\.kind: one of decoder, encoder, got 'rnn'"),
    ({"kind": "decoder"}, r"model\.kind: not an encoder"),
    ({"inputs": ["input_ids"]}, r"model\.inputs: input_ids and attention_mask"),
    ({"inputs": ["input_ids", "attention_mask", "position_ids"]}, r"model\.inputs: input_ids and attention_mask"),
    ({"pooling": "cls"}, r"model\.pooling: one of mean, got 'cls'"),
    ({"pooling_weights": "logits"}, r"model\.pooling_weights: one of optc\.kept_token_sizes"),
    ({"max_length": 1024}, r"model\.max_length: 1024 is past the model's context \(512\)"),
    ({"pad_token_id": 30522}, r"model\.pad_token_id: 30522 is outside the vocabulary"),
    ({"rewrites": []}, r"model\.rewrites: expected dict"),
])
def test_hand_edits_are_one_line_errors(edit, message):
    with pytest.raises(ArtifactError, match=message) as e:
        EncoderSpec.from_dict({**GOOD, **edit}, "manifest.json: model")
    assert "\n" not in str(e.value)


def test_kind_defaults_to_decoder_and_a_decoder_section_refuses_encoder():
    assert model_kind({"n_layers": 2}) == "decoder"  # artifacts from before encoders compiled
    assert model_kind(GOOD) == "encoder"
    with pytest.raises(ArtifactError, match=r"model\.kind: 'encoder', not a decoder"):
        ModelSpec.from_dict(GOOD)


def test_loading_dispatches_on_kind_and_embed_checks_its_input(tmp_path):
    """A published tiny encoder artifact loads as an EncoderModel; a decoder-only call does not exist on it."""
    import optc.runtime
    from encoder_fixture import tiny_artifact

    from optc.errors import InvalidType, InvalidValue

    root = tiny_artifact(tmp_path)
    m = optc.runtime.load(root)
    assert isinstance(m, optc.runtime.EncoderModel) and not hasattr(m, "generate")
    for bad in ("one text", [b"bytes"], None):
        with pytest.raises(InvalidType):
            m.embed(bad)
    with pytest.raises(InvalidValue, match="batch_size"):
        m.embed(["a"], batch_size=0)
    with pytest.raises(InvalidValue, match="token id 99 is outside the vocabulary"):
        m.embed_ids(np.array([[2, 99, 3]]), np.ones((1, 3), np.int64))
    # the section edited by hand (the manifest itself is not hashed; its digest is the artifact id)
    mpath = root / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["model"]["pooling_weights"] = "optc.kept_token_indices"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest\.json: model\.pooling_weights: one of"):
        optc.runtime.load(root)


def test_loading_and_embedding_stays_light(tmp_path):
    """The runtime embeds without the compiler's dependencies (torch, onnx, pydantic, ...)."""
    import subprocess
    import sys

    from encoder_fixture import tiny_artifact
    from test_runtime_imports import FORBIDDEN

    root = tiny_artifact(tmp_path)
    code = ("import sys, optc.runtime\n"
            f"m = optc.runtime.load({str(root)!r})\n"
            "e = m.embed(['the model runs on the edge'])\n"
            "assert e.shape == (1, 8)\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
