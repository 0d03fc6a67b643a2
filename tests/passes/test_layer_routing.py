"""Issue 18 part 2: layer_routing. Options and contracts in the fast tier; the rewrite through
the runtime on pycoder-5m (slow: export and compiles)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optc.config import parse_config
from optc.errors import OptcError
from compile_helpers import compile_with, decode_diffs, fused_and_generic, token_ids
from optc.registry import default_registry

REG = default_registry()


def _cfg(**opts):
    return parse_config({"passes": [{"name": "layer_routing", **opts}]}, REG)


@pytest.mark.parametrize("opts, message", [
    ({}, r"passes\[0\]\.max_skip: Field required"),
    ({"max_skip": -1}, r"passes\[0\]\.max_skip"),
    ({"max_skip": 1, "protect_first": 0}, r"passes\[0\]\.protect_first"),
    ({"max_skip": 1, "protect_last": 0}, r"passes\[0\]\.protect_last"),
    ({"max_skip": 1, "window": 0}, r"passes\[0\]\.window"),
    ({"max_skip": 1, "mode": "learned"}, r"passes\[0\]\.mode"),
    ({"max_skip": 1, "calibration_text": "x.jsonl"}, r"calibration_text applies to mode static only"),
    ({"max_skip": 1, "bogus": 1}, r"passes\[0\]\.bogus: unknown key"),
])
def test_bad_options_are_one_line_errors(opts, message):
    with pytest.raises(OptcError, match=message) as e:
        _cfg(**opts)
    assert "\n" not in str(e.value)


def test_listed_with_every_option(capsys):
    from conftest import run_cli

    entry = REG.get("layer_routing")
    keys = {"mode", "max_skip", "protect_first", "protect_last", "window", "calibration_text", "allow_noop"}
    assert keys <= set(entry.options_model.model_fields) and entry.lossy
    code, out, _ = run_cli(["passes"], capsys)
    row = out[out.index("layer_routing"):]
    assert code == 0 and all(k in row for k in keys)


@pytest.mark.parametrize("other, why", [
    ({"name": "h2o_eviction", "ratio": 0.5}, "H2O evicts the same tokens from every layer"),
    ({"name": "block_sparse"}, "block_sparse wraps"),
])
def test_refuses_what_the_runtime_cannot_combine(other, why):
    from optc.pipeline import check_contracts, plan

    mine = {"name": "layer_routing", "max_skip": 1}
    for passes in ([mine, other], [other, mine]):
        with pytest.raises(OptcError, match="cannot be combined: .*" + why) as e:
            check_contracts(plan(parse_config({"passes": passes}, REG), REG))
        assert "\n" not in str(e.value)


def test_token_dropping_must_come_first():
    """token_dropping then layer_routing composes; the other order is refused in one line that
    says which must come first and why (a declared order, not a failure inside a pass)."""
    from optc.pipeline import check_contracts, plan

    td, lr = {"name": "token_dropping", "mode": "prefill"}, {"name": "layer_routing", "max_skip": 1}
    check_contracts(plan(parse_config({"passes": [td, lr]}, REG), REG))
    with pytest.raises(OptcError, match=r"passes\[1\] \(token_dropping\) must come before passes\[0\] "
                                        r"\(layer_routing\) in the config: layer_routing moves") as e:
        check_contracts(plan(parse_config({"passes": [lr, td]}, REG), REG))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ pycoder-5m through the runtime (slow)


def _compile(exported_decoder, out, **opts):
    return compile_with(exported_decoder, out, [{"name": "layer_routing", **opts}] if opts else [])


@pytest.fixture(scope="module")
def dense_model(exported_decoder, tmp_path_factory):
    return _compile(exported_decoder, tmp_path_factory.mktemp("lr") / "dense")


@pytest.mark.slow
def test_max_skip_0_is_exactly_dense(exported_decoder, dense_model, tmp_path):
    model = _compile(exported_decoder, tmp_path / "m0", max_skip=0)
    ids = token_ids(70)
    model.reset()
    dense_model.reset()
    diffs = [np.abs(model.prefill(ids[:60]) - dense_model.prefill(ids[:60])).max()]
    assert model.skipped_layers == [] and set(model.layer_change) == {1, 2, 3, 4}
    for t in ids[60:]:
        diffs.append(np.abs(model.decode(int(t)) - dense_model.decode(int(t))).max())
    assert max(diffs) < 1e-4, diffs
    assert model.cache.layer_lengths == [70] * 6


@pytest.mark.slow
def test_per_prompt_skips_the_least_changing_layers_and_their_cache_stops(exported_decoder, tmp_path):
    model = _compile(exported_decoder, tmp_path / "m2", max_skip=2)
    routing = model.manifest["layer_routing"]
    assert routing["layers"] == [1, 2, 3, 4] and routing["static"] is None
    chosen = set()
    for seed in range(4):
        ids = token_ids(80, seed)
        model.reset()
        model.prefill(ids[:64])
        change = model.layer_change
        want = sorted(sorted(change, key=change.get)[:2])
        assert model.skipped_layers == want
        chosen.add(tuple(want))
        for t in ids[64:]:
            model.decode(int(t))
        lengths = model.cache.layer_lengths
        assert all(lengths[i] == 64 for i in want), lengths            # not extended after the prompt
        assert all(lengths[i] == 80 for i in range(6) if i not in want), lengths
    print("layers skipped per prompt:", chosen)


@pytest.mark.slow
def test_the_fused_path_routes_like_the_generic_graph(exported_decoder, tmp_path):
    """A routed artifact runs ONNX Runtime's fused path (GroupQueryAttention inside each routed
    layer's If, writing the bound cache buffer in place): the same layers skipped, the same
    logits as the generic graph (max |Δlogit| <= 1e-4) over prefill and 100 decode steps, and
    the skipped layers' caches stop at the prompt, as on the generic graph."""
    fused, generic = fused_and_generic(exported_decoder, tmp_path, [{"name": "layer_routing", "max_skip": 2}])
    for seed in range(2):
        ids = token_ids(300, seed)
        fused.reset()
        generic.reset()
        diffs = [np.abs(fused.prefill(ids[:200]) - generic.prefill(ids[:200])).max()]
        assert fused.skipped_layers == generic.skipped_layers and len(fused.skipped_layers) == 2
        diffs += decode_diffs(fused, generic, ids[200:])
        assert max(diffs) <= 1e-4, max(diffs)
        # the change is measured where every layer runs (the prompt), not in decode steps with layers off
        assert all(c > 0 for c in fused.layer_change.values()), fused.layer_change
        assert not fused.executor.extra["optc.layer_change"].any() and not generic.executor.extra["optc.layer_change"].any()
        lengths = fused.cache.layer_lengths
        assert lengths == generic.cache.layer_lengths
        assert [lengths[i] for i in fused.skipped_layers] == [200, 200] and lengths[0] == 300


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_a_skipped_layer_runs_no_kernel(exported_decoder, tmp_path, fused):
    """Counted with ONNX Runtime's profiler: a decode step with layer 2 off runs none of the
    nodes of layer 2's run branch; with it on, it runs all of them (on the fused path, where the
    branch holds GroupQueryAttention, and on the generic graph)."""
    import onnx
    import onnxruntime as ort

    compile_with(exported_decoder, tmp_path / "m1", [{"name": "layer_routing", "max_skip": 1}],
                 **({} if fused else {"fused_attention": False}))
    path = tmp_path / "m1" / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    wrapped = next(n for n in graph.node if n.op_type == "If" and n.name.endswith("layer2/if"))
    run_branch = next(a.g for a in wrapped.attribute if a.name == "then_branch")
    body = {n.name for n in run_branch.node}
    assert len(body) > (8 if fused else 20)
    assert ("GroupQueryAttention" in {n.op_type for n in run_branch.node}) == fused

    def kernels(run_layer_2: bool) -> int:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp_path / f"prof{int(run_layer_2)}")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        past = 5
        feeds = {"input_ids": np.array([[7]]), "optc.layers_run": np.array([1, 1, run_layer_2, 1, 1, 1], bool),
                 "optc.logit_rows": np.array([1])}
        if fused:  # cache lengths; the buffers have room for the new token
            feeds.update({"seqlens_k": np.array([past], np.int32), "total_sequence_length": np.array(past + 1, np.int32)})
        else:
            feeds.update({"attention_mask": np.ones((1, past + 1), np.int64), "position_ids": np.array([[past]])})
        for i in range(6):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, past + fused, 32), np.float32)
        s.run(None, feeds)
        events = json.loads(open(s.end_profiling()).read())
        return sum(1 for e in events if e.get("cat") == "Node" and e["name"].removesuffix("_kernel_time") in body)

    assert kernels(False) == 0
    assert kernels(True) >= len(body) - 5  # (constants folded by ORT run no kernel either)


