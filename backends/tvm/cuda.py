"""CUDA code for the TVM backend (`--target gpu`): dlight schedules, nvcc, a library that ships SASS.

TVM 0.27 generates CUDA C++ for every kernel but leaves compiling it to the machine that loads the
library: the module it exports holds the *source* (format "cuda"), and the TVM CUDA runtime
JIT-compiles it at load through a Python callback (nvcc or NVRTC on the target machine). An edge
app should not need a CUDA toolkit, nor pay seconds of compilation on every start, so optc
compiles the source here with nvcc and exports the library with the compiled fatbin in place of
the source. Loading it then only hands the fatbin to the driver (`cuModuleLoadData`).

The swap is done on the serialised module tree that TVM embeds in the library
(`__tvm_ffi__library_bin`), whose layout this module reads and checks field by field:
  blob   = u64 size, import tree (u64-length arrays of u64: row pointers, child indices),
           then per module: key string, and unless the key is "_lib" a payload string
  string = u64 length + bytes
  "cuda" payload = fmt string, function table, code string   (TVM's CUDAModuleNode::SaveToBytes)
Only the fmt and code strings change; anything unexpected is an error naming what was found.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from optc.errors import OptcError

DEFAULT_ARCH = "sm_90"
ARCH_PATTERN = re.compile(r"sm_(\d{2,3})a?")


def check_arch(arch: str) -> str:
    if not ARCH_PATTERN.fullmatch(arch):
        raise OptcError(f"--cuda-arch {arch!r}: expected an NVIDIA compute capability like sm_80, sm_89 or sm_90")
    return arch


def cuda_target(arch: str) -> dict:
    """The TVM target. The host code is generic x86-64 (no -mcpu): it runs on whatever CPU the GPU
    machine has."""
    return {"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32,
            "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}


def keep_bool_access_scalar(func):
    """`func` (a dlight-scheduled PrimFunc) with every vectorised loop around a block that reads or
    writes a bool buffer made an unrolled loop instead, and how many loops changed.

    Why: TVM 0.27's CUDA codegen prints a vector of bools as `ushort2`/`ushort4` (two bytes a
    lane) while a bool tensor holds one byte an element. A vectorised bool load then reads the
    wrong elements, and faults (cudaErrorMisalignedAddress) where the address is not a multiple of
    4. dlight vectorises the epilogue of the attention-score matmul, which reads the bool mask:
    measured on an H100, those kernels gave max |Δlogit| 4.6 and a misaligned-address fault."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block

    sch = s_tir.Schedule(func)
    changed = 0

    def visit(parent):
        nonlocal changed
        for block in sch.get_child_blocks(parent):
            stmt = sch.get(block)
            if any(r.source.dtype == "bool" for r in list(stmt.reads) + list(stmt.writes)):
                for loop in sch.get_loops(block):
                    if sch.get(loop).kind == tirx.ForKind.VECTORIZED:
                        sch.unroll(loop)
                        changed += 1
            visit(block)

    visit(get_root_block(sch))
    return (sch.mod["main"] if changed else func), changed


def build_pipeline(target):
    """TVM's default CUDA pipeline (library dispatch, legalisation + fusion + dlight, dataflow
    lowering, memory planning), plus `keep_bool_access_scalar` after dlight. The second value is
    a dict whose "bool_loops" counts the loops it changed, once the pipeline has run."""
    import tvm
    from tvm import tirx
    from tvm.relax.backend.cuda import pipeline as cuda

    stats = {"bool_loops": 0}

    @tvm.transform.module_pass(opt_level=0, name="optc.KeepBoolAccessScalar")
    def bool_access(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc):
                new, changed = keep_bool_access_scalar(func)
                if changed:
                    mod[gv] = new
                    stats["bool_loops"] += changed
        return mod

    @tvm.transform.module_pass(opt_level=0, name="optc.CudaPipeline")
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(
                cuda.library_dispatch_passes(target) + cuda.legalize_passes(target) + [bool_access]
                + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))(mod)

    return pipeline, stats


def find_nvcc() -> str:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    raise OptcError("--target gpu: nvcc (the CUDA toolkit) is needed to compile the kernels, and none is on "
                    "PATH or in $CUDA_HOME; no GPU is needed")


