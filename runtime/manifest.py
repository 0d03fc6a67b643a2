"""The pass <-> backend <-> runtime contract, spelled once.

Passes write what they ask of the runtime into the artifact's manifest; backends compile graphs
whose reserved inputs and outputs the runtime feeds and reads. Every name and kind they share is
defined here and imported by all three sides, so that none is spelled twice.

Standard-library dataclasses only: the runtime imports no pydantic. `from_dict` validates the
types of a manifest section (a hand-edited manifest gets an `ArtifactError`, not a crash), and
`to_dict` writes the section in one fixed key order, so that the same cache gives the same bytes
whatever order the passes ran in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from optc.runtime.artifact import ArtifactError, shown_key

# ---------------------------------------------------------------- graph interface names
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
TOKEN_TYPE_IDS = "token_type_ids"  # an encoder's segment ids (optc feeds zeros: one segment)
LOGITS = "logits"
# sink_window: every cached key's slot in the bounded cache, fed at every step
KEY_POSITION_IDS = "optc.key_position_ids"
# The exporter's metadata key holding the trained context length
CONTEXT_METADATA_KEY = "optc.context"
# block_sparse wraps each layer's Attention in an If whose name ends with this
BLOCK_SPARSE_IF_SUFFIX = "/block_sparse_if"
_ATTENTION_OUTPUT_PREFIX = "optc.attn."
# token_dropping (mode encoder): which input tokens the shortened hidden states are, and their mask
KEPT_TOKEN_INDICES = "optc.kept_token_indices"
KEPT_ATTENTION_MASK = "optc.kept_attention_mask"
# token_dropping reduce merge: how many input tokens each kept row stands for (the pooling weights)
KEPT_TOKEN_SIZES = "optc.kept_token_sizes"

KV_KINDS = ("key", "value")
# node metadata: outlier_split marks the float MatMul of each outlier branch with this key, so a
# rerun does not quantise it and the backends (int8 stacking, NPU partitioning) keep it in float
FLOAT_BRANCH_KEY = "optc.outlier_split"

# ---------------------------------------------------------------- model kinds
# The manifest's `model.kind`: a decoder (ModelSpec: prefill/decode over a KV cache) or a
# BERT-style encoder (EncoderSpec: text -> pooled embedding). Absent in artifacts written before
# encoders compiled: a decoder.
MODEL_KIND_DECODER = "decoder"
MODEL_KIND_ENCODER = "encoder"
MODEL_KINDS = (MODEL_KIND_DECODER, MODEL_KIND_ENCODER)
ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
# what weights an encoder's mean pooling: the graph output a pass adds, or (None) the input mask
POOLING_WEIGHT_OUTPUTS = (KEPT_TOKEN_SIZES, KEPT_ATTENTION_MASK)


def past_name(layer: int, kind: str) -> str:
    """The float cache input of one layer: `past_key_values.{layer}.{key|value}`."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The Concat(past, new) output of one layer: `present.{layer}.{key|value}`."""
    return f"present.{layer}.{kind}"


def new_kv_output(layer: int, kind: str) -> str:
    """The output a backend adds for this step's new keys / values (the runtime appends them)."""
    return f"optc.new.{layer}.{kind}"


def attention_output(layer: int) -> str:
    """Per-layer attention probabilities exposed for a scoring policy (H2O)."""
    return f"{_ATTENTION_OUTPUT_PREFIX}{layer}"


def is_attention_output(name: str) -> bool:
    return name.startswith(_ATTENTION_OUTPUT_PREFIX)


def kivi_input(base: str, part: str) -> str:
    """One stored tensor of a KIVI-compressed cache input: base.{q|scale|zero|residual}."""
    return f"{base}.{part}"


# ---------------------------------------------------------------- kinds
LOGIT_ROWS_INPUT = "optc.logit_rows"  # ONNX Runtime artifacts: logits for the step's last N rows only
LAYOUT_FLOAT = "float"
LAYOUT_KIVI = "kivi"
# int8 per element, dequantised by fixed per-layer/head/channel scales that live in the graph
# (kv_quantize scales: static; ONNX Runtime's GroupQueryAttention int8 cache on the fused path)
LAYOUT_INT8 = "int8"
POSITIONS_ABSOLUTE = "absolute"
POSITIONS_CACHE_SLOT = "cache_slot"   # StreamingLLM: a token's position is its slot in the cache
POLICY_SINK_WINDOW = "sink_window"
POLICY_H2O = "h2o"
KEY_QUANT_PER_CHANNEL = "per_channel"
KEY_QUANT_PER_TOKEN = "per_token"
# token_dropping (mode prefill): the kv_cache key naming the first layer whose cache holds only the
# prompt tokens kept in prefill (earlier layers hold them all: per-layer cache lengths)
PRUNED_FROM_LAYER = "pruned_from_layer"
# layer_routing: the bool input saying which layers run this step, and the per-layer change output
LAYERS_RUN_INPUT = "optc.layers_run"
LAYER_CHANGE_OUTPUT = "optc.layer_change"