@pytest.mark.slow
def test_static_mode_skips_the_calibrated_set(exported_decoder, tmp_path):
    model = _compile(exported_decoder, tmp_path / "s", max_skip=2, mode="static")
    static = model.manifest["layer_routing"]["static"]
    assert len(static) == 2 and set(static) <= {1, 2, 3, 4}
    for seed in range(2):
        model.reset()
        model.prefill(token_ids(50, seed))
        assert model.skipped_layers == static


@pytest.mark.slow
def test_routing_composes_with_prompt_dropping(exported_decoder, tmp_path):
    """token_dropping (keep 0.5 from layer 2) then layer_routing (max_skip 2), on the fused path and
    the generic graph: the same layers skipped and logits (1e-4); a skipped layer stops at the
    prompt's length in its group (the whole prompt before layer 2, the kept tokens from it on)."""
    passes = [{"name": "token_dropping", "mode": "prefill", "keep": 0.5, "start_layer": 2},
              {"name": "layer_routing", "max_skip": 2}]
    fused, generic = fused_and_generic(exported_decoder, tmp_path, passes)
    assert fused.manifest["backend"]["kv_in_place"]["pruned_past_input"]
    for seed in range(3):
        ids = token_ids(300, seed)
        fused.reset()
        generic.reset()
        diffs = [np.abs(fused.prefill(ids[:150]) - generic.prefill(ids[:150])).max()]
        assert fused.skipped_layers == generic.skipped_layers and len(fused.skipped_layers) == 2
        diffs += decode_diffs(fused, generic, ids[150:])
        assert max(diffs) <= 1e-4, max(diffs)
        lengths = fused.cache.layer_lengths
        assert lengths == generic.cache.layer_lengths
        want = [(150 if i < 2 else 75) if i in fused.skipped_layers else (300 if i < 2 else 225) for i in range(6)]
        assert lengths == want, (lengths, fused.skipped_layers)


