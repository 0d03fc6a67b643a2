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