class ManifestError(ArtifactError):
    """A manifest section has the wrong shape or types (a hand-edited manifest)."""


def _need(d: dict, key: str, types, where: str, *, optional: bool = False):
    if key not in d:
        if optional:
            return None
        raise ManifestError(f"{where}.{key}: missing")
    v = d[key]
    if v is None and optional:
        return None
    allowed = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python: accept it only where a bool is asked for
    if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
        names = "/".join(t.__name__ for t in allowed)
        raise ManifestError(f"{where}.{key}: expected {names}, got {type(v).__name__}")
    return v


def _no_extra(d: dict, allowed: set[str], where: str) -> None:
    extra = sorted(shown_key(k) for k in set(d) - allowed)
    if extra:
        raise ManifestError(f"{where}.{extra[0]}: unknown key")


# ---------------------------------------------------------------- cache policies
@dataclass(frozen=True)
class SinkWindowPolicy:
    """Keep the first `sinks` tokens and the last `window`; positions by cache slot."""

    sinks: int
    window: int
    kind: str = POLICY_SINK_WINDOW

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sinks": self.sinks, "window": self.window}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> SinkWindowPolicy:
        _no_extra(d, {"kind", "sinks", "window"}, where)
        sinks, window = _need(d, "sinks", int, where), _need(d, "window", int, where)
        if sinks < 0 or window <= 0:
            raise ManifestError(f"{where}: sinks >= 0 and window > 0 required")
        return cls(sinks, window)


@dataclass(frozen=True)
class H2OPolicy:
    """Heavy-hitter eviction by accumulated attention (keep sinks, recent, and the best-scored)."""

    sinks: int
    recent: int
    budget: int | None
    ratio: float | None
    score: str = "accumulated_attention"
    kind: str = POLICY_H2O

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sinks": self.sinks, "recent": self.recent, "budget": self.budget,
                "ratio": self.ratio, "score": self.score}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> H2OPolicy:
        _no_extra(d, {"kind", "sinks", "recent", "budget", "ratio", "score"}, where)
        sinks, recent = _need(d, "sinks", int, where), _need(d, "recent", int, where)
        budget = _need(d, "budget", int, where, optional=True)
        ratio = _need(d, "ratio", (int, float), where, optional=True)
        if (budget is None) == (ratio is None):
            raise ManifestError(f"{where}: exactly one of budget and ratio")
        if sinks < 0 or recent < 0 or (budget is not None and budget <= sinks + recent) or \
                (ratio is not None and not 0 < ratio < 1):
            raise ManifestError(f"{where}: sinks, recent, budget or ratio out of range")
        return cls(sinks, recent, budget, None if ratio is None else float(ratio),
                   _need(d, "score", str, where))


Policy = SinkWindowPolicy | H2OPolicy


@dataclass(frozen=True)
class KiviSpec:
    """KIVI storage of the cache: int8/int4 groups plus a float residual of the newest tokens."""

    bits: int
    group_size: int
    residual: int
    symmetric: bool
    key_quant: str = KEY_QUANT_PER_CHANNEL

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "residual": self.residual,
                "symmetric": self.symmetric, "key_quant": self.key_quant}


