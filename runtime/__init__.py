"""optc's runtime: load a compiled artifact and generate text.

Imports only numpy, onnxruntime and tokenizers (and the TVM runtime for TVM artifacts) — never
torch, onnx or the compiler — so apps can ship it alone.

    m = optc.runtime.load("artifact/")
    for piece in m.generate("def f(", max_new_tokens=64, stream=True):
        print(piece, end="")

An encoder artifact loads as an EncoderModel: `load("minilm/").embed(["text", ...])`.
"""

from optc.runtime.artifact import FORMAT_VERSION, ArtifactError, artifact_id
from optc.runtime.encoder import EncoderModel
from optc.runtime.model import Model, load

__all__ = ["ArtifactError", "EncoderModel", "FORMAT_VERSION", "Model", "artifact_id", "load"]
