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

from optc.runtime.artifact import ArtifactError

# ---------------------------------------------------------------- graph interface names
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# sink_window: every cached key's slot in the bounded cache, fed at every step
KEY_POSITION_IDS = "optc.key_position_ids"
# The exporter's metadata key holding the trained context length
CONTEXT_METADATA_KEY = "optc.context"
# block_sparse wraps each layer's Attention in an If whose name ends with this
BLOCK_SPARSE_IF_SUFFIX = "/block_sparse_if"
_ATTENTION_OUTPUT_PREFIX = "optc.attn."

KV_KINDS = ("key", "value")


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
LAYOUT_FLOAT = "float"
LAYOUT_KIVI = "kivi"
POSITIONS_ABSOLUTE = "absolute"
POSITIONS_CACHE_SLOT = "cache_slot"   # StreamingLLM: a token's position is its slot in the cache
POLICY_SINK_WINDOW = "sink_window"
POLICY_H2O = "h2o"
KEY_QUANT_PER_CHANNEL = "per_channel"
KEY_QUANT_PER_TOKEN = "per_token"



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
    extra = sorted(set(d) - allowed)
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

    @property
    def slot_positions(self) -> bool:
        return self.positions == POSITIONS_CACHE_SLOT

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"layout": self.layout, "positions": self.positions}
        if self.policy is not None:
            out["policy"] = self.policy.to_dict()
        if self.kivi is not None:
            out.update(self.kivi.to_dict())
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
        kivi = None
        if layout == LAYOUT_KIVI:
            _no_extra(d, {"layout", "positions", "policy", "bits", "group_size", "residual", "symmetric",
                          "key_quant"}, where)
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
            _no_extra(d, {"layout", "positions", "policy"}, where)
        else:
            raise ManifestError(f"{where}.layout: unknown {layout!r}")
        return cls(layout, positions, policy, kivi)


@dataclass
class RuntimeRequests:
    """What passes ask of the runtime while a pipeline runs (the compile turns it into manifest
    sections): the cache spec (a pass replaces the fields it decides), and block-sparse
    prefill's minimum prompt length."""

    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    block_sparse_min_prefill: int | None = None

    def update_cache(self, **fields) -> None:
        self.kv_cache = replace(self.kv_cache, **fields)

    def prefill(self) -> dict | None:
        """The backends' `prefill` argument (block-sparse prefill) or None."""
        if self.block_sparse_min_prefill is None:
            return None
        return {"min_prefill_tokens": self.block_sparse_min_prefill}
