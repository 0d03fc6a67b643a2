"""Subprocess of tests/cuda_emulation.py: run each emulated kernel and its CPU reference on the
same random inputs; print a JSON {kernel: worst relative |Δ| over its buffers} as the last line."""
import ctypes
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import tvm


def inputs(shape, dtype, rng):
    if dtype.startswith("float"):
        return rng.uniform(-1, 1, shape).astype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype in ("uint8", "int8"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max + 1, shape).astype(dtype)
    return np.zeros(shape, dtype)  # indices and positions: 0 is in bounds everywhere


def aligned(a):
    raw = np.zeros(a.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64  # TVM's allocations are 64-byte aligned
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def main(workdir):
    meta = json.loads((workdir / "kernels.json").read_text())
    reference = tvm.runtime.load_module(str(workdir / "reference.so"))
    emulated = ctypes.CDLL(str(workdir / "emulated.so"))
    result = {}
    for name, m in sorted(meta.items()):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        arrays = [inputs(shape, dtype, rng) for _, shape, dtype in m["params"]]
        ref = [tvm.runtime.tensor(a) for a in arrays]
        reference[name](*ref)
        emu = {p[0]: aligned(a) for p, a in zip(m["params"], arrays)}
        pointers = (ctypes.c_void_p * len(m["args"]))(*[emu[a].ctypes.data for a in m["args"]])
        getattr(emulated, f"launch_{name}")(pointers, *[ctypes.c_uint(x) for x in m["grid"] + m["block"]])
        worst = 0.0
        for (pname, _, _), r in zip(m["params"], ref):
            want, got = r.numpy(), emu[pname]
            if np.issubdtype(want.dtype, np.floating):
                diff = np.nan_to_num(np.abs(want.astype(np.float64) - got), nan=np.inf).max()
                worst = max(worst, float(diff) / max(float(np.abs(want).max()), 1e-6))
            else:
                worst = max(worst, float((want != got).mean()))
        result[name] = worst
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
