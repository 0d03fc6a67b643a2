"""The TVM backend: the canonical graph lowered to Relax, bucketed into static shapes, tuned with
MetaSchedule, compiled into one shared library per artifact (docs/tvm.md).

    pipeline.py      compile() / tune(): the backend's entry points (what optc.backends.get_backend returns)
    lowering.py      ONNX graph -> what TVM's importer takes (Attention, RotaryEmbedding legalised)
    buckets.py       static-shape buckets and cache segments (imports no TVM)
    tuning.py        MetaSchedule tuning with a persistent database
    cuda.py          the CUDA build (fatbin shipped in the library) and its workarounds
    kernels/         optc's own TIR kernels: fused decode attention, flash-style prefill attention
    schedules/cpu.py optc's default CPU schedules for what tuning does not reach

Importing this package imports no TVM; pipeline.py does, when a compile asks for it.
"""
