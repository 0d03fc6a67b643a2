"""Issue 18's one pipeline: sink_window with token_dropping (mode prefill) and layer_routing, whose
layers keep caches of their own lengths, and with the int8 KIVI cache.

sink_window evicts each layer's cache by its own length, and numbers the positions of
token_dropping's later layers by the slots of their own cache (keys 0..len-1, a step's queries
from past_len on), as it numbers every layer's by slot. So the kept prompt tokens of those layers
are renumbered 0..k-1: each layer is a StreamingLLM cache of its own."""

from __future__ import annotations

import numpy as np
import pytest

from compile_helpers import compile_with, fused_and_generic, prefill_decode_diff, token_ids
from optc.config import parse_config
from optc.errors import OptcError
from optc.registry import default_registry

REG = default_registry()
SW = {"name": "sink_window", "sinks": 4, "window": 60}
TD = {"name": "token_dropping", "mode": "prefill", "start_layer": 2}
LR = {"name": "layer_routing", "max_skip": 1}
KV8 = {"name": "kv_quantize", "bits": 8, "residual": 16, "group_size": 16, "key_quant": "per_token"}
BOUND = SW["sinks"] + SW["window"]


def _stream_routed(model, ids, prompt: int) -> tuple[int, list[int]]:
    """Prefill ids[:prompt] (routing picks its one layer there), decode the rest checking every
    step's logits are finite; (the skipped layer, the per-layer cache lengths at the end)."""
    model.prefill(ids[:prompt])
    (skipped,) = model.skipped_layers
    for t in ids[prompt:]:
        assert np.isfinite(model.decode(int(t))).all()
    return skipped, model.cache.layer_lengths


@pytest.mark.parametrize("passes, message", [
    ([SW, TD], r"passes\[1\] \(token_dropping\) must come before passes\[0\] \(sink_window\).*numbers the later "
               r"layers' cache by slot"),
    ([LR, SW], r"passes\[1\] \(sink_window\) must come before passes\[0\] \(layer_routing\)"),
    ([TD, {"name": "h2o_eviction", "ratio": 0.5}], "cannot be combined: .*H2O evicts the same tokens from every layer"),
    ([LR, {"name": "h2o_eviction", "ratio": 0.5}], "cannot be combined: .*H2O evicts the same tokens from every layer"),
])
def test_orders_and_combinations_the_runtime_cannot_run_are_refused(passes, message):
    from optc.pipeline import check_contracts, plan

    with pytest.raises(OptcError, match=message) as e:
        check_contracts(plan(parse_config({"passes": passes}, REG), REG))
    assert "\n" not in str(e.value)


def test_the_four_passes_are_accepted_in_their_order():
    from optc.pipeline import check_contracts, plan

    check_contracts(plan(parse_config({"passes": [TD, SW, LR, KV8]}, REG), REG))
    check_contracts(plan(parse_config({"passes": [KV8, TD, SW, LR]}, REG), REG))


@pytest.fixture(scope="module")
def window_alone(exported_decoder, tmp_path_factory):
    return compile_with(exported_decoder, tmp_path_factory.mktemp("sw") / "a", [SW], fused_attention=False)


@pytest.mark.slow
def test_keep_all_and_no_skip_equal_sink_window_alone(exported_decoder, window_alone, tmp_path):
    """token_dropping keep 1.0 and layer_routing max_skip 0 with sink_window: the per-layer slot
    positions and evictions are sink_window's own, through hundreds of evictions (a prompt of one
    chunk, so that both prefill in one step)."""
    both = compile_with(exported_decoder, tmp_path / "both", [{**TD, "keep": 1.0}, SW, {**LR, "max_skip": 0}],
                        fused_attention=False)  # (the fused path against the generic graph: below)
    ids = token_ids(400, seed=4)
    diff = prefill_decode_diff(both, window_alone, ids, 25)
    assert diff < 1e-4, diff
    assert both.cache.layer_lengths == [BOUND] * 6


@pytest.mark.slow
def test_dropping_with_the_window_keeps_per_layer_lengths_and_slots(exported_decoder, tmp_path):
    """keep 0.5 from layer 2: the prompt runs in one step (the dropping scores all of it); the
    later layers cache k tokens and each layer is evicted to sinks + window by its own length, at
    every decode step; the logits stay finite. (Their positions: the test below.)"""
    model = compile_with(exported_decoder, tmp_path / "td_sw", [{**TD, "keep": 0.5}, SW], fused_attention=False)
    prompt = 100
    k = prompt // 2
    ids = token_ids(prompt + 60, seed=5)
    model.prefill(ids[:prompt])
    assert model.cache.layer_lengths == [prompt] * 2 + [k] * 4
    for step, t in enumerate(ids[prompt:], start=1):
        logits = model.decode(int(t))
        assert np.isfinite(logits).all()
        want = [min(prompt + step, BOUND)] * 2 + [min(k + step, BOUND)] * 4
        assert model.cache.layer_lengths == want, (step, model.cache.layer_lengths)


