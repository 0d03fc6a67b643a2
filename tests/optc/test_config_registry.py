"""Pass configuration, registry and pass manager contracts."""

from __future__ import annotations

import onnx_ir as ir
import pytest
import yaml

from conftest import run_cli
from optc.config import PassOptions, parse_config
from optc.errors import OptcError
from optc.passes.base import OptcPass, PassContext
from optc.pipeline import run_pipeline
from optc.registry import PassEntry, PassRegistry, default_registry


def test_identity_pipeline_and_print_back(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("passes:\n  - name: remove_unused\nverify:\n  max_perplexity_increase: 0.05\n")
    code, out, err = run_cli(["config", "show", cfg], capsys)
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["passes"] == [{"name": "remove_unused", "allow_noop": False}]
    assert data["verify"]["max_perplexity_increase"] == 0.05
    # printing back is a fixed point: the printed config parses to the same config
    assert parse_config(data, default_registry()).to_dict() == data
    assert parse_config({"passes": []}, default_registry()).passes == []


def test_passes_command_lists_options(capsys):
    """`optc passes` lists every registered pass once, each with exactly its options and their
    defaults, whether it is lossy, and the contract its pass class declares."""
    code, out, _ = run_cli(["passes"], capsys)
    assert code == 0
    blocks: dict[str, list[str]] = {}  # pass name -> its header line, then its indented lines
    for line in filter(str.strip, out.splitlines()):
        if not line.startswith(" "):
            current = line.split()[0]
            assert current not in blocks, current
            blocks[current] = [line]
        else:
            blocks[current].append(line.strip())
    reg = default_registry()
    assert sorted(blocks) == sorted(reg.names())
    for entry in reg:
        header, *rest = blocks[entry.name]
        assert ("(lossy)" in header.split(entry.summary)[0]) == entry.lossy, header
        fields = {n: f for n, f in entry.options_model.model_fields.items() if not f.exclude}
        listed = {ln.split(":")[0]: ln for ln in rest
                  if not ln.startswith(("requires:", "ensures:", "not with", "before a pass"))}
        assert set(listed) == set(fields), entry.name
        for name, field in fields.items():
            default = "required" if field.is_required() else repr(field.default)
            assert f" = {default}" in listed[name], (entry.name, listed[name])
        if entry.pass_class is not None:
            contract = entry.pass_class.contract(entry.options_model.model_construct())
            ensures, precedes = contract.ensures, contract.precedes
            assert [ln for ln in rest if ln.startswith("ensures:")] == \
                ([f"ensures: {', '.join(sorted(ensures))}"] if ensures else []), entry.name
            assert [ln for ln in rest if ln.startswith("before a pass")] == \
                ([f"before a pass that ensures: {', '.join(sorted(precedes))}"] if precedes else []), entry.name
    assert "before a pass that ensures: layers.routed" in "\n".join(blocks["token_dropping"])


class _Counter(OptcPass):
    """Test pass: rewrites nothing, counts calls."""

    name = "count"
    calls = 0

    def call(self, model):
        type(self).calls += 1
        return ir.passes.PassResult(model, False)


def test_registries_are_isolated_and_noop_is_loud():
    reg = PassRegistry([PassEntry("count", _Counter, PassOptions, "counts")])
    assert "count" not in default_registry().names()
    with pytest.raises(ValueError):
        reg.add(PassEntry("count", _Counter, PassOptions, "again"))
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 23}), ir_version=10)
    cfg = parse_config({"passes": [{"name": "count"}]}, reg)
    with pytest.raises(OptcError, match=r"passes\[0\] \(count\) matched nothing"):
        run_pipeline(model, cfg, reg, PassContext(), check=False, log=lambda *_: None)
    warnings = []
    cfg = parse_config({"passes": [{"name": "count", "allow_noop": True}]}, reg)
    recs = run_pipeline(model, cfg, reg, PassContext(), check=False, log=warnings.append)
    assert recs[0].modified is False and "matched nothing" in warnings[0]
    assert _Counter.calls == 2


def test_cleanup_pass_structure_numerics_checker(torchscript_decoder):
    """CSE on the noisy TorchScript graph: rewrites, is idempotent, keeps numerics, passes checker."""
    import numpy as np
    import onnxruntime as ort

    from optc.canonical import canonicalize
    from optc.ir import load_model, to_checked_proto
    from optc.passes.cleanup import EliminateCommonSubexpressions

    model = load_model(torchscript_decoder)
    info = canonicalize(model)
    before = ir.to_proto(model).SerializeToString()
    n_before = len(list(model.graph))
    p = EliminateCommonSubexpressions(PassOptions())
    assert p(model).modified
    assert len(list(model.graph)) < n_before
    assert not EliminateCommonSubexpressions(PassOptions())(model).modified
    after = to_checked_proto(model, "test").SerializeToString()
    feeds = {"input_ids": np.arange(1, 9)[None], "attention_mask": np.ones((1, 8), np.int64),
             "position_ids": np.arange(8)[None]}
    for i in range(info.n_layers):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, info.kv_heads, 0, info.head_dim), np.float32)
    a = ort.InferenceSession(before).run(["logits"], feeds)[0]
    b = ort.InferenceSession(after).run(["logits"], feeds)[0]
    assert np.abs(a - b).max() <= 1e-5