@dataclass(frozen=True)
class KVCacheSpec:
    """The manifest's `kv_cache` section: how the runtime stores, positions and evicts the cache."""

    layout: str = LAYOUT_FLOAT
    positions: str = POSITIONS_ABSOLUTE
    policy: Policy | None = None
    kivi: KiviSpec | None = None
    pruned_from_layer: int | None = None  # token_dropping mode prefill: layers from here cache kept tokens only

    @property
    def slot_positions(self) -> bool:
        return self.positions == POSITIONS_CACHE_SLOT

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"layout": self.layout, "positions": self.positions}
        if self.policy is not None:
            out["policy"] = self.policy.to_dict()
        if self.kivi is not None:
            out.update(self.kivi.to_dict())
        if self.pruned_from_layer is not None:
            out[PRUNED_FROM_LAYER] = self.pruned_from_layer
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json: kv_cache") -> KVCacheSpec:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object")
        layout = d.get("layout", LAYOUT_FLOAT)
        positions = d.get("positions", POSITIONS_ABSOLUTE)
        if positions not in (POSITIONS_ABSOLUTE, POSITIONS_CACHE_SLOT):
            raise ManifestError(f"{where}.positions: unknown {positions!r}")
        policy = None
        raw = d.get("policy")
        if raw is not None:
            if not isinstance(raw, dict):
                raise ManifestError(f"{where}.policy: expected an object")
            kind = raw.get("kind")
            if kind == POLICY_SINK_WINDOW:
                policy = SinkWindowPolicy.from_dict(raw, f"{where}.policy")
            elif kind == POLICY_H2O:
                policy = H2OPolicy.from_dict(raw, f"{where}.policy")
            else:
                raise ManifestError(f"{where}.policy.kind: unknown {kind!r}")
        pruned = _need(d, PRUNED_FROM_LAYER, int, where, optional=True)
        if pruned is not None and not 1 <= pruned <= MAX_DIM:
            raise ManifestError(f"{where}.{PRUNED_FROM_LAYER}: a layer index >= 1, got {pruned}")
        kivi = None
        if layout == LAYOUT_KIVI:
            _no_extra(d, {"layout", "positions", "policy", "bits", "group_size", "residual", "symmetric",
                          "key_quant", PRUNED_FROM_LAYER}, where)
            bits = _need(d, "bits", int, where)
            if bits not in (4, 8):
                raise ManifestError(f"{where}.bits: 4 or 8, got {bits}")
            key_quant = d.get("key_quant", KEY_QUANT_PER_CHANNEL)
            if key_quant not in (KEY_QUANT_PER_CHANNEL, KEY_QUANT_PER_TOKEN):
                raise ManifestError(f"{where}.key_quant: unknown {key_quant!r}")
            group, residual = _need(d, "group_size", int, where), _need(d, "residual", int, where)
            if group <= 0 or residual < 0:
                raise ManifestError(f"{where}: group_size > 0 and residual >= 0 required")
            kivi = KiviSpec(bits, group, residual, _need(d, "symmetric", bool, where), key_quant)
        elif layout == LAYOUT_FLOAT:
            _no_extra(d, {"layout", "positions", "policy", PRUNED_FROM_LAYER}, where)
        elif layout == LAYOUT_INT8:
            _no_extra(d, {"layout", "positions"}, where)  # (no policy or pruning: kv_quantize refuses them)
        else:
            raise ManifestError(f"{where}.layout: unknown {layout!r}")
        return cls(layout, positions, policy, kivi, pruned)


@dataclass(frozen=True)
class LayerRoutingSpec:
    """The manifest's `layer_routing` section: the routable layers (in the order of the graph's
    LAYER_CHANGE_OUTPUT entries), how many decode skips, and for mode static the fixed set (None:
    chosen per prompt from the change output after the prompt's prefill)."""

    layers: list
    max_skip: int
    static: list | None = None

    def to_dict(self) -> dict:
        return {"run_input": LAYERS_RUN_INPUT, "change_output": LAYER_CHANGE_OUTPUT, "layers": list(self.layers),
                "max_skip": self.max_skip, "static": None if self.static is None else list(self.static)}

    @classmethod
    def from_dict(cls, d: Any, n_layers: int, where: str = "manifest.json: layer_routing") -> LayerRoutingSpec | None:
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object")
        _no_extra(d, {"run_input", "change_output", "layers", "max_skip", "static"}, where)
        if d.get("run_input") != LAYERS_RUN_INPUT or d.get("change_output") != LAYER_CHANGE_OUTPUT:
            raise ManifestError(f"{where}: run_input/change_output must be {LAYERS_RUN_INPUT!r}/{LAYER_CHANGE_OUTPUT!r}")
        layers = _need(d, "layers", list, where)
        static = _need(d, "static", list, where, optional=True)
        for key, xs in (("layers", layers), ("static", static or [])):
            if any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < n_layers for x in xs):
                raise ManifestError(f"{where}.{key}: layer indices 1..{n_layers - 1} expected")
        max_skip = _need(d, "max_skip", int, where)
        if not 0 <= max_skip <= len(layers) or (static is not None and (len(static) != max_skip
                                                                      or not set(static) <= set(layers))):
            raise ManifestError(f"{where}: max_skip / static do not fit the routable layers")
        return cls(layers, max_skip, static)