@pytest.mark.slow
def test_dropping_and_routing_with_the_window_run_on_the_fused_path(exported_decoder, tmp_path):
    """token_dropping (keep 0.5 from layer 2) + sink_window + layer_routing on ONNX Runtime's fused
    path: the pruned layers are a second group in the bounded buffer, rotated by GQA at the slots of
    their own buffer, compacted by their own length and hidden by their own bias row. The same
    kept tokens, skipped layer and logits as the generic graph (max |Δlogit| <= 1e-4), from a
    prompt shorter than the window and from one that overflows it, through 150 decode steps."""
    fused, generic = fused_and_generic(exported_decoder, tmp_path, [{**TD, "keep": 0.5}, SW, LR])
    section = fused.manifest["backend"]["kv_in_place"]
    assert section["pruned_past_input"] and section["pruned_attention_bias_input"]
    for prompt in (50, 300):
        ids = token_ids(prompt + 150, seed=prompt)
        fused.reset()
        generic.reset()
        fused.prefill(ids[:prompt])
        at_prompt = fused.cache.layer_lengths
        assert at_prompt == [prompt] * 2 + [prompt // 2] * 4, at_prompt
        fused.reset()
        diff = prefill_decode_diff(fused, generic, ids, prompt)
        assert diff <= 1e-4, (prompt, diff)
        assert fused.skipped_layers == generic.skipped_layers and len(fused.skipped_layers) == 1
        (skipped,) = fused.skipped_layers
        lengths = fused.cache.layer_lengths
        assert lengths[skipped] == at_prompt[skipped], lengths  # (left as the prompt left it)
        assert all(n <= fused._window.capacity for i, n in enumerate(lengths) if i != skipped), lengths


@pytest.mark.slow
def test_routing_with_the_window_evicts_running_layers_only(exported_decoder, tmp_path):
    """max_skip 1: the skipped layer's cache stops where the prompt's first chunk left it (routing
    ranks the layers there); the running ones are evicted to sinks + window. On ONNX Runtime's fused
    path (a bounded buffer per layer that GQA writes in place) the window leaves the skipped
    layer's buffer alone and compacts the others: the same layer skipped and the same logits as
    the generic graph (max |Δlogit| <= 1e-4) through more than a hundred evictions."""
    fused, generic = fused_and_generic(exported_decoder, tmp_path, [SW, LR])
    assert fused.manifest["backend"]["kv_in_place"]["attention_bias_input"]
    for seed, prompt in ((6, 30), (9, 200)):
        ids = token_ids(prompt + 170, seed=seed)
        fused.reset()
        generic.reset()
        diff = prefill_decode_diff(fused, generic, ids, prompt)
        assert diff <= 1e-4, diff
        assert fused.skipped_layers == generic.skipped_layers and len(fused.skipped_layers) == 1
        (skipped,) = generic.skipped_layers
        lengths = generic.cache.layer_lengths
        chunk = SW["window"] // 2  # (the prompt is prefilled in chunks of half the window)
        assert lengths[skipped] == min(prompt, chunk), lengths
        assert all(n == BOUND for i, n in enumerate(lengths) if i != skipped), lengths
        assert fused.cache.layer_lengths[skipped] == lengths[skipped]  # (the others: up to the buffer's slack)


@pytest.mark.slow
def test_the_four_passes_run_together_with_the_kivi_cache(exported_decoder, tmp_path):
    """token_dropping + sink_window + layer_routing + int8 KIVI (per-token keys, which can be
    evicted): per-layer lengths in the quantised store, and keep 1.0 / max_skip 0 equal sink_window
    with the KIVI cache alone."""
    from optc.runtime.cache.kivi import QuantizedKVCache

    full = compile_with(exported_decoder, tmp_path / "all", [{**TD, "keep": 0.5}, SW, LR, KV8])
    assert isinstance(full.cache, QuantizedKVCache)
    ids = token_ids(240, seed=7)
    skipped, lengths = _stream_routed(full, ids, 100)
    assert all(n == BOUND for i, n in enumerate(lengths) if i != skipped), lengths
    trivial = compile_with(exported_decoder, tmp_path / "trivial", [{**TD, "keep": 1.0}, SW, {**LR, "max_skip": 0},
                                                                    KV8])
    alone = compile_with(exported_decoder, tmp_path / "alone", [SW, KV8])
    diff = prefill_decode_diff(trivial, alone, ids, 25)
    assert diff < 1e-4, diff


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_the_later_layers_are_positioned_by_their_own_slots(exported_decoder, tmp_path, fused):
    """RoPE attention depends on query-key distances only. With score `recent` and no forced
    sinks, the later layers keep the prompt's last k tokens, a contiguous run: renumbering them
    0..k-1 (sink_window's slots of their own cache) shifts every position of those layers by the
    same P - k. So while nothing is evicted, token_dropping + sink_window computes what
    token_dropping alone does (kept tokens at their text positions), prefill and decode. A query
    left at its text position, or keys at the early layers' slots, would differ by far more."""
    td = {**TD, "keep": 0.5, "score": "recent", "sinks": 0, "recent": 8}
    path = {} if fused else {"fused_attention": False}
    windowed = compile_with(exported_decoder, tmp_path / "td_sw", [td, {**SW, "window": 250}], **path)
    alone = compile_with(exported_decoder, tmp_path / "td", [td], **path)
    assert ("kv_in_place" in windowed.manifest["backend"]) == fused
    ids = token_ids(160, seed=8)
    diff = prefill_decode_diff(windowed, alone, ids, 100)
    assert windowed.cache.layer_lengths == alone.cache.layer_lengths == [160] * 2 + [110] * 4
    assert diff < 1e-3, diff
