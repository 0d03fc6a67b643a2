"""token_dropping: options, contract and dispatch by mode (encoder.py, prefill.py do the rewrite)."""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir
from pydantic import Field, StrictFloat, StrictInt, field_validator, model_serializer, model_validator

from optc.config import PassOptions
from optc.passes.base import (CACHE_SLOT_POSITIONS, EVICTS_ALL_LAYERS_ALIKE, LAYERS_ROUTED, MODEL_DECODER,
                              MODEL_ENCODER, MODEL_POSITION_IDS, SPARSE_PREFILL, TOKENS_DROPPED, Contract, OptcPass,
                              PassConfigError)
from optc.passes.token_dropping.encoder import rewrite_encoder
from optc.passes.token_dropping.prefill import rewrite_prefill
from optc.runtime.manifest import KEPT_ATTENTION_MASK, KEPT_TOKEN_SIZES

# what mode prefill may cost, relative continuation perplexity (the goal at keep 0.5)
PREFILL_PERPLEXITY_BUDGET = 0.05
# what mode encoder may cost (issue 18's goals): pooled-embedding cosine to the full model and
# retrieval top-1 agreement on held-out query/document pairs (optc.verify.compare_embeddings)
ENCODER_EMBEDDING_BUDGET = {"min_embedding_cosine": 0.98, "min_retrieval_agreement": 0.95}
PREFILL_ONLY = ("sinks", "recent", "query_window")
ENCODER_ONLY = ("reduce", "merge_by", "min_tokens")


class TokenDroppingOptions(PassOptions):
    mode: Literal["prefill", "encoder"] = Field(
        description="prefill: a decoder's prompt prefill keeps the most-attended prompt tokens from start_layer on "
                    "(later layers compute and cache only those); encoder: a BERT-style encoder keeps the tokens "
                    "CLS attends to most (plus CLS/SEP)")
    keep: StrictFloat | StrictInt = Field(0.5, description="tokens kept from start_layer on: a ratio in (0, 1] "
                                                           "(0.5) or a count (64)")
    start_layer: int = Field(2, ge=0, description="first layer that runs on the kept tokens only (prefill: >= 1, "
                                                  "and its attention scores the tokens)")
    sinks: int = Field(4, ge=0, description="prefill: first prompt tokens always kept (attention sinks)")
    recent: int = Field(16, ge=1, description="prefill: last prompt tokens always kept (the last one predicts the "
                                              "next token)")
    query_window: int = Field(16, ge=1, description="prefill: the last prompt rows whose attention scores the "
                                                    "tokens (summed over heads and rows)")
    score: Literal["attention", "random", "recent"] = Field(
        "attention", description="attention: attention received (the method); random, recent: baselines")
    query: Literal["cls", "all"] = Field("cls", description="encoder: whose attention scores tokens (CLS's row "
                                                             "or every real query)")
    seed: int = Field(0, ge=0, description="seed of score random")
    reduce: Literal["drop", "merge"] = Field(
        "merge", description="encoder: what becomes of a token that is not kept: merge (ToMe-style: added into the "
                             "most similar kept token, whose size then weights later attention and the pooling; "
                             "measured better) or drop")
    min_tokens: int = Field(
        32, ge=0, description="encoder: an input of up to this many tokens (its padded length) keeps every token, "
                              "a longer one at least this many (0: off). Short sentences have little to drop and "
                              "lose the most: MiniLM's 12-token sentences fell to cosine 0.92 at keep 0.5")
    merge_by: Literal["hidden", "key"] = Field(
        "hidden", description="encoder, reduce merge: what picks the kept token a token merges into: cosine of the "
                              "hidden states at the cut (measured better) or of the previous layer's keys, "
                              "head-averaged (as ToMe matches)")

    @model_serializer(mode="wrap")
    def _normal_form(self, handler):
        # only the keys that apply to this mode, score and reduce: the printed config (optc config
        # show, the manifest's passes) loads back (the validators below refuse the others when given)
        d = handler(self)
        drop = set(PREFILL_ONLY) if self.mode == "encoder" else {*ENCODER_ONLY, "query"}
        if self.mode == "encoder" and self.reduce != "merge":
            drop.add("merge_by")
        if self.score != "random":
            drop.add("seed")
        for key in drop:
            d.pop(key, None)
        return d

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
        if self.mode == "encoder":
            extra = [k for k in PREFILL_ONLY if k in self.model_fields_set]
            if extra:
                raise ValueError(f"{extra[0]} applies to mode prefill only")
            if "merge_by" in self.model_fields_set and self.reduce != "merge":
                raise ValueError(f"merge_by applies to reduce merge only (reduce is {self.reduce})")
        elif "query" in self.model_fields_set:
            raise ValueError("query applies to mode encoder only (mode prefill scores by the last query_window rows)")
        elif extra := [k for k in ENCODER_ONLY if k in self.model_fields_set]:
            raise ValueError(f"{extra[0]} applies to mode encoder only")
        return self