@dataclass
class RuntimeRequests:
    """What passes ask of the runtime while a pipeline runs (the compile turns it into manifest
    sections): the cache spec (a pass replaces the fields it decides), and block-sparse
    prefill's minimum prompt length."""

    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    block_sparse_min_prefill: int | None = None
    layer_routing: LayerRoutingSpec | None = None
    # encoders: the graph output that weights each hidden-state row in the mean pooling
    # (token_dropping mode encoder: the kept rows' sizes or mask); None: the input attention mask
    pooling_weights: str | None = None

    def update_cache(self, **fields) -> None:
        self.kv_cache = replace(self.kv_cache, **fields)

    def prefill(self) -> dict | None:
        """The backends' `prefill` argument (block-sparse prefill) or None."""
        if self.block_sparse_min_prefill is None:
            return None
        return {"min_prefill_tokens": self.block_sparse_min_prefill}


# ---------------------------------------------------------------- model and backend sections
# Every count and size in these sections is a static dimension of some compiled tensor: one past
# a signed 32-bit index is a hand edit (optc.ir refuses such a dimension in an input graph too).
MAX_DIM = 2**31 - 1


def _count(d: dict, key: str, where: str, *, lo: int = 1, optional: bool = False) -> int | None:
    v = _need(d, key, int, where, optional=optional)
    if v is not None and not lo <= v <= MAX_DIM:
        raise ManifestError(f"{where}.{key}: {lo}..{MAX_DIM}, got {v}")
    return v


def _str_list(d: dict, key: str, where: str, *, optional: bool = False) -> list[str]:
    v = _need(d, key, list, where, optional=optional)
    if v is None:
        return []
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise ManifestError(f"{where}.{key}[{i}]: expected str, got {type(item).__name__}")
    return v


def _object(d: Any, where: str) -> dict:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    return d


@dataclass(frozen=True)
class ModelSpec:
    """The manifest's `model` section: the decoder as the canonicaliser found it, plus the
    tokenizer's special ids and the embedding table's initializer name (the runtime bounds token
    ids by that table's rows, not by `vocab_size` alone)."""

    n_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context: int | None
    rotary: str
    norm: str
    mlp: str
    rewrites: dict
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    embedding: str | None = None
    kind: str = MODEL_KIND_DECODER

    KEYS = ("n_layers", "num_heads", "kv_heads", "head_dim", "hidden_size", "vocab_size", "context", "rotary",
            "norm", "mlp", "rewrites", "bos_token_id", "eos_token_id", "embedding", "kind")

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json: model") -> ModelSpec:
        d = _object(d, where)
        kind = model_kind(d, where)
        if kind != MODEL_KIND_DECODER:
            raise ManifestError(f"{where}.kind: {kind!r}, not a decoder (optc.runtime.load returns an EncoderModel "
                                f"for an encoder artifact)")
        _no_extra(d, set(cls.KEYS), where)
        sizes = {k: _count(d, k, where) for k in cls.KEYS[:6]}
        if sizes["num_heads"] % sizes["kv_heads"]:
            raise ManifestError(f"{where}: num_heads ({sizes['num_heads']}) is not a multiple of kv_heads "
                                f"({sizes['kv_heads']})")
        rewrites = _object(_need(d, "rewrites", dict, where), f"{where}.rewrites")
        for k, v in rewrites.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ManifestError(f"{where}.rewrites.{shown_key(k)}: expected a count, got {v!r}")
        special = {}
        for k in ("bos_token_id", "eos_token_id"):
            special[k] = _count(d, k, where, lo=0, optional=True)
            if special[k] is not None and special[k] >= sizes["vocab_size"]:
                raise ManifestError(f"{where}.{k}: {special[k]} is outside the vocabulary "
                                    f"(0..{sizes['vocab_size'] - 1})")
        return cls(**sizes, context=_count(d, "context", where, optional=True),
                   rotary=_need(d, "rotary", str, where), norm=_need(d, "norm", str, where),
                   mlp=_need(d, "mlp", str, where), rewrites=rewrites, **special,
                   embedding=_need(d, "embedding", str, where, optional=True))


def model_kind(d: Any, where: str = "manifest.json: model") -> str:
    """The `model` section's kind ('decoder' where absent: artifacts from before encoders)."""
    d = _object(d, where)
    kind = _need(d, "kind", str, where, optional=True) or MODEL_KIND_DECODER
    if kind not in MODEL_KINDS:
        raise ManifestError(f"{where}.kind: one of {', '.join(MODEL_KINDS)}, got {kind!r}"[:300])
    return kind


