"""optc's passes, one module per pass family. `ALL_PASSES` feeds `optc.registry.default_registry()`.

Pass families still to come (see DESIGN.md): token dropping, layer routing, outlier splitting.
"""

from optc.config import PassOptions
from optc.passes.cleanup import EliminateCommonSubexpressions, EliminateIdentity, RemoveUnused
from optc.passes.kv_cache_compression import KVCacheCompression, KVCacheCompressionOptions
from optc.passes.sparse_attention import SparseAttention, SparseAttentionOptions
from optc.registry import PassEntry


def _entry(cls, options=PassOptions, lossy=False) -> PassEntry:
    return PassEntry(cls.name, cls, options, (cls.__doc__ or "").strip().splitlines()[0], lossy)


ALL_PASSES = [
    _entry(EliminateCommonSubexpressions),
    _entry(EliminateIdentity),
    _entry(RemoveUnused),
    _entry(KVCacheCompression, KVCacheCompressionOptions, lossy=True),
    _entry(SparseAttention, SparseAttentionOptions, lossy=True),
]
