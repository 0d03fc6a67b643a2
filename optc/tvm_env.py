"""How optc's processes start TVM, shared by the compiler (backends/tvm) and the runtime
(runtime/executors/tvm.py): without torch (tvm_ffi imports it whenever it is installed) and with a
thread pool of every CPU the process may use. Imports nothing heavy."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def torch_hidden():
    """tvm_ffi imports torch whenever it is installed (~3 s, ~400 MB) although neither the TVM
    runtime fed with numpy nor TVM's compiler needs it: hide it while `tvm` is imported (unless
    torch is loaded already). Apps can still import torch afterwards."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        yield
    finally:
        if hide:
            del sys.modules["torch"]


def use_available_cpus() -> None:
    """Give TVM's thread pool every CPU this process may run on, unless the user chose
    (TVM_NUM_THREADS or OMP_NUM_THREADS). Without either, TVM takes half the hardware threads on
    x86, assuming two hyper-threads a core: on machines without SMT, such as this project's
    2-core machines, every parallel kernel then ran on one thread (measured: prefill of 512
    tokens 210 ms on 1 thread, 129 ms on 2). The pool reads this when it starts, at the first
    parallel kernel; child processes (MetaSchedule's runners) inherit it."""
    if os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        cpus = os.cpu_count() or 1
    os.environ["TVM_NUM_THREADS"] = str(cpus)