@dataclass(frozen=True)
class EncoderSpec:
    """The manifest's `model` section for a BERT-style encoder (kind 'encoder'): what the
    canonicaliser found, the token inputs the graph takes and its hidden-state output, and how the
    runtime turns that into one embedding per text: truncate to `max_length` tokens, pad with
    `pad_token_id`, mean-pool the output rows weighted by `pooling_weights` (a graph output a pass
    added, e.g. token_dropping's kept-token sizes; None: the input attention mask), L2-normalise
    when `normalize` (sentence-transformers' Normalize module)."""

    n_layers: int
    num_heads: int
    hidden_size: int
    vocab_size: int
    context: int | None
    norm: str
    mlp: str
    inputs: list
    output: str
    rewrites: dict
    max_length: int
    pad_token_id: int
    pooling: str
    pooling_weights: str | None
    normalize: bool
    embedding: str | None = None
    kind: str = MODEL_KIND_ENCODER

    KEYS = ("kind", "n_layers", "num_heads", "hidden_size", "vocab_size", "context", "norm", "mlp", "inputs",
            "output", "rewrites", "max_length", "pad_token_id", "pooling", "pooling_weights", "normalize",
            "embedding")
    POOLINGS = ("mean",)

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json: model") -> EncoderSpec:
        d = _object(d, where)
        if model_kind(d, where) != MODEL_KIND_ENCODER:
            raise ManifestError(f"{where}.kind: not an encoder")
        _no_extra(d, set(cls.KEYS), where)
        sizes = {k: _count(d, k, where) for k in ("n_layers", "num_heads", "hidden_size", "vocab_size")}
        context = _count(d, "context", where, optional=True)
        inputs = _str_list(d, "inputs", where)
        if not {INPUT_IDS, ATTENTION_MASK} <= set(inputs) or not set(inputs) <= set(ENCODER_INPUTS) \
                or len(set(inputs)) != len(inputs):
            raise ManifestError(f"{where}.inputs: input_ids and attention_mask, optionally token_type_ids, "
                                f"got {inputs!r}"[:300])
        rewrites = _object(_need(d, "rewrites", dict, where), f"{where}.rewrites")
        max_length = _count(d, "max_length", where)
        if context is not None and max_length > context:
            raise ManifestError(f"{where}.max_length: {max_length} is past the model's context ({context})")
        pad = _count(d, "pad_token_id", where, lo=0)
        if pad >= sizes["vocab_size"]:
            raise ManifestError(f"{where}.pad_token_id: {pad} is outside the vocabulary")
        pooling = _need(d, "pooling", str, where)
        if pooling not in cls.POOLINGS:
            raise ManifestError(f"{where}.pooling: one of {', '.join(cls.POOLINGS)}, got {pooling!r}"[:300])
        weights = _need(d, "pooling_weights", str, where, optional=True)
        if weights is not None and weights not in POOLING_WEIGHT_OUTPUTS:
            raise ManifestError(f"{where}.pooling_weights: one of {', '.join(POOLING_WEIGHT_OUTPUTS)} or null, "
                                f"got {weights!r}"[:300])
        return cls(**sizes, context=context, norm=_need(d, "norm", str, where), mlp=_need(d, "mlp", str, where),
                   inputs=inputs, output=_need(d, "output", str, where), rewrites=rewrites, max_length=max_length,
                   pad_token_id=pad, pooling=pooling, pooling_weights=weights,
                   normalize=_need(d, "normalize", bool, where),
                   embedding=_need(d, "embedding", str, where, optional=True))

    def to_dict(self) -> dict:
        """The section in one fixed key order."""
        return {k: getattr(self, k) for k in self.KEYS}


def _kv_outputs(d: dict, where: str, n_layers: int) -> list:
    pairs = _need(d, "kv_outputs", list, where)
    if len(pairs) != n_layers:
        raise ManifestError(f"{where}.kv_outputs: {len(pairs)} layers, the model has {n_layers}")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ManifestError(f"{where}.kv_outputs[{i}]: expected [key output, value output]")
    return pairs


