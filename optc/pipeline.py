"""The pass manager: checks the configured passes' contracts, then runs them in order, with
instruments.

Before any pass runs, every pass's declared contract (`optc.passes.base.Contract`) is checked
against the canonical model (what it requires) and against every other pass of the pipeline
(what they ensure and what it cannot be combined with), whatever their order: an invalid
combination is one line naming both passes, and nothing has been rewritten.

Instruments: per-pass timing, `dump_ir` (the textual IR after canonicalisation and after each
pass), and onnx.checker after each pass. A configured pass that finds nothing to rewrite fails
the pipeline unless its config says `allow_noop: true`: a silent no-op is a bug users cannot see.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from optc.config import PipelineConfig
from optc.errors import OptcError
from optc.ir import to_checked_proto
from optc.passes.base import (EXCLUSIVE, MODEL_DECODER, MODEL_ENCODER, MODEL_FACTS_TEXT, MODEL_KIND_FACTS,
                              MODEL_POSITION_IDS, MODEL_ROTARY_OP, Contract, PassConfigError, PassContext)
from optc.runtime.manifest import POSITION_IDS


@dataclass
class PassRecord:
    index: int
    name: str
    modified: bool
    seconds: float


@dataclass(frozen=True)
class PlannedPass:
    """One pass to run: where it came from in the config, its class, options and contract."""

    index: int          # passes[index] in the config
    config_name: str    # the name the config used (may stand for several passes)
    pass_class: type
    options: object
    contract: Contract

    @property
    def label(self) -> str:
        name = self.pass_class.name
        return name if name == self.config_name else f"{self.config_name} -> {name}"


def plan(config: PipelineConfig, registry) -> list[PlannedPass]:
    out = []
    for i, spec in enumerate(config.passes):
        entry = registry.get(spec.name, where=f"passes[{i}].name")
        for cls, options in entry.passes(spec.options):
            out.append(PlannedPass(i, spec.name, cls, options, cls.contract(options)))
    return out


def model_facts(model: ir.Model, info) -> set[str]:
    """What the canonical model offers that a pass may require."""
    from optc.canonical import MODEL_KIND_DECODER, MODEL_KIND_ENCODER, model_kind

    facts = set()
    kind = model_kind(model)  # from the graph itself: a decoder has a KV cache, an encoder none
    if kind == MODEL_KIND_DECODER:
        facts.add(MODEL_DECODER)
    elif kind == MODEL_KIND_ENCODER:
        facts.add(MODEL_ENCODER)
    if any(v.name == POSITION_IDS for v in model.graph.inputs):
        facts.add(MODEL_POSITION_IDS)
    if getattr(info, "rotary", None) == "RotaryEmbedding":
        facts.add(MODEL_ROTARY_OP)
    return facts


def _why_not(a: PlannedPass, b: PlannedPass) -> str | None:
    """Every reason the two cannot be combined, joined (the same text in either order), or None."""
    reasons = {EXCLUSIVE[f] for f in a.contract.ensures & b.contract.ensures & set(EXCLUSIVE)}
    for x, y in ((a, b), (b, a)):
        reasons |= {why for fact, why in x.contract.conflicts.items() if fact in y.contract.ensures}
        needs, bound = x.contract.cache_needs, y.contract.cache_bound
        if needs is not None and bound is not None and needs > bound:
            reasons.add(f"the cache never holds more than {bound} tokens, but {x.pass_class.name} acts only once "
                        f"{needs} are cached: it would never change anything (lower its residual/group_size, "
                        f"or keep more tokens)")
    return "; ".join(sorted(reasons)) or None


def missing_fact_details(info, kind: str | None = None) -> dict[str, str]:
    """Why the canonical model lacks a fact, where the canonicaliser knows (e.g. the rotary rule's
    reason for not matching), for the refusal's one line."""
    details = {MODEL_POSITION_IDS: "the export takes no position_ids input, and the graph computes no "
                                   "arange(past_len, past_len + seq) feeding the rotary tables that optc could "
                                   "expose as one"}
    if (kind or getattr(info, "kind", None)) == "encoder":
        details[MODEL_DECODER] = ("it is a BERT-style encoder: no KV cache, no decode, no causal prefill; encoders take "
                                  "token_dropping mode encoder, outlier_split, weight_quant and the clean-ups")
    else:
        details[MODEL_ENCODER] = ("it is a decoder with a KV cache; for a decoder's prompt use token_dropping mode "
                                  "prefill")
    rotary = getattr(info, "rotary", None)
    if rotary == "none found":  # GPT-2 style: positions are learned embeddings added to the input
        details[MODEL_ROTARY_OP] = ("no rotary position embedding in the graph (no RotaryEmbedding, no Sin/Cos): "
                                    "positions encoded otherwise (learned absolute positions, or RoPE read from a "
                                    "precomputed table as GPT-J does) cannot be re-assigned per cache slot")
    elif rotary and rotary != "RotaryEmbedding":
        details[MODEL_ROTARY_OP] = f"rotary: {rotary}"
    return details