class TokenDropping(OptcPass):
    """Token dropping: later layers run on the most-attended tokens only (TopK + Gather in the graph)."""

    name = "token_dropping"

    @classmethod
    def contract(cls, options) -> Contract:
        if getattr(options, "mode", None) == "encoder":  # (`optc passes` asks without a mode: prefill's)
            return Contract(requires=frozenset({MODEL_ENCODER}), ensures=frozenset({TOKENS_DROPPED}))
        # the runtime keeps per-layer cache lengths for the float and the KIVI cache (each layer's
        # store and residual are its own, kv_quantize's dequantisation gives each layer's length),
        # and sink_window evicts each layer's cache by its own length; H2O evicts the same tokens
        # from every layer
        return Contract(requires=frozenset({MODEL_DECODER, MODEL_POSITION_IDS}), ensures=frozenset({TOKENS_DROPPED}),
                        conflicts={EVICTS_ALL_LAYERS_ALIKE: "token_dropping's later layers cache only the kept prompt "
                                                            "tokens, and H2O evicts the same tokens from every layer",
                                   SPARSE_PREFILL: "both rewrite prefill attention (token_dropping drops the tokens "
                                                   "block_sparse would select blocks of)"},
                        precedes={LAYERS_ROUTED: "layer_routing moves each routable layer into an If, out of reach "
                                                 "of token_dropping's rewrite of the later layers",
                                  CACHE_SLOT_POSITIONS: "sink_window numbers the later layers' cache by slot from the "
                                                        "kept tokens that token_dropping's rewrite chooses"})

    @classmethod
    def declared_perplexity_budget(cls, options) -> float | None:
        if getattr(options, "mode", None) == "prefill":
            return PREFILL_PERPLEXITY_BUDGET  # judged on the 64 tokens after the prompt (optc.verify)
        return None  # an encoder has no perplexity: judged by pooled-embedding cosine (declared below)

    @classmethod
    def declared_embedding_budget(cls, options) -> dict[str, float] | None:
        if getattr(options, "mode", None) == "encoder":  # issue 18's goals for encoder dropping
            return dict(ENCODER_EMBEDDING_BUDGET)
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: TokenDroppingOptions = self.options
        if o.mode == "prefill":
            if self.context.decoder is None:
                raise PassConfigError("mode", "mode prefill needs a decoder (canonicalised by optc compile)")
            changed = rewrite_prefill(model, self.context.decoder, keep=o.keep, start_layer=o.start_layer,
                                      sinks=o.sinks, recent=o.recent, query_window=o.query_window, score=o.score,
                                      seed=o.seed)
            if changed:
                self.context.runtime.update_cache(pruned_from_layer=o.start_layer)
            return ir.passes.PassResult(model, changed)
        if self.context.decoder is not None:
            raise PassConfigError("mode", "mode encoder needs a BERT-style encoder, and this model is a decoder")
        changed = rewrite_encoder(model, keep=o.keep, start_layer=o.start_layer, score=o.score, query=o.query,
                                  seed=o.seed, reduce=o.reduce, merge_by=o.merge_by, min_tokens=o.min_tokens)
        if changed:  # the runtime's mean pooling weights the kept rows by their sizes (merge) or mask (drop)
            self.context.runtime.pooling_weights = KEPT_TOKEN_SIZES if o.reduce == "merge" else KEPT_ATTENTION_MASK
        return ir.passes.PassResult(model, changed)