@dataclass(frozen=True)
class KvInPlace:
    """The fused path of an ONNX Runtime artifact (backends/onnxruntime_fused.py): the graph's
    attention op writes each step's keys/values into the cache buffer it reads (`cache_inputs`
    per layer; bound to the same memory as the `kv_outputs`), told the cache length through two
    int32 inputs; its rotary tables cover `max_positions` positions. With a sink_window policy
    (slot positions) the op also takes an additive `attention_bias_input` that hides the rows the
    window has left until the runtime compacts the buffer, and `rotary_inv_freq` (one angle per
    rotated pair, radians per position) lets the runtime move rotated keys down to their new slot
    (runtime/cache/window.py). With token_dropping (mode prefill), the layers from
    kv_cache.pruned_from_layer on hold fewer tokens: `pruned_past_input` tells the graph how many
    (it computes their GQA lengths from it and the step's kept tokens); with sink_window as well,
    `pruned_attention_bias_input` takes their own bias row (their buffer is compacted by their own
    length)."""

    op: str
    seqlens_input: str
    total_input: str
    max_positions: int
    cache_inputs: list
    attention_bias_input: str | None = None
    rotary_inv_freq: list | None = None
    pruned_past_input: str | None = None  # token_dropping: the pruned layers' cache length (int64 [1])
    pruned_attention_bias_input: str | None = None  # token_dropping + sink_window: their bias row

    @classmethod
    def from_dict(cls, d: Any, n_layers: int, where: str) -> KvInPlace:
        d = _object(d, where)
        _no_extra(d, {"op", "seqlens_input", "total_input", "max_positions", "cache_inputs", "attention_bias_input",
                      "rotary_inv_freq", "pruned_past_input", "pruned_attention_bias_input"}, where)
        bias = _need(d, "attention_bias_input", str, where, optional=True)
        freq = _need(d, "rotary_inv_freq", list, where, optional=True)
        if (bias is None) != (freq is None) or (freq is not None and (
                not freq or not all(isinstance(f, float) and 0 <= f < 10 for f in freq))):
            raise ManifestError(f"{where}: attention_bias_input and rotary_inv_freq (a list of angles per position) "
                                f"go together")
        op = _need(d, "op", str, where)
        if op != "com.microsoft.GroupQueryAttention":
            raise ManifestError(f"{where}.op: 'com.microsoft.GroupQueryAttention', got {op!r}"[:300])
        pairs = _need(d, "cache_inputs", list, where)
        if len(pairs) != n_layers or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                             for p in pairs):
            raise ManifestError(f"{where}.cache_inputs: [key input, value input] for each of {n_layers} layers")
        pruned = _need(d, "pruned_past_input", str, where, optional=True)
        pruned_bias = _need(d, "pruned_attention_bias_input", str, where, optional=True)
        if (pruned_bias is not None) != (pruned is not None and bias is not None):
            raise ManifestError(f"{where}: pruned_attention_bias_input goes with pruned_past_input (token_dropping) "
                                f"and attention_bias_input (sink_window) together, and only with them")
        return cls(op, _need(d, "seqlens_input", str, where), _need(d, "total_input", str, where),
                   _count(d, "max_positions", where), pairs, bias, freq, pruned, pruned_bias)


@dataclass(frozen=True)
class OnnxRuntimeBackend:
    """The `backend` section of an ONNX Runtime artifact (session_options: the executor's)."""

    graph: str
    weights: list
    providers: list
    session_options: dict
    kv_outputs: list
    attention_outputs: list
    kv_in_place: KvInPlace | None = None
    # an int64 [1] input: how many of the step's last rows get logits (a prompt's prefill needs one;
    # absent in artifacts compiled before it: every row's)
    logit_rows_input: str | None = None

    KEYS = ("name", "graph", "weights", "providers", "session_options", "kv_outputs", "attention_outputs",
            "kv_in_place", "logit_rows_input")

    @classmethod
    def from_dict(cls, d: Any, n_layers: int, where: str = "manifest.json: backend") -> OnnxRuntimeBackend:
        d = _object(d, where)
        _no_extra(d, set(cls.KEYS), where)
        providers = _str_list(d, "providers", where, optional=True) or ["CPUExecutionProvider"]
        kv_outputs = _kv_outputs(d, where, n_layers)
        in_place = d.get("kv_in_place")
        in_place = None if in_place is None else KvInPlace.from_dict(in_place, n_layers, f"{where}.kv_in_place")
        return cls(_need(d, "graph", str, where), _str_list(d, "weights", where, optional=True), providers,
                   _need(d, "session_options", dict, where, optional=True) or {}, kv_outputs,
                   _str_list(d, "attention_outputs", where, optional=True), in_place,
                   _need(d, "logit_rows_input", str, where, optional=True))


@dataclass(frozen=True)
class TvmBucket:
    """One compiled static shape: `tokens` new tokens over cache segments of these capacities."""

    name: str
    tokens: int
    segments: list
    inputs: list
    params: list
    branch: str | None = None

    @classmethod
    def from_dict(cls, d: Any, n_segments: int, where: str) -> TvmBucket:
        d = _object(d, where)
        _no_extra(d, {"name", "tokens", "segments", "inputs", "params", "branch"}, where)
        segments = _need(d, "segments", list, where)
        if len(segments) != n_segments or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_DIM
                                              for s in segments):
            raise ManifestError(f"{where}.segments: {n_segments} capacities 0..{MAX_DIM} expected, got {segments!r}"[:300])
        branch = _need(d, "branch", str, where, optional=True)
        if branch not in (None, "dense", "sparse"):
            raise ManifestError(f"{where}.branch: 'dense' or 'sparse', got {branch!r}")
        return cls(_need(d, "name", str, where), _count(d, "tokens", where), segments,
                   _str_list(d, "inputs", where), _str_list(d, "params", where), branch)


