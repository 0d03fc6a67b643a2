"""layer_routing: options, contract, the static mode's calibration (route.py does the rewrite)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from optc.config import PassOptions
from optc.passes.base import (EVICTS_ALL_LAYERS_ALIKE, LAYERS_ROUTED, MODEL_DECODER, SPARSE_PREFILL,
                              Contract, OptcPass, PassConfigError)
from optc.passes.layer_routing.route import rewrite_routing
from optc.runtime.manifest import LAYER_CHANGE_OUTPUT, LAYERS_RUN_INPUT, LayerRoutingSpec

CALIBRATION_SAMPLES, CALIBRATION_LENGTH = 16, 256


class LayerRoutingOptions(PassOptions):
    mode: Literal["per_prompt", "static"] = Field(
        "per_prompt", description="per_prompt: the layers to skip are chosen from each prompt at run time; static: "
                                  "once, on calibration text (the baseline)")
    max_skip: int = Field(description="layers decode skips (0: every layer runs)", ge=0)
    protect_first: int = Field(1, ge=1, description="first layers never skipped (layer 0 always runs)")
    protect_last: int = Field(1, ge=1, description="last layers never skipped")
    window: int = Field(16, ge=1, description="last prompt tokens whose hidden-state change ranks the layers")
    calibration_text: str | None = Field(None, description="static: text to choose the layers on (.jsonl with "
                                                           "'text'); default models/data/calibration.jsonl")

    @model_validator(mode="after")
    def _keys_match(self):
        if self.calibration_text is not None and self.mode != "static":
            raise ValueError("calibration_text applies to mode static only")
        return self


class LayerRouting(OptcPass):
    """Layer routing: decode skips the layers that changed the prompt's hidden states least (If per layer)."""

    name = "layer_routing"

    @classmethod
    def contract(cls, options) -> Contract:
        # (the float and KIVI caches keep a length per layer, and sink_window evicts each layer's
        # cache by its own length; H2O evicts the same tokens from every layer)
        return Contract(requires=frozenset({MODEL_DECODER}), ensures=frozenset({LAYERS_ROUTED}),
                        conflicts={EVICTS_ALL_LAYERS_ALIKE: "H2O evicts the same tokens from every layer, and a "
                                                            "skipped layer's cache stops growing",
                                   SPARSE_PREFILL: "block_sparse wraps each layer's Attention in an If of its own, "
                                                   "which layer_routing cannot move into its per-layer If yet"})

    @classmethod
    def declared_perplexity_budget(cls, options) -> float | None:
        return 0.05 if getattr(options, "max_skip", 0) else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: LayerRoutingOptions = self.options
        info = self.context.decoder
        if info is None:
            raise PassConfigError("mode", "layer_routing needs a decoder (canonicalised by optc compile)")
        n = info.n_layers
        routable = list(range(o.protect_first, n - o.protect_last))
        if o.max_skip > len(routable):
            raise PassConfigError("max_skip", f"max_skip ({o.max_skip}) is more than the {len(routable)} layers this "
                                              f"{n}-layer decoder can skip with protect_first {o.protect_first} and "
                                              f"protect_last {o.protect_last}")
        if not routable:
            raise PassConfigError("protect_first", f"protect_first + protect_last leave no layer of {n} to route")
        changed = rewrite_routing(model, info, routable=routable, window=o.window)
        if not changed:
            return ir.passes.PassResult(model, False)
        static = None
        if o.mode == "static":
            change = self._calibrate(model)
            static = sorted(routable[j] for j in np.argsort(change, kind="stable")[:o.max_skip])
            self.context.log(f"  layer_routing static: skips layers {static} (mean change on calibration text: "
                             + ", ".join(f"{i}: {c:.4f}" for i, c in zip(routable, change)) + ")")
        self.context.runtime.layer_routing = LayerRoutingSpec(layers=routable, max_skip=o.max_skip, static=static)
        return ir.passes.PassResult(model, True)

    def _calibrate(self, model: ir.Model) -> np.ndarray:
        """Mean change per routable layer, every layer running, over calibration windows."""
        import onnxruntime as ort

        from optc.calibration import calibration_windows, feeds_for

        o: LayerRoutingOptions = self.options
        windows = calibration_windows("layer_routing mode static", self.context.tokenizer, o.calibration_text,
                                      samples=CALIBRATION_SAMPLES, length=CALIBRATION_LENGTH,
                                      bos=self.context.bos_token_id, text_key="calibration_text")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        inputs = [v for v in model.graph.inputs if v.name != LAYERS_RUN_INPUT]
        run_all = np.ones(self.context.decoder.n_layers, bool)
        total = 0.0
        for ids in windows:
            feeds = {**feeds_for(inputs, ids), LAYERS_RUN_INPUT: run_all}
            total = total + session.run([LAYER_CHANGE_OUTPUT], feeds)[0]
        return total / len(windows)
