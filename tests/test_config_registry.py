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
    code, out, _ = run_cli(["passes"], capsys)
    assert code == 0
    for name in default_registry().names():
        assert name in out
    assert "allow_noop: bool = False" in out


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
