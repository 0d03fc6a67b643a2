"""Attention passes: `sink_window` (StreamingLLM sinks + recent window) and `block_sparse`
(block-sparse prefill), plus `sparse_attention`, the earlier name that selects one by `mode`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from optc.config import PassOptions
from optc.passes.attention.block_sparse import BlockSparse, BlockSparseOptions
from optc.passes.attention.sink_window import SinkWindow, SinkWindowOptions

SINK_WINDOW_KEYS = set(SinkWindowOptions.model_fields) - set(PassOptions.model_fields)
BLOCK_SPARSE_KEYS = set(BlockSparseOptions.model_fields) - set(PassOptions.model_fields)


class SparseAttentionOptions(PassOptions):
    mode: Literal["sink_window", "block_sparse"] = Field(
        description="sink_window: keep first `sinks` + last `window` tokens; block_sparse: prefill attends to "
                    "selected key blocks only")
    window: int = Field(252, gt=0, description="sink_window: most recent tokens kept")
    sinks: int = Field(4, ge=0, description="sink_window: initial tokens kept for good (attention sinks)")
    block_size: int = Field(64, gt=1, description="block_sparse: tokens per block")
    sink_blocks: int = Field(1, ge=0, description="block_sparse: initial key blocks every query block sees")
    local_blocks: int = Field(2, ge=1, description="block_sparse: key blocks up to and including the query's own")
    budget_blocks: int = Field(8, gt=0, description="block_sparse: key blocks per query block in all "
                                                    "(the rest chosen by pooled block scores)")

    @field_validator("sinks")
    @classmethod
    def _sinks_fit(cls, v, info):
        window = info.data.get("window")
        if window is not None and v > window:
            raise ValueError(f"sinks ({v}) must not exceed window ({window})")
        return v

    @field_validator("budget_blocks")
    @classmethod
    def _budget_fits(cls, v, info):
        forced = info.data.get("sink_blocks", 0) + info.data.get("local_blocks", 0)
        if v < forced:
            raise ValueError(f"budget_blocks ({v}) must be at least sink_blocks + local_blocks ({forced})")
        return v

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
