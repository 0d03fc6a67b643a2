"""The pass manager: runs the configured passes in order, with instruments.

Instruments: per-pass timing, `dump_ir` (the textual IR after canonicalisation and after each
pass), and onnx.checker after each pass. A configured pass that finds nothing to rewrite fails
the pipeline unless its config says `allow_noop: true`: a silent no-op is a bug users cannot see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from optc.config import PipelineConfig
from optc.errors import OptcError
from optc.ir import to_checked_proto
from optc.passes.base import PassConfigError, PassContext


@dataclass
class PassRecord:
    index: int
    name: str
    modified: bool
    seconds: float


def dump_ir(model: ir.Model, directory: Path, step: int, label: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{step:02d}-{label}.txt"
    path.write_text(str(model.graph), encoding="utf-8")
    return path


def run_pipeline(model: ir.Model, config: PipelineConfig, registry, context: PassContext, *,
                 dump_dir: Path | None = None, check: bool = True, log=print) -> list[PassRecord]:
    if dump_dir is not None:
        dump_ir(model, dump_dir, 0, "canonical")
    records = []
    for i, spec in enumerate(config.passes):
        entry = registry.get(spec.name, where=f"passes[{i}].name")
        p = entry.pass_class(spec.options, context)
        t0 = time.perf_counter()
        try:
            result = p(model)
        except OptcError:
            raise
        except PassConfigError as e:
            raise OptcError(f"passes[{i}].{e.key}: {e}") from None
        except ir.passes.PassError as e:
            raise OptcError(f"passes[{i}] ({spec.name}): {e}") from None
        seconds = time.perf_counter() - t0
        records.append(PassRecord(i, spec.name, bool(result.modified), seconds))
        if not result.modified:
            msg = f"passes[{i}] ({spec.name}) matched nothing in the graph"
            if not spec.options.allow_noop:
                raise OptcError(f"{msg}; remove it or set 'allow_noop: true'")
            log(f"[yellow]warning[/]: {msg} (allow_noop: true)")
        else:
            log(f"  pass {i} {spec.name}: rewrote the graph in {seconds * 1000:.0f} ms")
        if dump_dir is not None:
            dump_ir(model, dump_dir, i + 1, spec.name)
        if check:
            to_checked_proto(model, f"after passes[{i}] ({spec.name})")
    return records
