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
    notes: list[str] = field(default_factory=list)


class OptcPass(ir.passes.InPlacePass):
    """An onnx-ir InPlacePass with options. `call` returns PassResult(model, modified)."""

    name: str = ""

    def __init__(self, options: PassOptions, context: PassContext | None = None):
        super().__init__()
        self.options = options
        self.context = context or PassContext()
