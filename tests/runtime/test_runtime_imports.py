"""The runtime must be shippable without the compiler's heavy dependencies."""

import subprocess
import sys

FORBIDDEN = ["torch", "transformers", "onnx", "onnxscript", "onnx_ir", "tvm", "tvm_ffi", "pydantic", "click"]


def test_runtime_import_is_light():
    code = ("import sys, optc.runtime\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runtime_load_and_generate_stays_light(identity_artifact):
    code = ("import sys, optc.runtime\n"
            f"m = optc.runtime.load({str(identity_artifact)!r})\n"
            "text = m.generate('def f(', max_new_tokens=4)\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
