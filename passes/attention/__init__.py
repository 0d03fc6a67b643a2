"""Attention passes: `sink_window` (StreamingLLM sinks + recent window) and `block_sparse`
(block-sparse prefill), plus `sparse_attention`, the earlier name that selects one by `mode`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from optc.config import PassOptions
from optc.passes.attention.block_sparse import BlockSparse, BlockSparseOptions, budget_fits
from optc.passes.attention.sink_window import SinkWindow, SinkWindowOptions, sinks_fit

SINK_WINDOW_KEYS = set(SinkWindowOptions.model_fields) - set(PassOptions.model_fields)
BLOCK_SPARSE_KEYS = set(BlockSparseOptions.model_fields) - set(PassOptions.model_fields)


_SW, _BS = SinkWindowOptions.model_fields, BlockSparseOptions.model_fields


class SparseAttentionOptions(PassOptions):
    """The earlier one-entry form: `mode` picks the pass, the other keys are that pass's options
    (the same fields and checks; declared here in the order the manifest has recorded them)."""

    mode: Literal["sink_window", "block_sparse"] = Field(
        description="sink_window: keep first `sinks` + last `window` tokens; block_sparse: prefill attends to "
                    "selected key blocks only")
    window: int = _SW["window"]
    sinks: int = _SW["sinks"]
    block_size: int = _BS["block_size"]
    sink_blocks: int = _BS["sink_blocks"]
    local_blocks: int = _BS["local_blocks"]
    budget_blocks: int = _BS["budget_blocks"]

    sinks_fit = field_validator("sinks")(sinks_fit)
    budget_fits = field_validator("budget_blocks")(budget_fits)

    @model_validator(mode="after")
    def _keys_match_mode(self):
        other = BLOCK_SPARSE_KEYS if self.mode == "sink_window" else SINK_WINDOW_KEYS
        stray = sorted(self.model_fields_set & other)
        if stray:
            raise ValueError(f"{stray[0]} does not apply to mode {self.mode}")
        return self


def expand_sparse_attention(o: SparseAttentionOptions) -> list[tuple[type, PassOptions]]:
    """sparse_attention -> sink_window or block_sparse, with that mode's options."""
    if o.mode == "sink_window":
        return [(SinkWindow, SinkWindowOptions(window=o.window, sinks=o.sinks, allow_noop=o.allow_noop))]
    return [(BlockSparse, BlockSparseOptions(block_size=o.block_size, sink_blocks=o.sink_blocks,
                                             local_blocks=o.local_blocks, budget_blocks=o.budget_blocks,
                                             allow_noop=o.allow_noop))]


__all__ = ["BlockSparse", "BlockSparseOptions", "SinkWindow", "SinkWindowOptions", "SparseAttentionOptions",
           "expand_sparse_attention"]
