"""KV-cache passes: `kv_quantize` (KIVI int8/int4 storage) and `h2o_eviction` (H2O eviction),
plus `kv_cache_compression`, the earlier name that configures either or both in one entry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from optc.config import PassOptions, no_float
from optc.passes.kv_cache.evict import EvictionSettings, H2OEviction, H2OEvictionOptions
from optc.passes.kv_cache.quantize import KVQuantize, KVQuantizeOptions


class KVCacheCompressionOptions(PassOptions):
    bits: Literal[4, 8] | None = Field(None, description="bits per cached key/value element (None: keep fp32)")
    bits_is_an_integer = field_validator("bits", mode="before")(no_float)
    eviction: EvictionSettings | None = Field(None, description="evict low-attention tokens (H2O)")
    group_size: int = Field(64, gt=0, description="tokens per key-scale group; channels per value-scale group "
                                                  "(capped at head_dim)")
    residual: int = Field(32, ge=0, description="newest tokens kept in full precision")
    symmetric: bool | None = Field(None, description="symmetric quantisation (default: yes for 8 bits, no for 4)")
    key_quant: Literal["per_channel", "per_token"] = Field(
        "per_channel", description="key scales per channel over token groups (KIVI) or per token; per_token "
                                   "keys can be evicted one by one (needed with sparse_attention sink_window)")

    @model_validator(mode="after")
    def _something_to_do(self):
        if self.bits is None and self.eviction is None:
            raise ValueError("set bits (quantisation), eviction, or both")
        return self


def expand_kv_cache_compression(o: KVCacheCompressionOptions) -> list[tuple[type, PassOptions]]:
    """kv_cache_compression -> kv_quantize (bits) and/or h2o_eviction (eviction)."""
    out: list[tuple[type, PassOptions]] = []
    if o.bits is not None:
        out.append((KVQuantize, KVQuantizeOptions(bits=o.bits, group_size=o.group_size, residual=o.residual,
                                                  symmetric=o.symmetric, key_quant=o.key_quant,
                                                  allow_noop=o.allow_noop)))
    if o.eviction is not None:
        out.append((H2OEviction, H2OEvictionOptions(**o.eviction.model_dump(), allow_noop=o.allow_noop)))
    return out


__all__ = ["H2OEviction", "H2OEvictionOptions", "KVCacheCompressionOptions", "KVQuantize", "KVQuantizeOptions",
           "expand_kv_cache_compression"]