# ------------------------------------------------------------------ pass contracts
SW = {"name": "sink_window", "window": 60}
KVQ = {"name": "kv_quantize", "bits": 8}
# groups that a 4 + 60-token window can fill (the defaults need 96 tokens: refused with it)
KVQ_TOKEN = {"name": "kv_quantize", "bits": 8, "key_quant": "per_token", "group_size": 32, "residual": 16}
H2O = {"name": "h2o_eviction", "ratio": 0.5}
BS = {"name": "block_sparse"}
OLD_EVICTION = {"name": "kv_cache_compression", "eviction": {"ratio": 0.5}}
OLD_BS = {"name": "sparse_attention", "mode": "block_sparse"}


def _plan(passes):
    from optc.pipeline import plan

    reg = default_registry()
    return plan(parse_config({"passes": passes}, reg), reg)


@pytest.mark.parametrize("a, b, why", [
    (SW, KVQ, "per-channel key groups cannot give up"),
    (SW, H2O, "both set the cache's eviction policy"),
    (H2O, KVQ_TOKEN, "eviction over a quantised cache is not supported yet"),
    (H2O, BS, "cannot report the attention scores that H2O eviction needs"),
    (OLD_BS, OLD_EVICTION, "cannot report the attention scores that H2O eviction needs"),
    (SW, BS, "sink_window fills its bounded cache chunk by chunk"),
    (KVQ, KVQ_TOKEN, "both quantise the cache"),
    (SW, SW, "both set the cache's eviction policy"),
    (BS, BS, "both rewrite prefill attention"),
])
@pytest.mark.parametrize("order", ["ab", "ba"])
def test_invalid_pairs_are_refused_in_either_order(a, b, why, order):
    """Every invalid pair is one line naming both passes, whatever the order."""
    from optc.pipeline import check_contracts

    first, second = (a, b) if order == "ab" else (b, a)
    with pytest.raises(OptcError) as e:
        check_contracts(_plan([first, {"name": "remove_unused"}, second]))
    msg = str(e.value)
    assert "\n" not in msg and why in msg, msg
    assert msg.startswith("passes[0] (") and " and passes[2] (" in msg, msg
    assert first["name"] in msg and second["name"] in msg, msg


def test_one_entry_that_expands_into_an_invalid_pair():
    from optc.pipeline import check_contracts

    with pytest.raises(OptcError, match=r"^passes\[0\] \(kv_cache_compression\): its kv_quantize and h2o_eviction "
                                        r"parts cannot be combined: .*eviction over a quantised cache"):
        check_contracts(_plan([{"name": "kv_cache_compression", "bits": 8, "eviction": {"ratio": 0.5}}]))


@pytest.mark.parametrize("passes", [
    [SW, KVQ_TOKEN], [KVQ_TOKEN, SW], [BS, KVQ], [KVQ, BS], [H2O], [{"name": "eliminate_identity"}, SW],
    [{"name": "sparse_attention", "mode": "sink_window"},
     {"name": "kv_cache_compression", "bits": 4, "key_quant": "per_token"}],
])
def test_valid_pipelines_pass_the_contract_check(passes):
    from optc.pipeline import check_contracts

    check_contracts(_plan(passes))


def test_a_requirement_the_model_lacks_is_refused_before_running():
    from optc.pipeline import check_contracts

    with pytest.raises(OptcError, match=r"passes\[0\] \(sparse_attention -> sink_window\) needs a position_ids "
                                        r"graph input, which the model does not have"):
        check_contracts(_plan([{"name": "sparse_attention", "mode": "sink_window"}]), facts={"model.decoder"})


def test_earlier_config_names_expand_into_one_job_passes():
    planned = _plan([{"name": "kv_cache_compression", "bits": 4, "eviction": {"budget": 100}, "allow_noop": True},
                     {"name": "sparse_attention", "mode": "block_sparse", "block_size": 32}])
    assert [(p.index, p.pass_class.name) for p in planned] == [(0, "kv_quantize"), (0, "h2o_eviction"),
                                                                (1, "block_sparse")]
    assert planned[0].options.bits == 4 and planned[0].options.allow_noop
    assert planned[1].options.budget == 100 and planned[2].options.block_size == 32
    # and the declared budgets add up as before: int4 +5%, eviction +5%, block_sparse +3%
    from optc.compile import effective_budget

    reg = default_registry()
    cfg = parse_config({"passes": [{"name": "kv_cache_compression", "bits": 4, "eviction": {"budget": 100}},
                                   {"name": "sparse_attention", "mode": "block_sparse"}]}, reg)
    assert effective_budget(cfg, reg)[0].max_perplexity_increase == pytest.approx(0.13)