@dataclass(frozen=True)
class TvmSegment:
    """Cache inputs stored together (one capacity per bucket); `inputs` maps each to how many
    tokens one of its slots holds."""

    name: str
    inputs: dict
    granularity: int

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TvmSegment:
        d = _object(d, where)
        _no_extra(d, {"name", "inputs", "granularity"}, where)
        inputs = _need(d, "inputs", dict, where)
        if not inputs:
            raise ManifestError(f"{where}.inputs: empty")
        for k, v in inputs.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM:
                raise ManifestError(f"{where}.inputs.{shown_key(k)}: expected a positive integer, got {v!r}")
        return cls(_need(d, "name", str, where), inputs, _count(d, "granularity", where))


@dataclass(frozen=True)
class TvmBackend:
    """The `backend` section of a TVM artifact: the library, its parameters and its buckets."""

    library: str
    params: str
    device: str
    segments: list
    buckets: list
    sparse_prefill_min_tokens: int | None
    kv_outputs: list
    attention_outputs: list

    # the backend writes these in backends/tvm/pipeline.py (`schedules`, `bool_loops_kept_scalar`: CUDA only)
    KEYS = ("name", "library", "params", "target", "target_kind", "device", "tuning", "cuda", "schedules",
            "bool_loops_kept_scalar", "fused_decode_attention", "fused_prefill_attention", "segments",
            "sparse_prefill_min_tokens", "buckets", "kv_outputs", "attention_outputs")

    @classmethod
    def from_dict(cls, d: Any, n_layers: int, where: str = "manifest.json: backend") -> TvmBackend:
        d = _object(d, where)
        _no_extra(d, set(cls.KEYS), where)
        device = _need(d, "device", str, where, optional=True) or "cpu"
        if device not in ("cpu", "cuda"):
            raise ManifestError(f"{where}.device: 'cpu' or 'cuda', got {device!r}")
        for k in ("target", "tuning", "cuda"):
            if d.get(k) is not None:
                _object(d[k], f"{where}.{k}")
        _need(d, "target_kind", str, where, optional=True)
        _need(d, "schedules", str, where, optional=True)
        for k in ("fused_decode_attention", "fused_prefill_attention", "bool_loops_kept_scalar"):
            _count(d, k, where, lo=0, optional=True)
        segments = [TvmSegment.from_dict(s, f"{where}.segments[{i}]")
                    for i, s in enumerate(_need(d, "segments", list, where))]
        raw = _need(d, "buckets", list, where)
        if not raw:
            raise ManifestError(f"{where}.buckets: no compiled shape")
        buckets = [TvmBucket.from_dict(b, len(segments), f"{where}.buckets[{i}]") for i, b in enumerate(raw)]
        sparse = _count(d, "sparse_prefill_min_tokens", where, optional=True)
        if sparse is None and any(b.branch == "sparse" for b in buckets):
            raise ManifestError(f"{where}.sparse_prefill_min_tokens: needed by the 'sparse' buckets")
        return cls(_need(d, "library", str, where), _need(d, "params", str, where), device, segments, buckets,
                   sparse, _kv_outputs(d, where, n_layers), _str_list(d, "attention_outputs", where, optional=True))


NPU_DEVICES = ("npu", "cpu")
NPU_PROVIDERS = ("qnn", "openvino", "any")


@dataclass(frozen=True)
class NpuPartition:
    """One partition of a static NPU graph: its own ONNX file, the device it was placed on, and
    the tensors it reads and writes (by name, from the step's other partitions or inputs)."""

    file: str
    weights: list
    device: str
    nodes: int
    inputs: list
    outputs: list
    context: str | None = None  # QNN's compiled context of the partition (ORT EPContext model)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> NpuPartition:
        d = _object(d, where)
        _no_extra(d, {"file", "weights", "device", "nodes", "inputs", "outputs", "context"}, where)
        device = _need(d, "device", str, where)
        if device not in NPU_DEVICES:
            raise ManifestError(f"{where}.device: one of {', '.join(NPU_DEVICES)}, got {device!r}")
        return cls(_need(d, "file", str, where), _str_list(d, "weights", where, optional=True), device,
                   _count(d, "nodes", where), _str_list(d, "inputs", where), _str_list(d, "outputs", where),
                   _need(d, "context", str, where, optional=True))


