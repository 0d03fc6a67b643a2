"""What every optc pass builds on: an onnx-ir in-place pass constructed from its options, and the
contract it declares (what it requires of the model, what it ensures, what it cannot combine with).

The pipeline checks every pass's contract against the model and against every other pass of the
configuration *before* any pass runs, whatever their order (`optc.pipeline.check_contracts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from optc.config import PassOptions
from optc.runtime.manifest import RuntimeRequests

# ---------------------------------------------------------------- facts
# What a pass establishes about the compiled model and its cache. Facts in EXCLUSIVE may be
# established by one pass of a pipeline only; the text says why two cannot.
CACHE_POLICY = "kv.policy"                       # the runtime evicts by a policy (sink_window, H2O)
CACHE_QUANTIZED = "kv.quantized"                 # the cache is stored compressed (KIVI)
EVICTS_SINGLE_TOKENS = "kv.evicts_single_tokens"  # the policy drops individual tokens
EVICTS_ALL_LAYERS_ALIKE = "kv.evicts_all_layers_alike"  # the policy drops the same tokens from every layer (H2O)
KEY_GROUPS_SPAN_TOKENS = "kv.key_groups_span_tokens"  # key scales shared by groups of tokens
ATTENTION_PROBABILITIES = "attention.probabilities_output"  # every step outputs attention probabilities
SPARSE_PREFILL = "attention.block_sparse_prefill"  # prefill attends to selected key blocks only
CACHE_SLOT_POSITIONS = "positions.cache_slot"    # positions are cache slots, keys cached before RoPE
TOKENS_DROPPED = "tokens.dropped"                # later layers run on a subset of the tokens
LAYERS_ROUTED = "layers.routed"                  # decode skips layers chosen at run time (If per layer)

EXCLUSIVE = {
    CACHE_POLICY: "both set the cache's eviction policy (a cache has one)",
    CACHE_QUANTIZED: "both quantise the cache",
    SPARSE_PREFILL: "both rewrite prefill attention",
    CACHE_SLOT_POSITIONS: "both re-position the cache",
    TOKENS_DROPPED: "both drop tokens",
    LAYERS_ROUTED: "both route layers",
}

# What the canonical model offers (optc.pipeline.model_facts); passes may require these.
MODEL_POSITION_IDS = "model.position_ids_input"
MODEL_ROTARY_OP = "model.rotary_embedding_op"
# The model's kind (optc.canonical.model_kind): a decoder with a KV cache, or a BERT-style encoder.
# Passes that rewrite the cache, decode or causal prefill require the first; encoder rewrites the
# second; a pass meaningful for both (weight_quant, outlier_split, clean-ups) requires neither.
MODEL_DECODER = "model.decoder"
MODEL_ENCODER = "model.encoder"
MODEL_KIND_FACTS = (MODEL_DECODER, MODEL_ENCODER)
MODEL_FACTS_TEXT = {
    MODEL_POSITION_IDS: "a position_ids graph input",
    MODEL_ROTARY_OP: "RoPE as ONNX RotaryEmbedding ops",
    MODEL_DECODER: "a decoder with a KV cache",
    MODEL_ENCODER: "a BERT-style encoder",
}


# why a weight rewrite must run before layer_routing (Contract.precedes)
ROUTED_MATMULS = ("layer_routing moves each routable layer's MatMuls into an If branch, out of reach of a weight "
                  "rewrite of the main graph and of its calibration")


@dataclass(frozen=True)
class Contract:
    """A pass's declared requirements and guarantees, for one set of options."""

    requires: frozenset[str] = frozenset()          # model facts that must hold
    ensures: frozenset[str] = frozenset()           # facts this pass establishes
    conflicts: dict[str, str] = field(default_factory=dict)  # another pass's fact -> why not together
    # another pass's fact -> why this pass must come before it in the config (the other's rewrite
    # moves what this one rewrites out of its reach)
    precedes: dict[str, str] = field(default_factory=dict)
    # the most tokens the KV cache will ever hold under this pass (sink_window: sinks + window)
    cache_bound: int | None = None
    # the pass does nothing until the cache holds this many tokens (KIVI stores a group only once
    # residual + group_size tokens are cached): paired with a smaller bound it would be a silent no-op
    cache_needs: int | None = None


@dataclass
class PassContext:
    """What a pass may consult besides the graph: the target, the canonical decoder info, and
    what earlier passes asked of the runtime (written into the manifest by the compile)."""

    target: str = "cpu"
    decoder: object | None = None   # optc.canonical.DecoderInfo
    runtime: RuntimeRequests = field(default_factory=RuntimeRequests)
    # for passes that calibrate on text (outlier_split): the tokenizer.json and the BOS token
    tokenizer: Path | None = None
    bos_token_id: int | None = None
    # what passes report beyond rewriting (per-layer statistics): pass name -> list of reports;
    # the compile writes it into the manifest's `pass_reports`
    reports: dict = field(default_factory=dict)
    log: Callable[[str], None] = print


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
    def contract(cls, options: PassOptions) -> Contract:
        """What this pass requires and ensures with these options (default: nothing)."""
        return Contract()

    @classmethod
    def declared_perplexity_budget(cls, options: PassOptions) -> float | None:
        """A lossy pass declares the relative perplexity increase it may cost with these options;
        compile enforces the sum when the config's `verify:` sets no perplexity budget itself."""
        return None

    @classmethod
    def declared_embedding_budget(cls, options: PassOptions) -> dict[str, float] | None:
        """On an encoder, a lossy pass declares what it may cost the pooled embeddings:
        {"min_embedding_cosine": c, "min_retrieval_agreement": a} (either may be absent). Compile
        enforces them (losses add: 1 - Σ(1 - c)) where the config's `verify:` sets neither."""
        return None
