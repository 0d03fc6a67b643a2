"""Shared fixtures. Exports and compiles are session-scoped: each is done once per test run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DECODER_DIR = ROOT / "models" / "pycoder-5m"
DATA_DIR = ROOT / "models" / "data"
sys.path.insert(0, str(ROOT / "models"))


def run_cli(args, capsys):
    """Run `optc ARGS` in-process; returns (exit code, stdout, stderr)."""
    from optc.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def config_error(tmp_path, model, config_text: str, capsys) -> str:
    """`optc compile` with a config that must be rejected: exit 2, one line on stderr, nothing
    written. Returns that line."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text)
    out = tmp_path / "out"
    code, _, err = run_cli(["compile", model, "-c", cfg, "-o", out], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


@pytest.fixture(scope="session")
def exported_decoder(tmp_path_factory) -> Path:
    """The shipped decoder exported with `optc export` (dynamo, opset 23)."""
    from optc.export import export_decoder

    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_decoder(DECODER_DIR, out, log=lambda *_: None)


@pytest.fixture(scope="session")
def torchscript_decoder(tmp_path_factory) -> Path:
    """The shipped decoder exported the way optimum does (TorchScript exporter, opset 14)."""
    from export_torchscript import export

    return export(DECODER_DIR, tmp_path_factory.mktemp("ts") / "model.onnx")


@pytest.fixture(scope="session")
def identity_artifact(tmp_path_factory, exported_decoder) -> Path:
    from optc.compile import compile_model

    out = tmp_path_factory.mktemp("art") / "identity"
    compile_model(exported_decoder, out, log=lambda *_: None)
    return out
