"""token_dropping: options, contract and dispatch by mode (encoder.py, prefill.py do the rewrite)."""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir
from pydantic import Field, StrictFloat, StrictInt, field_validator, model_validator

from optc.config import PassOptions
from optc.passes.base import TOKENS_DROPPED, Contract, OptcPass, PassConfigError
from optc.passes.token_dropping.encoder import rewrite_encoder



class TokenDroppingOptions(PassOptions):
    mode: Literal["encoder"] = Field(
        description="encoder: a BERT-style encoder keeps the tokens CLS attends to most (plus CLS/SEP)")
    keep: StrictFloat | StrictInt = Field(0.5, description="tokens kept from start_layer on: a ratio in (0, 1] "
                                                           "(0.5) or a count (64)")
    start_layer: int = Field(2, ge=0, description="first layer that runs on the kept tokens only")
    score: Literal["attention", "random", "recent"] = Field(
        "attention", description="attention: attention received (the method); random, recent: baselines")
    query: Literal["cls", "all"] = Field("cls", description="encoder: whose attention scores tokens (CLS's row "
                                                             "or every real query)")
    seed: int = Field(0, ge=0, description="seed of score random")

    @field_validator("keep")
    @classmethod
    def _keep_range(cls, v):
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"a ratio must be in (0, 1], got {v}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a count must be at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _keys_match(self):
        if "seed" in self.model_fields_set and self.score != "random":
            raise ValueError(f"seed applies to score random only (score is {self.score})")
        return self


class TokenDropping(OptcPass):
    """Token dropping: later layers run on the most-attended tokens only (TopK + Gather in the graph)."""

    name = "token_dropping"

    @classmethod
    def contract(cls, options) -> Contract:
        return Contract(ensures=frozenset({TOKENS_DROPPED}))

    @classmethod
    def declared_perplexity_budget(cls, options) -> float | None:
        return None  # an encoder has no perplexity: judged by pooled-embedding cosine (docs/benchmarks.md)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: TokenDroppingOptions = self.options
        if self.context.decoder is not None:
            raise PassConfigError("mode", "mode encoder needs a BERT-style encoder, and this model is a decoder")
        changed = rewrite_encoder(model, keep=o.keep, start_layer=o.start_layer, score=o.score, query=o.query,
                                  seed=o.seed)
        return ir.passes.PassResult(model, changed)