def check_contracts(planned: list[PlannedPass], facts: set[str] | None = None,
                    details: dict[str, str] | None = None) -> None:
    """Refuse, before anything runs, a pass whose requirements the model lacks, any two passes
    that cannot be combined (in either order), and two in an order one of them declares it cannot
    run in (`Contract.precedes`). `facts=None` skips the model check."""
    if facts is not None:
        for p in planned:
            # the model's kind first: a decoder-only pass on an encoder is refused for that, not for
            # the position_ids input an encoder also lacks
            missing = sorted(p.contract.requires - facts, key=lambda f: (f not in MODEL_KIND_FACTS, f))
            if missing:
                detail = (details or {}).get(missing[0])
                raise OptcError(f"passes[{p.index}] ({p.label}) needs {MODEL_FACTS_TEXT[missing[0]]}, "
                                f"which the model does not have" + (f" ({detail})" if detail else ""))
    for a, b in itertools.combinations(planned, 2):
        why = _why_not(a, b)
        if why is None:
            continue
        if a.index == b.index:
            raise OptcError(f"passes[{a.index}] ({a.config_name}): its {a.pass_class.name} and "
                            f"{b.pass_class.name} parts cannot be combined: {why}")
        raise OptcError(f"passes[{a.index}] ({a.label}) and passes[{b.index}] ({b.label}) cannot be combined: {why}")
    for earlier, later in itertools.combinations(planned, 2):  # (pairs in config order)
        whys = sorted(why for fact, why in later.contract.precedes.items() if fact in earlier.contract.ensures)
        if whys:
            raise OptcError(f"passes[{later.index}] ({later.label}) must come before passes[{earlier.index}] "
                            f"({earlier.label}) in the config: {'; '.join(whys)}")


def dump_ir(model: ir.Model, directory: Path, step: int, label: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{step:02d}-{label}.txt"
    path.write_text(str(model.graph), encoding="utf-8")
    return path


def run_pipeline(model: ir.Model, config: PipelineConfig, registry, context: PassContext, *,
                 dump_dir: Path | None = None, check: bool = True, log=print) -> list[PassRecord]:
    planned = plan(config, registry)
    from optc.canonical import model_kind

    check_contracts(planned, model_facts(model, context.decoder),
                    missing_fact_details(context.decoder, model_kind(model)))
    if dump_dir is not None:
        dump_ir(model, dump_dir, 0, "canonical")
    records = []
    for step, p in enumerate(planned, start=1):
        i, spec = p.index, config.passes[p.index]
        t0 = time.perf_counter()
        try:
            result = p.pass_class(p.options, context)(model)
        except OptcError:
            raise
        except PassConfigError as e:
            raise OptcError(f"passes[{i}].{e.key}: {e}" if e.key else f"passes[{i}] ({p.label}): {e}") from None
        except ir.passes.PassError as e:
            raise OptcError(f"passes[{i}] ({p.label}): {e}") from None
        seconds = time.perf_counter() - t0
        records.append(PassRecord(i, p.label, bool(result.modified), seconds))
        if not result.modified:
            msg = f"passes[{i}] ({p.label}) matched nothing in the graph"
            if not spec.options.allow_noop:
                raise OptcError(f"{msg}; remove it or set 'allow_noop: true'")
            log(f"[yellow]warning[/]: {msg} (allow_noop: true)")
        else:
            log(f"  pass {i} {p.label}: rewrote the graph in {seconds * 1000:.0f} ms")
        if dump_dir is not None:
            dump_ir(model, dump_dir, step, p.label.replace(" -> ", "-"))
        if check:
            to_checked_proto(model, f"after passes[{i}] ({p.label})")
    return records