@pytest.mark.slow
def test_routing_composes_with_the_kivi_cache_and_prompt_dropping(exported_decoder, tmp_path):
    """layer_routing with kv_quantize (int8 KIVI) in either order, and token_dropping + layer_routing
    + kv_quantize (the three that compose): the same logits whichever of the free orders; with
    max_skip 0 exactly kv_quantize alone; near the float cache's routing (int8 error); the KIVI
    store keeps a skipped layer's length at the prompt's."""
    kv = {"name": "kv_quantize", "bits": 8, "residual": 16, "group_size": 16}
    lr = {"name": "layer_routing", "max_skip": 2}
    td = {"name": "token_dropping", "mode": "prefill", "keep": 0.5, "start_layer": 2}
    models = {name: compile_with(exported_decoder, tmp_path / name, passes) for name, passes in {
        "lr_kv": [lr, kv], "kv_lr": [kv, lr], "lr": [lr], "kv": [kv],
        "lr0_kv": [{**lr, "max_skip": 0}, kv], "td_lr_kv": [td, lr, kv], "kv_td_lr": [kv, td, lr]}.items()}
    ids = token_ids(300, seed=4)

    def diff(a, b):
        a, b = models[a], models[b]
        a.reset()
        b.reset()
        diffs = [np.abs(a.prefill(ids[:150]) - b.prefill(ids[:150])).max()]
        return max(diffs + decode_diffs(a, b, ids[150:]))

    assert diff("lr_kv", "kv_lr") <= 1e-5
    assert diff("lr0_kv", "kv") <= 1e-5
    assert diff("lr_kv", "lr") < 0.1  # int8 KV's error, the same layers skipped
    assert models["lr_kv"].skipped_layers == models["lr"].skipped_layers
    skipped = models["lr_kv"].skipped_layers
    assert models["lr_kv"].cache.layer_lengths == [150 if i in skipped else 300 for i in range(6)]
    assert diff("td_lr_kv", "kv_td_lr") <= 1e-5
    skipped = models["td_lr_kv"].skipped_layers
    assert models["td_lr_kv"].cache.layer_lengths == [
        (150 if i < 2 else 75) if i in skipped else (300 if i < 2 else 225) for i in range(6)]
