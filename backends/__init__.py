"""Backends lower the canonical, pass-rewritten graph for a target and write it into an artifact.

`base.py` holds the protocol every backend module follows (`compile(model, info, out_dir, target,
*, kv_cache, prefill, options, log) -> dict`, the manifest's `backend` section) and the registry.
The NPU backend comes with its issue.
"""

from optc.backends.base import BACKENDS, get_backend

__all__ = ["BACKENDS", "get_backend"]
