"""The runtime-owned KV cache, one module per kind: `dense` (float or static-scale int8,
growable), `h2o` (H2O eviction over it), `kivi` (int8/int4 storage); `buffers` holds what they
are built from.
sink_window's eviction is the model's (`Model._make_room`): it works on any of them."""

from __future__ import annotations

import numpy as np

from optc.runtime.artifact import ArtifactError
from optc.runtime.cache.dense import KVCache
from optc.runtime.cache.h2o import H2OCache
from optc.runtime.cache.kivi import QuantizedKVCache
from optc.runtime.manifest import LAYOUT_FLOAT, LAYOUT_INT8, LAYOUT_KIVI, H2OPolicy, KVCacheSpec

__all__ = ["H2OCache", "KVCache", "QuantizedKVCache", "make_cache"]


def make_cache(spec: KVCacheSpec, model_cfg: dict):
    """The cache the manifest's `kv_cache` section asks for."""
    dims = (model_cfg["n_layers"], model_cfg["kv_heads"], model_cfg["head_dim"])
    if spec.layout == LAYOUT_FLOAT and isinstance(spec.policy, H2OPolicy):
        return H2OCache(*dims, policy=spec.policy)
    if spec.layout == LAYOUT_FLOAT:
        return KVCache(*dims)
    if spec.layout == LAYOUT_INT8 and spec.policy is None:  # (the graph holds the scales)
        return KVCache(*dims, dtype=np.int8)
    if spec.layout == LAYOUT_KIVI and not isinstance(spec.policy, H2OPolicy):
        k = spec.kivi
        return QuantizedKVCache(*dims, bits=k.bits, group_size=k.group_size, residual=k.residual,
                                symmetric=k.symmetric, key_quant=k.key_quant)
    raise ArtifactError(f"manifest.json: kv_cache: layout {spec.layout!r} with policy {spec.policy!r} "
                        f"is not supported")
