"""The NPU runtime's OpenVINO branch (issue 19: "QNN, then OpenVINO's NPU device when present,
then refuse"), run for real in .venv-openvino (`make venv-openvino`; `make test` builds it), whose
onnxruntime is the onnxruntime-openvino build.

This machine has no Intel NPU: OpenVINO sees only its CPU device. So the test checks that an
OpenVINO without an NPU is not taken for an NPU provider (the refusal says so), and then runs the
whole OpenVINO code path with OpenVINO's own CPU device standing in for the NPU device: the NPU
partitions load on OpenVINOExecutionProvider with CPU fallback disabled, every node assigned to
OpenVINO, and the logits match the same partitions on the CPU EP. It is the closest real check
here, not a claim that the artifact ran on an NPU."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT

OV_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"

# Runs inside .venv-openvino: argv[1] the artifact (generic_npu profile, no --allow-cpu-fallback).
SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
import optc.runtime.executors.npu as npu
from optc.runtime.artifact import ArtifactError
from optc.runtime.model import load_unpublished

art = sys.argv[1]
out = {"ort": ort.__version__, "devices": npu.openvino_devices(), "provider": npu.npu_provider("any")}
try:
    load_unpublished(art)
    out["refused"] = None
except ArtifactError as e:
    out["refused"] = str(e)

npu.OPENVINO_NPU_DEVICES = ("CPU",)  # OpenVINO's CPU device stands in for its NPU device
out["stand_in_provider"] = npu.npu_provider("any")
m = load_unpublished(art)
out["provider_line"] = m.provider
out["partition_providers"] = m.executor.partition_providers
manifest = json.load(open(f"{art}/manifest.json"))
out["assigned"] = [npu.assigned_nodes(f"{art}/{p['file']}", npu.OPENVINO, {})
                   for p in manifest["backend"]["graphs"]["decode"]["partitions"] if p["device"] == "npu"]
ids = np.random.default_rng(5).integers(0, 4096, 20)
ov = np.concatenate([m.prefill(ids[:13], all_logits=True), np.stack([m.decode(int(t)) for t in ids[13:]])])
with npu.npu_partitions_on_cpu():
    c = load_unpublished(art)
cpu = np.concatenate([c.prefill(ids[:13], all_logits=True), np.stack([c.decode(int(t)) for t in ids[13:]])])
out["top1"] = float((ov.argmax(-1) == cpu.argmax(-1)).mean())
out["max_diff"] = float(np.abs(ov - cpu).max())
out["scale"] = float(np.abs(cpu).max())
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_openvino_without_an_npu_is_refused_and_its_code_path_runs_on_its_cpu_device(tmp_path):
    if not OV_PYTHON.exists():
        pytest.skip("no .venv-openvino (make venv-openvino)")
    pytest.importorskip("onnxruntime_qnn")  # (compiling without --allow-cpu-fallback needs an NPU provider)
    from test_npu_target import QDQ_PASSES, _compile_npu

    art = tmp_path / "q"
    _compile_npu(art, passes=QDQ_PASSES, chunk=8, max_cache=32, profile="generic_npu")
    run = subprocess.run([str(OV_PYTHON), "-c", SCRIPT, str(art)], capture_output=True, text=True, timeout=300)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert run.returncode == 0 and line, run.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])

    assert out["ort"].startswith("1.24") and out["devices"] == ["CPU"]  # the onnxruntime-openvino build, no NPU
    assert out["provider"] is None
    assert out["refused"] and "needs an NPU execution provider" in out["refused"], out["refused"]
    assert "OpenVINO's execution provider is present but sees no NPU device (it sees: CPU)" in out["refused"]
    assert "--allow-cpu-fallback" in out["refused"] and "\n" not in out["refused"]

    assert out["stand_in_provider"] == "OpenVINOExecutionProvider"
    assert "OpenVINOExecutionProvider (NPU partitions:" in out["provider_line"]
    for parts in out["partition_providers"].values():
        assert {ep for _, d, ep in parts if d == "npu"} == {"OpenVINOExecutionProvider"}
        assert {ep for _, d, ep in parts if d == "cpu"} == {"CPUExecutionProvider"}
    assert out["assigned"] and all(set(a) == {"OpenVINOExecutionProvider"} for a in out["assigned"])
    assert out["top1"] >= 0.9 and out["max_diff"] < 0.1 * out["scale"], out