def compile_fatbin(source: str, arch: str, log=print) -> bytes:
    """nvcc: SASS for `arch` plus its PTX (so that newer GPUs can still JIT it).

    Not TVM's tvm.support.nvcc.compile_cuda(target_format="fatbin", compiler="nvcc"), which runs
    the same nvcc with more flags: --use_fast_math by default (approximate expf, division and
    square roots: other numerics than the CPU build the artifact is verified against), ptxas
    --register-usage-level=10, and whatever TVM_CUDA_PTXAS_EXTRA_OPTS / TVM_KERNEL_DUMP say in the
    environment, so the artifact would depend on the compiling shell. On this model's kernels it
    gave another fatbin (347,960 bytes against 412,304 here), and still another with fast math
    off (TVM_CUDA_NVCC_NO_FAST_MATH=1). Its failures are a RuntimeError holding the whole source."""
    nvcc = find_nvcc()
    number = ARCH_PATTERN.fullmatch(arch).group(1) + ("a" if arch.endswith("a") else "")
    with tempfile.TemporaryDirectory(prefix="optc-nvcc-") as tmp:
        # fixed file names in a fresh directory: nvcc's output depends on nothing else (deterministic)
        cu, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        cu.write_text(source, encoding="utf-8")
        cmd = [nvcc, "--fatbin", "-O3", "-w", f"-gencode=arch=compute_{number},code=[sm_{number},compute_{number}]",
               "-o", out.name, cu.name]
        log(f"tvm: nvcc → {arch} fatbin ({source.count('__global__')} kernels)")
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()] or \
                (proc.stderr + proc.stdout).splitlines() or ["no output"]
            raise OptcError(f"--target gpu: nvcc failed for {arch}: {lines[0].strip()}")
        return out.read_bytes()


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise OptcError(f"tvm backend: {self.what} ends early (TVM's library format changed?)")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def string(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise OptcError(f"tvm backend: {self.what} ends early (TVM's library format changed?)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def swap_cuda_code(blob: bytes, source: str, fatbin: bytes) -> bytes:
    """The library blob with the "cuda" module's source replaced by `fatbin` (format "fatbin")."""
    r = _Reader(blob, "the library's module blob")
    size = r.u64()
    if size != len(blob) - 8:
        raise OptcError(f"tvm backend: library blob says {size} bytes but holds {len(blob) - 8}")
    head_start = r.pos
    for _ in range(2):  # import tree: row pointers, child indices
        n = r.u64()
        for _ in range(n):
            r.u64()
    out = [blob[head_start:r.pos]]
    swapped = 0
    while r.pos < len(blob):
        key = r.string()
        out.append(_string(key))
        if key == b"_lib":
            continue
        payload = r.string()
        if key == b"cuda":
            payload = _swap_payload(payload, source, fatbin)
            swapped += 1
        out.append(_string(payload))
    if swapped != 1:
        raise OptcError(f"tvm backend: expected one CUDA module in the built library, found {swapped}")
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body


def _swap_payload(payload: bytes, source: str, fatbin: bytes) -> bytes:
    r = _Reader(payload, "the CUDA module")
    fmt = r.string()
    if fmt != b"cuda":
        raise OptcError(f"tvm backend: the CUDA module holds format {fmt.decode(errors='replace')!r}, "
                        f"not the source optc compiles")
    code = source.encode("utf-8")
    tail = _string(code)
    if not payload.endswith(tail):
        raise OptcError("tvm backend: the CUDA module's code is not the source TVM reported")
    function_table = payload[r.pos:len(payload) - len(tail)]
    return _string(b"fatbin") + function_table + _string(fatbin)


def c_blob_source(blob: bytes) -> str:
    """C that defines the symbol TVM's loader reads the module tree from."""
    rows = [",".join(str(b) for b in blob[i:i + 4096]) for i in range(0, len(blob), 4096)]
    return ("#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
            f"__attribute__((visibility(\"default\"))) extern const unsigned char __tvm_ffi__library_bin[{len(blob)}];\n"
            f"const unsigned char __tvm_ffi__library_bin[{len(blob)}] = {{\n" + ",\n".join(rows) + "\n};\n"
            "#ifdef __cplusplus\n}\n#endif\n")


def export_with_fatbin(executable, path: Path, arch: str, log=print) -> dict:
    """Export `executable` (a relax.build result for a CUDA target) to `path` with its kernels
    compiled to a fatbin for `arch`. Returns facts for the manifest."""
    import tvm_ffi

    host = executable.mod.imports[0] if executable.mod.imports else None
    cuda = [m for m in (host.imports if host is not None else []) if m.kind == "cuda"]
    if len(cuda) != 1:
        raise OptcError(f"tvm backend: expected one CUDA module in the build, found {len(cuda)}")
    source = cuda[0].inspect_source("cuda") or cuda[0].inspect_source()
    if "__global__" not in source:
        raise OptcError("tvm backend: the CUDA module carries no kernel source to compile")
    fatbin = compile_fatbin(source, arch, log)
    blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod).numpy())
    blob = swap_cuda_code(blob, source, fatbin)

    def pack_imports(_mod, _is_system_lib, _prefix, workspace_dir):
        c_path = Path(workspace_dir) / "devc.c"
        c_path.write_text(c_blob_source(blob), encoding="utf-8")
        return str(c_path)

    executable.mod.export_library(str(path), fpack_imports=pack_imports)
    return {"arch": arch, "kernels": source.count("__global__"), "fatbin_bytes": len(fatbin)}
