"""optc's CUDA kernels run on the CPU, for tests on machines without a GPU.

TVM generates CUDA C++ for `--target gpu`; nothing here can run it. This helper compiles the
generated kernels against `cuda_emulator/cuda_emu.h` (each GPU thread a fiber, shared memory,
__syncthreads and warp shuffles emulated; alignment checked by -fsanitize=alignment) with the host
C++ compiler, runs each on random inputs in a subprocess, and compares it with TVM's unscheduled
CPU build of the same fused function. It found the bool-vector miscompilation that
`optc.backends.tvm.cuda.keep_bool_access_scalar` works around.

What it does not model: timing, memory coalescing, the CUDA math library's exact ulps, code that
relies on warp-synchronous execution without a shuffle or barrier.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "cuda_emulator"
KERNEL = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(([^)]*)\) \{')
THREAD_LOOP = re.compile(r'T\.thread_binding\((?:T\.int64\()?(\d+)\)?, thread="((?:blockIdx|threadIdx)\.[xyz])"')


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


def c_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


def fused_functions(mod, target, pipeline) -> dict:
    """name -> PrimFunc after `pipeline` (a Relax pass) has run on `mod` under `target`."""
    from tvm import tirx

    with target:
        out = pipeline(mod)
    return {gv.name_hint: f for gv, f in out.functions.items() if isinstance(f, tirx.PrimFunc)}


def reference_functions(mod, target) -> dict:
    """The same fused functions before any GPU schedule (TVM's CUDA pipeline up to fusion)."""
    import tvm
    from tvm import relax

    return fused_functions(mod, target, tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR()]))


def build(scheduled: dict, reference: dict, cuda_target, cpu_target, workdir: Path,
          skip_unsupported: bool = False) -> dict:
    """Compile `scheduled` (name -> dlight-scheduled PrimFunc) to CUDA C++ with TVM, then with the
    host compiler against the emulator; `reference` (same names) for the CPU. Returns the
    per-kernel launch metadata also written to workdir/kernels.json. Kernels the emulator cannot
    launch (hand-threaded TIR such as TVM's sort/top-k: several launches per function, scalar
    parameters) are an error, or left out with `skip_unsupported`."""
    import tvm

    workdir.mkdir(parents=True, exist_ok=True)
    names = sorted(scheduled)
    lib = tvm.compile(tvm.IRModule({n: scheduled[n].with_attr("global_symbol", n) for n in names}), target=cuda_target)
    cuda = [m for m in lib.mod.imports if m.kind == "cuda"]
    source = cuda[0].inspect_source("cuda") or cuda[0].inspect_source()
    body = source[source.index('extern "C"'):]
    body = re.sub(r"__shared__ alignas\((\d+)\)", r"alignas(\1) static", body).replace("__shared__", "static")
    meta, launchers = {}, []
    for m in KERNEL.finditer(body):
        kernel, params = m.group(2), [p.strip() for p in m.group(3).split(",")]
        name = kernel.removesuffix("_kernel")
        if name not in scheduled:  # a second launch of a hand-threaded function (name_kernel_1)
            continue
        func = scheduled[name]
        script = func.script()
        extents: dict[str, set] = {}
        for extent, tag in THREAD_LOOP.findall(script):
            extents.setdefault(tag, set()).add(int(extent))
        pointers = [re.fullmatch(r".+?\*\s*__restrict__ (\w+)_ptr", p) for p in params]
        problem = ("hand-threaded (T.launch_thread)" if "T.launch_thread" in script else
                   f"loops of different extents bound to one thread axis: {extents}"
                   if any(len(v) > 1 for v in extents.values()) else
                   f"non-pointer parameters {params}" if not all(pointers) else None)
        if problem:
            if skip_unsupported:
                continue
            raise ValueError(f"{name}: cannot emulate: {problem}")
        dims = {tag: v.pop() for tag, v in extents.items()}
        buffers = {c_name(p.name): ([int(x) for x in p.shape], str(p.dtype)) for p in func.params}
        args = [m.group(1) for m in pointers]
        casts = ", ".join(f"({p.split('__restrict__')[0].strip()})a[{i}]" for i, p in enumerate(params))
        launchers.append(f'extern "C" void launch_{name}(void** a, unsigned gx, unsigned gy, unsigned gz, '
                         f'unsigned bx, unsigned by, unsigned bz) '
                         f'{{ emu_launch([&] {{ {kernel}({casts}); }}, {{gx, gy, gz}}, {{bx, by, bz}}); }}')
        meta[name] = {"params": [[c_name(p.name), *buffers[c_name(p.name)]] for p in func.params], "args": args,
                      "grid": [dims.get(f"blockIdx.{a}", 1) for a in "xyz"],
                      "block": [dims.get(f"threadIdx.{a}", 1) for a in "xyz"]}
    missing = set(names) - set(meta)
    if missing and not skip_unsupported:
        raise ValueError(f"no single CUDA kernel found for {sorted(missing)}")
    names = sorted(meta)
    (workdir / "kernels.cpp").write_text('#include "cuda_emu.h"\n' + body + "\n" + "\n".join(launchers) + "\n")
    proc = subprocess.run([compiler(), "-std=c++17", "-O1", "-fPIC", "-shared", "-fsanitize=alignment",
                           "-w", f"-I{HERE}", "-o", str(workdir / "emulated.so"), str(HERE / "cuda_emu.cpp"),
                           str(workdir / "kernels.cpp")], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"compiling the emulated kernels failed:\n{proc.stderr[-3000:]}")
    tvm.compile(tvm.IRModule({n: reference[n].with_attr("global_symbol", n) for n in names}),
                target=cpu_target).export_library(str(workdir / "reference.so"))
    (workdir / "kernels.json").write_text(json.dumps(meta))
    return meta


def run(workdir: Path, timeout: int = 600) -> tuple[dict, str]:
    """Run every built kernel in a subprocess: ({name: relative max |Δ| against the reference},
    the subprocess's stderr, where the alignment sanitizer reports misaligned loads)."""
    proc = subprocess.run([sys.executable, str(HERE / "run_kernels.py"), str(workdir)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"emulation failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
