"""Token dropping: prompt tokens pruned inside the graph (FastV / LazyLLM style).

    token_dropping   mode encoder: a BERT-style encoder keeps, after `start_layer`, the tokens CLS
                     attends to most (plus CLS/SEP); later layers and pooling see only those.
                     mode prefill: a decoder's prefill keeps the sinks, the recent tokens and the
                     prompt tokens the last `query_window` rows attend to most; later layers
                     compute, and cache, only those (the runtime keeps per-layer cache lengths).
"""

from optc.passes.token_dropping.drop import TokenDropping, TokenDroppingOptions

__all__ = ["TokenDropping", "TokenDroppingOptions"]
