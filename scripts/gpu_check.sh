#!/usr/bin/env bash
# Check a GPU artifact on a machine with an NVIDIA GPU and only the TVM runtime installed:
# loads it, compares against the expected logits stored beside it, prints latency.
#
#   scripts/gpu_check.sh ARTIFACT [--repeat N]
#
# Needs python3 with numpy, safetensors, apache-tvm==0.27.0.post1 and apache-tvm-ffi 0.1.14.x
# (the compiler library, libtvm_compiler.so, may be absent), and the NVIDIA driver. optc is used
# from this checkout. Exit status: 0 pass, 1 mismatch, 2 cannot load.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
