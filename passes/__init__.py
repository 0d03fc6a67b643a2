"""optc's passes, grouped by family, one job per pass. `ALL_PASSES` feeds
`optc.registry.default_registry()`.

    cleanup        eliminate_identity, eliminate_common_subexpressions, remove_unused
    kv_cache/      kv_quantize (KIVI int8/int4), h2o_eviction (H2O)
    attention/     sink_window (StreamingLLM), block_sparse (prefill)
    quant/         weight_quant (weight-only int8/int4 MatMuls, ONNX Runtime MatMulNBits),
                   outlier_split (W8A8 QDQ MatMuls, activation-outlier channels in float)
    token_dropping/ token_dropping (tokens pruned inside the graph after start_layer)
    layer_routing/ layer_routing (decode skips the layers that changed the prompt least)
    rules/         shared graph builders

`kv_cache_compression` and `sparse_attention` are the earlier names: each config entry expands
into the one-job passes above (docs/architecture.md, "Passes").
"""

from optc.config import PassOptions
from optc.passes.attention import (BlockSparse, BlockSparseOptions, SinkWindow, SinkWindowOptions,
                                   SparseAttentionOptions, expand_sparse_attention)
from optc.passes.cleanup import EliminateCommonSubexpressions, EliminateIdentity, RemoveUnused
from optc.passes.kv_cache import (H2OEviction, H2OEvictionOptions, KVCacheCompressionOptions, KVQuantize,
                                  KVQuantizeOptions, expand_kv_cache_compression)
from optc.passes.quant import OutlierSplit, OutlierSplitOptions, WeightQuant, WeightQuantOptions
from optc.passes.layer_routing import LayerRouting, LayerRoutingOptions
from optc.passes.token_dropping import TokenDropping, TokenDroppingOptions
from optc.registry import PassEntry


def _entry(cls, options=PassOptions, lossy=False) -> PassEntry:
    return PassEntry(cls.name, cls, options, (cls.__doc__ or "").strip().splitlines()[0], lossy)


ALL_PASSES = [
    _entry(EliminateCommonSubexpressions),
    _entry(EliminateIdentity),
    _entry(RemoveUnused),
    _entry(KVQuantize, KVQuantizeOptions, lossy=True),
    _entry(H2OEviction, H2OEvictionOptions, lossy=True),
    _entry(SinkWindow, SinkWindowOptions, lossy=True),
    _entry(BlockSparse, BlockSparseOptions, lossy=True),
    _entry(WeightQuant, WeightQuantOptions, lossy=True),
    _entry(TokenDropping, TokenDroppingOptions, lossy=True),
    _entry(LayerRouting, LayerRoutingOptions, lossy=True),
    _entry(OutlierSplit, OutlierSplitOptions, lossy=True),
    PassEntry("kv_cache_compression", None, KVCacheCompressionOptions,
              "KV-cache compression in one entry: bits -> kv_quantize, eviction -> h2o_eviction", lossy=True,
              expand=expand_kv_cache_compression),
    PassEntry("sparse_attention", None, SparseAttentionOptions,
              "sparse attention in one entry: mode sink_window -> sink_window, block_sparse -> block_sparse",
              lossy=True, expand=expand_sparse_attention),
]
