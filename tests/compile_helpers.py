"""Shared by the pass tests: compile an exported decoder with one configured pass, and load it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def compile_with(exported_decoder: Path, out: Path, passes: list[dict], **backend_options):
    """optc.runtime Model of `exported_decoder` compiled with `passes` (no verification)."""
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.registry import default_registry
    from optc.runtime import load

    config = parse_config({"passes": passes} if passes else {}, default_registry())
    compile_model(exported_decoder, out, config=config, verify=False, backend_options=backend_options or None,
                  log=lambda *_: None)
    return load(out)


def token_ids(n: int, seed: int = 0) -> np.ndarray:
    """`n` random token ids of the test decoder's vocabulary."""
    return np.random.default_rng(seed).integers(1, 4096, n)


def fused_and_generic(exported_decoder: Path, tmp: Path, passes: list[dict]):
    """The same pipeline compiled for ONNX Runtime's fused path (the default) and its generic graph
    (`--no-fused-attention`); checks each got the path it was asked for."""
    fused = compile_with(exported_decoder, tmp / "fused", passes)
    generic = compile_with(exported_decoder, tmp / "generic", passes, fused_attention=False)
    assert "kv_in_place" in fused.manifest["backend"] and "kv_in_place" not in generic.manifest["backend"]
    return fused, generic


def decode_diffs(a, b, ids) -> list[float]:
    """max |Δlogit| of models `a` and `b` decoding `ids` one by one (after their prefill)."""
    return [float(np.abs(a.decode(int(t)) - b.decode(int(t))).max()) for t in ids]


def prefill_decode_diff(a, b, ids, prompt: int) -> float:
    """max |Δlogit| of models `a` and `b` prefilling ids[:prompt], then decoding the rest one by one."""
    diffs = [float(np.abs(a.prefill(ids[:prompt]) - b.prefill(ids[:prompt])).max())]
    return max(diffs + decode_diffs(a, b, ids[prompt:]))
