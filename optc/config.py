"""The pass configuration file (YAML), validated strictly with pydantic.

    passes:
      - name: sparse_attention   # the pass; the other keys are its options
        sinks: 4
    verify:                      # optional accuracy budget for the whole pipeline
      max_perplexity_increase: 0.05

Unknown keys and wrong types are errors that name their path (`passes[0].sinks: ...`).
`passes: []` is the identity pipeline.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optc.errors import OptcError


class Strict(BaseModel):
    # allow_inf_nan: `budget: .inf` or `max_perplexity_increase: .nan` is no budget at all
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def no_float(v):
    """A before-validator for integer choices: YAML's `bits: 8.0` is not silently taken as 8."""
    if isinstance(v, float):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


class PassOptions(Strict):
    """Options every pass takes. Each pass subclasses this with its own keys."""

    allow_noop: bool = Field(False, description="do not fail when the pass finds nothing to rewrite")


class VerifyBudget(Strict):
    """Accuracy budget of the whole pipeline, checked on held-out text at compile time."""

    max_perplexity_increase: float | None = Field(
        None, ge=0, description="relative held-out perplexity increase allowed (0.05 = +5%)")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="next-token top-1 agreement floor")
    max_abs_logit_diff: float | None = Field(None, ge=0, description="max |Δlogit| allowed")
    # encoders (no logits): pooled embeddings against the original graph on held-out text pairs
    min_embedding_cosine: float | None = Field(
        None, ge=-1, le=1, description="encoders: mean cosine of pooled embeddings to the original graph's")
    min_retrieval_agreement: float | None = Field(
        None, ge=0, le=1, description="encoders: share of queries whose top-1 document is the original graph's")


class PassSpec(Strict):
    name: str
    options: PassOptions


class PipelineConfig(Strict):
    passes: list[PassSpec] = []
    verify: VerifyBudget = VerifyBudget()

    def to_dict(self) -> dict[str, Any]:
        """The config as data: what `optc config show` prints and the manifest records."""
        out: dict[str, Any] = {"passes": [{"name": p.name, **p.options.model_dump()} for p in self.passes]}
        out["verify"] = self.verify.model_dump()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _key(key) -> str:
    """A mapping key as an error names it: plain text as is, anything else (a newline, a number,
    a list) as its repr, so that the message stays one line."""
    return key if isinstance(key, str) and key.isprintable() else repr(key)


def _loc(prefix: str, loc: tuple) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{_key(part)}" if path else _key(part))
    return path


def first_error(e: ValidationError, prefix: str) -> str:
    err = e.errors()[0]
    where = _loc(prefix, tuple(err["loc"]))
    msg = "unknown key" if err["type"] == "extra_forbidden" else " ".join(err["msg"].split())
    return f"{where}: {msg}"


def parse_config(data: Any, registry, source: str = "<config>") -> PipelineConfig:
    """Validate a parsed YAML document against the registry's pass option schemas."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OptcError(f"{source}: the top level must be a mapping with 'passes' (and optional 'verify')")
    unknown = set(data) - {"passes", "verify"}
    if unknown:  # (keys of any type: YAML allows `1: x` or `[a]: x`)
        raise OptcError(f"{source}: {sorted(map(_key, unknown))[0]}: unknown key (expected 'passes', 'verify')")
    raw_passes = data.get("passes", [])
    if raw_passes is None:
        raw_passes = []
    if not isinstance(raw_passes, list):
        raise OptcError(f"{source}: passes: must be a list")
    specs = []
    for i, raw in enumerate(raw_passes):
        where = f"passes[{i}]"
        if not isinstance(raw, dict):
            raise OptcError(f"{source}: {where}: must be a mapping with a 'name'")
        raw = dict(raw)
        name = raw.pop("name", None)
        if not isinstance(name, str):
            raise OptcError(f"{source}: {where}.name: required (one of: {', '.join(registry.names())})")
        entry = registry.get(name, where=f"{source}: {where}.name")
        try:
            options = entry.options_model.model_validate(raw)
        except ValidationError as e:
            raise OptcError(f"{source}: {first_error(e, where)}") from None
        specs.append(PassSpec(name=name, options=options))
    try:
        verify = VerifyBudget.model_validate(data.get("verify") or {})
    except ValidationError as e:
        raise OptcError(f"{source}: {first_error(e, 'verify')}") from None
    return PipelineConfig(passes=specs, verify=verify)


MAX_CONFIG_BYTES = 1 << 20   # a pass configuration is a few lines; a megabyte is not one
MAX_PASSES = 1000


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # a `? [a, b]` key: PyYAML's own error names it
                break
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: Path, registry) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise OptcError(f"{path}: no such config file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise OptcError(f"{path}: {path.stat().st_size:,} bytes is not a pass configuration (limit 1 MiB)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptcError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        # a reader error (a control character) has no `problem`, and its text spans two lines
        problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OptcError(f"{path}{where}: invalid YAML ({problem})") from None
    except RecursionError:
        raise OptcError(f"{path}: invalid YAML (nested too deeply)") from None
    if isinstance(data, dict) and isinstance(data.get("passes"), list) and len(data["passes"]) > MAX_PASSES:
        raise OptcError(f"{path}: passes: {len(data['passes'])} passes (at most {MAX_PASSES})")
    return parse_config(data, registry, source=str(path))
