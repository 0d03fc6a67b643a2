"""What every optc pass builds on: an onnx-ir in-place pass constructed from its options."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from optc.config import PassOptions


@dataclass
class PassContext:
    """What a pass may consult besides the graph: the target and the canonical decoder info."""

    target: str = "cpu"
    decoder: object | None = None   # optc.canonical.DecoderInfo
    # What passes ask of the runtime, copied into the manifest (e.g. "kv_cache": {"layout": ...}).
    runtime: dict = field(default_factory=dict)


class PassConfigError(Exception):
    """An option that is well-typed but does not fit this model; the pipeline names the key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class OptcPass(ir.passes.InPlacePass):
    """An onnx-ir InPlacePass with options. `call` returns PassResult(model, modified)."""

    name: str = ""

    def __init__(self, options: PassOptions, context: PassContext | None = None):
        super().__init__()
        self.options = options
        self.context = context or PassContext()

    @classmethod
    def declared_perplexity_budget(cls, options: PassOptions) -> float | None:
        """A lossy pass declares the relative perplexity increase it may cost with these options;
        compile enforces the sum when the config's `verify:` sets no perplexity budget itself."""
        return None
