"""--target npu (issue 19 part 2): device profiles, partitioning, static shapes with chunked
prefill. Tests that run the QNN HTP simulator are marked `npu`; compiles are `slow`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from optc.backends.npu.profile import DEFAULT_PROFILE, available_profiles, load_profile, parse_profile
from optc.errors import OptcError


# -- device profiles -----------------------------------------------------------------------------

def test_shipped_profiles_load_and_every_figure_says_where_it_comes_from():
    names = available_profiles()
    assert DEFAULT_PROFILE in names and "generic_npu" in names
    for name in names:
        p = load_profile(name)
        figures = p.figures()
        assert {"compute.int8_tops", "memory.bandwidth_gb_s", "limits.max_rank"} <= set(figures)
        for f in figures.values():
            assert (f.source is None) != (f.assumption is None)
        assert "MatMul" in p.ops and "QuantizeLinear" in p.ops
    htp = load_profile(DEFAULT_PROFILE)
    assert htp.execution_provider == "qnn" and htp.compute.int8_tops.source  # a published figure
    assert htp.supports("MatMul", ["uint8", "int8"]) == (True, "")
    ok, why = htp.supports("MatMul", ["float32"])
    assert not ok and "float32" in why
    ok, why = htp.supports("GatherND", ["float32"])
    assert not ok and "GatherND" in why


def _raw():
    from importlib import resources

    return yaml.safe_load((resources.files("optc.profiles") / f"{DEFAULT_PROFILE}.yaml").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(tops=3), "tops: unknown key"),
    (lambda d: d["compute"]["int8_tops"].update(unit="TOPS"), "compute.int8_tops.unit: unknown key"),
    (lambda d: d["compute"]["int8_tops"].pop("source"), "compute.int8_tops: Value error, give exactly one of"),
    (lambda d: d["memory"]["bandwidth_gb_s"].update(assumption="guess"), "memory.bandwidth_gb_s: Value error"),
    (lambda d: d["ops"].update(MatMul=["int3"]), "ops.MatMul[0]: Input should be"),
    (lambda d: d["limits"]["max_rank"].update(value=-1), "limits.max_rank.value: Input should be greater"),
    (lambda d: d.update(execution_provider="tpu"), "execution_provider: Input should be"),
])
def test_a_bad_profile_is_one_line_naming_the_key(edit, message):
    data = copy.deepcopy(_raw())
    edit(data)
    with pytest.raises(OptcError) as e:
        parse_profile(data, "p.yaml")
    assert str(e.value).startswith("p.yaml: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_profile_by_path_and_unknown_names(tmp_path):
    f = tmp_path / "mine.yaml"
    data = _raw()
    data["name"] = "mine"
    f.write_text(yaml.safe_dump(data))
    assert load_profile(f).name == "mine"
    with pytest.raises(OptcError, match="unknown device profile .*available: generic_npu"):
        load_profile("snapdragon_9000")
    with pytest.raises(OptcError, match="no such device profile"):
        load_profile(tmp_path / "missing.yaml")
    f.write_text("name: [unclosed")
    with pytest.raises(OptcError, match=r"mine.yaml:\d+: invalid YAML"):
        load_profile(f)