@dataclass(frozen=True)
class NpuGraph:
    """A static-shape step graph (`tokens` new tokens over the cache's `max_cache` slots), split
    into partitions that run in order."""

    tokens: int
    partitions: list

    @classmethod
    def from_dict(cls, d: Any, where: str) -> NpuGraph:
        d = _object(d, where)
        _no_extra(d, {"tokens", "partitions"}, where)
        parts = [NpuPartition.from_dict(p, f"{where}.partitions[{i}]")
                 for i, p in enumerate(_need(d, "partitions", list, where))]
        if not parts:
            raise ManifestError(f"{where}.partitions: empty")
        return cls(_count(d, "tokens", where), parts)


@dataclass(frozen=True)
class NpuBackend:
    """The `backend` section of an NPU artifact (backends/npu/): a prefill graph for chunks of
    `chunk` tokens and a decode graph for one, both over a cache of `max_cache` slots."""

    profile: str
    execution_provider: str
    provider_options: dict
    allow_cpu_fallback: bool
    chunk: int
    max_cache: int
    prefill: NpuGraph
    decode: NpuGraph
    kv_outputs: list

    KEYS = ("name", "profile", "execution_provider", "provider_options", "allow_cpu_fallback", "chunk",
            "max_cache", "graphs", "kv_outputs", "partition_report")

    @classmethod
    def from_dict(cls, d: Any, n_layers: int, where: str = "manifest.json: backend") -> NpuBackend:
        d = _object(d, where)
        _no_extra(d, set(cls.KEYS), where)
        provider, options = _npu_provider(d, where)
        graphs = _object(_need(d, "graphs", dict, where), f"{where}.graphs")
        _no_extra(graphs, {"prefill", "decode"}, f"{where}.graphs")
        prefill = NpuGraph.from_dict(_need(graphs, "prefill", dict, f"{where}.graphs"), f"{where}.graphs.prefill")
        decode = NpuGraph.from_dict(_need(graphs, "decode", dict, f"{where}.graphs"), f"{where}.graphs.decode")
        chunk = _count(d, "chunk", where)
        if prefill.tokens != chunk or decode.tokens != 1:
            raise ManifestError(f"{where}.graphs: prefill takes chunk ({chunk}) tokens and decode 1, got "
                                f"{prefill.tokens} and {decode.tokens}")
        return cls(_need(d, "profile", str, where), provider, options,
                   bool(_need(d, "allow_cpu_fallback", bool, where)), chunk, _count(d, "max_cache", where),
                   prefill, decode, _kv_outputs(d, where, n_layers))



def _npu_provider(d: dict, where: str) -> tuple[str, dict]:
    """An NPU backend section's execution provider (one optc knows) and its string options."""
    provider = _need(d, "execution_provider", str, where)
    if provider not in NPU_PROVIDERS:
        raise ManifestError(f"{where}.execution_provider: one of {', '.join(NPU_PROVIDERS)}, got {provider!r}")
    options = _need(d, "provider_options", dict, where, optional=True) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()):
        raise ManifestError(f"{where}.provider_options: string keys and values")
    return provider, options

@dataclass(frozen=True)
class NpuEncoderBackend:
    """The `backend` section of an encoder's NPU artifact (backends/npu/ compile_encoder): one
    static graph taking `batch` texts of exactly `max_length` tokens (shorter texts padded, the
    padding masked; longer ones truncated by the tokenizer), split into partitions that run in
    order, like a decoder's step graph."""

    profile: str
    execution_provider: str
    provider_options: dict
    allow_cpu_fallback: bool
    batch: int
    max_length: int
    graph: NpuGraph

    KEYS = ("name", "profile", "execution_provider", "provider_options", "allow_cpu_fallback", "batch",
            "max_length", "graphs", "partition_report")

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json: backend") -> NpuEncoderBackend:
        d = _object(d, where)
        _no_extra(d, set(cls.KEYS), where)
        provider, options = _npu_provider(d, where)
        graphs = _object(_need(d, "graphs", dict, where), f"{where}.graphs")
        _no_extra(graphs, {"encoder"}, f"{where}.graphs")
        graph = NpuGraph.from_dict(_need(graphs, "encoder", dict, f"{where}.graphs"), f"{where}.graphs.encoder")
        max_length = _count(d, "max_length", where)
        if graph.tokens != max_length:
            raise ManifestError(f"{where}.graphs.encoder: takes max_length ({max_length}) tokens, got {graph.tokens}")
        return cls(_need(d, "profile", str, where), provider, options,
                   bool(_need(d, "allow_cpu_fallback", bool, where)), _count(d, "batch", where), max_length, graph)
