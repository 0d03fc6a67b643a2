"""Static-shape buckets for the TVM backend.

MetaSchedule tunes static shapes only, so the TVM artifact holds one Relax function per bucket:
a number of new tokens and a capacity for each *cache segment*. A segment is a run of cache
inputs that share one token axis and sit side by side along the attention's key axis, e.g. the
float cache (`past_key_values.*`), or a quantised cache's stored groups and its float residual.
The runtime pads every step into the cheapest bucket that holds it (runtime/executors/tvm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from optc.errors import OptcError
from optc.runtime.manifest import (ATTENTION_MASK, INPUT_IDS, KEY_POSITION_IDS, KEY_QUANT_PER_CHANNEL, KV_KINDS,
                                   LAYOUT_FLOAT, LAYOUT_KIVI, POSITION_IDS, H2OPolicy, KVCacheSpec,
                                   SinkWindowPolicy, kivi_input, past_name)

# Every bucket is one more set of workloads to tune, so the defaults are few: decode pads the
# cache to the next power of two (attention is the only cost that grows with it); continuation
# steps (prompts past the largest prefill, multi-turn, chunked prefill) are rarer and get two.
DEFAULT_PREFILL = (32, 128, 512)
DEFAULT_CACHE = (128, 256, 512, 1024, 2048)
CONTINUATION_CACHE = (512, 2048)
CONTINUATION_TOKENS = 64  # new tokens per step once the cache is not empty
# sink_window: the few tokens left after the last half-window chunk of a prompt (8 of 512 with
# the default window) ran as that many decode steps, ~2 ms each; one short step takes them
SHORT_CONTINUATION_TOKENS = 16
# An evicting cache's continuation rows of attention scores are padded to a multiple of this many
# keys: a whole number of vectors for every CPU target the schedules know (4 or 8 float32 lanes,
# schedules/cpu.cpu_facts). The plan does not depend on the target, so one manifest reads the same
# everywhere.
KEY_MULTIPLE = 8


@dataclass(frozen=True)
class Segment:
    """Cache inputs sharing one token axis (axis 2). `inputs` maps an input to how many tokens
    one index along that axis covers (1, or the group size of per-channel key scales)."""

    name: str
    inputs: dict[str, int]
    granularity: int = 1  # capacities are multiples of this

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": dict(self.inputs), "granularity": self.granularity}


def cache_segments(kv_cache: dict, n_layers: int) -> list[Segment]:
    """The cache segments of a graph compiled with the given manifest `kv_cache` section,
    in the order the graph concatenates them before the new tokens."""
    spec = KVCacheSpec.from_dict(kv_cache)
    bases = [past_name(i, kind) for i in range(n_layers) for kind in KV_KINDS]
    if spec.layout == LAYOUT_FLOAT:
        return [Segment("cache", {b: 1 for b in bases})]
    if spec.layout == LAYOUT_KIVI:
        group = spec.kivi.group_size
        per_channel_keys = spec.kivi.key_quant == KEY_QUANT_PER_CHANNEL
        stored: dict[str, int] = {}
        for b in bases:
            scale_div = group if (per_channel_keys and b.endswith(".key")) else 1
            stored[kivi_input(b, "q")] = 1
            stored[kivi_input(b, "scale")] = scale_div
            if not spec.kivi.symmetric:
                stored[kivi_input(b, "zero")] = scale_div
        return [Segment("stored", stored, group if per_channel_keys else 1),
                Segment("residual", {kivi_input(b, "residual"): 1 for b in bases})]
    raise OptcError(f"tvm backend: KV-cache layout {spec.layout!r} is not supported")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def plan_buckets(kv_cache: dict, segments: list[Segment], *, prefill=DEFAULT_PREFILL, cache=DEFAULT_CACHE,
                 continuation: int = CONTINUATION_TOKENS, sparse_prefill_min: int | None = None) -> list[dict]:
    """The buckets to compile: prefill into an empty cache (segments exactly 0 long, so graphs
    that test for an empty cache, like block-sparse prefill, take the same branch as with ONNX
    Runtime), then decode (1 token) and continuation (`continuation` tokens) at each cache
    capacity. Evicting caches get capacities up to their bound only.

    With block-sparse prefill (`sparse_prefill_min`: the fewest prompt tokens that take the
    sparse path), a prefill size that can hold such a prompt is compiled twice: its `If` fixed
    to the sparse branch and to the dense one; the runtime picks by the real prompt length."""
    spec = KVCacheSpec.from_dict(kv_cache)
    policy = spec.policy
    capacities = sorted(set(cache))
    # continuation capacities: the largest cache size, and the other defaults that were asked for
    cont = [c for c in CONTINUATION_CACHE if c in capacities] + [max(capacities)]
    chunk, short = continuation, None
    if isinstance(policy, SinkWindowPolicy):
        bound = policy.capacity
        capacities = [c for c in capacities if c < bound] + [bound]
        cont = [bound]
        # the runtime fills an evicting cache window/2 tokens at a time. The bucket takes a few
        # more (padding) so that a row of attention scores (bound + tokens keys) is a whole
        # number of vectors: 126 tokens over the default 256-token bound made 382-key rows that
        # the vectorised CPU schedules do not take (a scalar softmax was 16% of the step)
        chunk = _round_up(bound + max(continuation, policy.window // 2), KEY_MULTIPLE) - bound
        short = _round_up(bound + SHORT_CONTINUATION_TOKENS, KEY_MULTIPLE) - bound
    elif isinstance(policy, H2OPolicy) and policy.budget:
        bound = policy.budget  # enforced after each step, so a step starts with at most this many
        capacities = [c for c in capacities if c < bound] + [bound]
        cont = [bound]

    def sizes(capacity: int) -> list[int]:
        out = []
        for seg in segments:
            if seg.name == "residual":  # at rest the residual holds fewer than residual + group tokens
                out.append(spec.kivi.residual + spec.kivi.group_size)
            else:
                out.append(_round_up(capacity, seg.granularity))
        return out

    buckets = []
    for n in sorted(set(prefill)):
        empty = [0] * len(segments)
        if sparse_prefill_min is None:
            buckets.append({"name": f"prefill_{n}", "tokens": n, "segments": empty})
            continue
        buckets.append({"name": f"prefill_{n}", "tokens": n, "segments": empty, "branch": "dense"})
        if n >= sparse_prefill_min:  # whole blocks (min = 2 blocks): the branch's padding folds away
            m = _round_up(n, sparse_prefill_min // 2)
            buckets.append({"name": f"prefill_{m}_sparse", "tokens": m, "segments": empty, "branch": "sparse"})
    dense = {"branch": "dense"} if sparse_prefill_min is not None else {}
    for c in sorted(set(capacities)):
        buckets.append({"name": f"decode_{c}", "tokens": 1, "segments": sizes(c), **dense})
    for c in sorted(set(cont)):
        buckets.append({"name": f"continue_{c}", "tokens": chunk, "segments": sizes(c), **dense})
        if short is not None and short < chunk:
            buckets.append({"name": f"continue_{c}_short", "tokens": short, "segments": sizes(c), **dense})
    return buckets


def input_shapes(bucket: dict, segments: list[Segment], graph_inputs: dict[str, tuple], ) -> dict[str, tuple]:
    """Static shapes of every graph input for one bucket. `graph_inputs` gives each input's
    shape as declared in the graph (symbolic dims as strings)."""
    n = bucket["tokens"]
    total = sum(bucket["segments"]) + n
    shapes: dict[str, tuple] = {}
    by_input = {name: (seg, size, div) for seg, size in zip(segments, bucket["segments"])
                for name, div in seg.inputs.items()}
    for name, declared in graph_inputs.items():
        if name in (INPUT_IDS, POSITION_IDS):
            shapes[name] = (1, n)
        elif name in (ATTENTION_MASK, KEY_POSITION_IDS):
            shapes[name] = (1, total)
        elif name in by_input:
            seg, size, div = by_input[name]
            tail = declared[3:]
            if any(not isinstance(d, int) for d in (declared[1], *tail)):
                raise OptcError(f"tvm backend: cache input {name!r} has symbolic dims {declared} beyond batch "
                                f"and tokens")
            shapes[name] = (1, declared[1], size // div, *tail)
        else:
            raise OptcError(f"tvm backend: graph input {name!r} is not one the runtime feeds")
    return shapes
