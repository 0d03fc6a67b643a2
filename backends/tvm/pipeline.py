"""TVM backend: canonical graph -> legalised, static-shape ONNX per bucket -> Relax -> tuned library.

Steps (each logged):
1. expose each layer's new K/V (as for ONNX Runtime) and lower Attention / RotaryEmbedding into
   primitive ops (lowering.legalize);
2. per bucket (buckets.plan_buckets), specialise to static shapes, constant-fold, import with
   TVM's ONNX frontend; the model's weights stay function parameters, shared by every bucket;
3. legalise and fuse Relax ops into TIR, tune the fused functions with MetaSchedule against a
   persistent database (tuning), apply the best schedules, build;
4. write `model.so` (exported library), `params.safetensors` and the manifest section.

TVM is imported here only: `import optc.backends` and the ONNX Runtime backend never need it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from optc.backends.base import attention_outputs as attention_output_names
from optc.backends.base import expose_new_kv
from optc.backends.tvm.lowering import fold_weight_transposes, legalize, specialize
from optc.backends.tvm.buckets import DEFAULT_CACHE, DEFAULT_PREFILL, cache_segments, input_shapes, plan_buckets
from optc.errors import OptcError
from optc.runtime.manifest import BLOCK_SPARSE_IF_SUFFIX, LAYOUT_INT8, LAYOUT_KIVI, PRUNED_FROM_LAYER

LIBRARY_FILE = "model.so"
PARAMS_FILE = "params.safetensors"
TVM_REQUIREMENT = "apache-tvm==0.27.0.post1 with apache-tvm-ffi>=0.1.14.post0,<0.1.15"
DEFAULT_TRIALS = 1000
SHARED_MIN_ELEMENTS = 1024
# Legalising an ONNX Gather prints this once per function; optc's gathers index the embedding
# with token ids the runtime has already checked against the vocabulary.
KNOWN_NATIVE_WARNINGS = ("Fast mode segfaults when there are out-of-bounds indices",)
DEFAULT_TIME_LIMIT = 600.0


def import_tvm():
    loaded = sys.modules.get("tvm")
    if loaded is not None and getattr(loaded, "_optc_runtime_only", False):
        raise OptcError("--backend tvm: this process loaded a TVM artifact with the TVM runtime library only, "
                        "and TVM's compiler cannot be loaded next to it; compile in a fresh process")
    from optc.tvm_env import torch_hidden, use_available_cpus

    use_available_cpus()  # (tuning measures with the threads the runtime will use)
    try:
        with torch_hidden():
            import tvm
            from tvm import relax  # noqa: F401
            from tvm.relax.frontend.onnx import from_onnx  # noqa: F401
    except ImportError as e:
        raise OptcError(f"--backend tvm: TVM is not installed ({e}); pip install 'optc[tvm]' "
                        f"({TVM_REQUIREMENT})") from None
    import tvm_ffi

    version = getattr(tvm_ffi, "__version__", "")
    if version.startswith("0.1.15"):
        raise OptcError(f"--backend tvm: apache-tvm-ffi {version} segfaults when MetaSchedule serialises a "
                        f"module; install {TVM_REQUIREMENT}")
    return tvm


def cpu_target() -> dict:
    from tvm.target import codegen

    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": str(codegen.llvm_get_system_cpu()),
            "num-cores": os.cpu_count() or 1}


@contextlib.contextmanager
def native_warnings_filtered(patterns=KNOWN_NATIVE_WARNINGS):
    """TVM's C++ code writes some warnings straight to file descriptor 2. Capture it for the
    duration and pass on only the lines that are not known noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not any(p in line for p in patterns):
                    print(line, file=sys.stderr)


def _graph_inputs(model) -> dict[str, tuple]:
    return {v.name: tuple(d if isinstance(d, int) else str(d) for d in v.shape) for v in model.graph.inputs}


def _import_bucket(proto, name: str, shared: set[str]):
    """One bucket's Relax function: inputs first, then the shared weights it uses (by name);
    constants the specialisation folded are bound into the function."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Renaming name past_key_values.0.key to ..." per input
        try:
            mod = from_onnx(proto, keep_params_in_input=True)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OptcError(f"tvm backend: TVM's ONNX importer rejects the lowered graph ({msg})") from None
    mod, params = relax.frontend.detach_params(mod)
    extra = [gv.name_hint for gv in mod.functions if gv.name_hint != "main"]
    if extra:  # buckets are merged into one module by their main function only
        raise OptcError(f"tvm backend: importing the graph produced helper function {extra[0]!r}, which optc "
                        f"cannot merge across shapes yet")
    func = mod["main"]
    n_inputs = len(proto.graph.input)
    init_names = [str(p.name) for p in func.params[n_inputs:]]
    arrays = dict(zip(init_names, params["main"]))
    folded = {k: v for k, v in arrays.items() if k not in shared}
    if folded:
        func = relax.transform.BindParams("main", folded)(tvm.IRModule({"main": func}))["main"]
    weight_names = [k for k in init_names if k in shared]
    return func.with_attr("global_symbol", name), [i.name for i in proto.graph.input], weight_names, \
        {k: arrays[k] for k in weight_names}


TUNING_OPTIONS = ("tune_trials", "tune_time_limit", "tuning_cache")


def _function_count(mod) -> int:
    import tvm

    return sum(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values())


def _scheduled_count(mod) -> int:
    import tvm

    return sum(isinstance(f, tvm.tirx.PrimFunc) and bool(f.attrs and f.attrs.get("tirx.is_scheduled", False))
               for f in mod.functions.values())


def _check_target(target: str, options: dict) -> None:
    if target == "npu":
        raise OptcError("--target npu: the NPU target comes with the quantised outlier-splitting work "
                        "(the tvm backend generates CPU and CUDA code)")
    if target not in ("cpu", "gpu"):
        raise OptcError(f"--target {target}: the tvm backend supports cpu and gpu")
    if target == "gpu":
        tuning = [k for k in TUNING_OPTIONS if options.get(k) is not None]
        if tuning:
            raise OptcError(f"--{tuning[0].replace('_', '-')}: --target gpu uses TVM's default GPU schedules "
                            f"(dlight) and tunes nothing; tuning options are for --target cpu")
    elif options.get("cuda_arch") is not None:
        raise OptcError("--cuda-arch: only for --target gpu")


def _refuse_contrib_ops(model) -> None:
    """weight_quant's MatMulNBits is an ONNX Runtime contrib op with no TVM lowering: refuse it in
    one line naming the pass, before TVM loads."""
    if any(n.domain == "com.microsoft" and n.op_type == "MatMulNBits" for n in model.graph):
        raise OptcError("tvm backend: the weight_quant pass lowers to ONNX Runtime's com.microsoft::MatMulNBits, "
                        "which TVM cannot compile; use --backend onnxruntime or drop weight_quant")


def _prepare(model, info, kv_cache: dict, options: dict, log, prefill: dict | None = None, target: str = "cpu"):
    """Lower and import every bucket; returns (Relax module, target JSON, buckets, weights,
    segments, kv_outputs, attention_outputs, fused attentions {"decode": n, "prefill": n}).
    For the CPU the module is already legalised and fused into TIR functions (what MetaSchedule
    tunes); for the GPU, CUDA's default pipeline does that in the build."""
    _refuse_contrib_ops(model)
    if kv_cache.get("layout") == LAYOUT_INT8:
        raise OptcError("tvm backend: kv_quantize scales: static keeps an int8 cache with fixed scales (ONNX "
                        "Runtime's GroupQueryAttention layout), and the TVM cache segments are float or KIVI; use "
                        "scales: dynamic or --backend onnxruntime")
    if kv_cache.get(PRUNED_FROM_LAYER) is not None:
        raise OptcError("tvm backend: token_dropping mode prefill caches fewer tokens in later layers, and the TVM "
                        "buckets size one cache for every layer (per-layer cache segments are not built yet); use "
                        "--backend onnxruntime")
    tvm = import_tvm()
    from tvm import relax

    unknown_ifs = [n.name for n in model.graph if n.op_type == "If" and not n.name.endswith(BLOCK_SPARSE_IF_SUFFIX)]
    if unknown_ifs:
        raise OptcError(f"tvm backend: If node {unknown_ifs[0]!r} cannot be lowered (TVM's ONNX importer has no If; "
                        f"optc lowers only block_sparse's prefill test)")
    kv_outputs = expose_new_kv(model, info)
    attention_outputs = attention_output_names(model)
    outputs = ["logits"] + [n for pair in kv_outputs for n in pair] + attention_outputs
    lowered = legalize(model, info)
    folded = fold_weight_transposes(model)
    log(f"tvm: lowered {lowered['Attention']} Attention and {lowered['RotaryEmbedding']} RotaryEmbedding ops "
        f"to primitive ops; pre-transposed {folded} weight(s)")

    segments = cache_segments(kv_cache, info.n_layers)
    sparse, prefill = prefill, options.get("prefill_sizes") or list(DEFAULT_PREFILL)
    cache = options.get("cache_sizes") or list(DEFAULT_CACHE)
    buckets = plan_buckets(kv_cache, segments, prefill=prefill, cache=cache,
                           sparse_prefill_min=(sparse or {}).get("min_prefill_tokens"))
    declared = _graph_inputs(model)
    # the model's weights stay parameters (stored once, shared by every bucket); small constants
    # (masks, scalars) are bound into the functions
    shared = {v.name for v in model.graph.initializers.values()
              if v.const_value is not None and v.const_value.size >= SHARED_MIN_ELEMENTS}

    functions = {}
    weights: dict[str, np.ndarray] = {}
    for i, bucket in enumerate(buckets):
        shapes = input_shapes(bucket, segments, declared)
        proto = specialize(model, shapes, outputs, branch=bucket.get("branch"))
        func, inputs, params, arrays = _import_bucket(proto, bucket["name"], shared)
        functions[bucket["name"]] = func
        bucket.update({"inputs": inputs, "params": params})
        for k, tensor in arrays.items():  # every bucket shares these: copy each out of TVM once
            if k not in weights:
                weights[k] = tensor.numpy()
        log(f"tvm: [{i + 1}/{len(buckets)}] imported {bucket['name']}: {bucket['tokens']} new tokens, cache "
            f"{'+'.join(map(str, bucket['segments']))} slots")
    mod = tvm.IRModule(functions)
    if target == "gpu":
        from optc.backends.tvm import cuda as tvm_cuda

        arch = tvm_cuda.check_arch(options.get("cuda_arch") or tvm_cuda.DEFAULT_ARCH)
        return mod, tvm_cuda.cuda_target(arch), buckets, weights, segments, kv_outputs, attention_outputs, {}
    target_json = cpu_target()
    tvm_target = tvm.target.Target(target_json)
    from optc.backends.tvm.kernels.attention import FuseAttention
    from optc.backends.tvm.schedules.cpu import legalizations

    fuse = FuseAttention(tvm_target)
    with tvm_target, native_warnings_filtered():
        mod = tvm.transform.Sequential([
            fuse,
            relax.transform.LegalizeOps(customize_legalize_map=legalizations()),
            relax.get_pipeline("zero"),  # legalise the rest to TIR and fuse (no database yet)
        ], name="optc.CpuPipeline")(mod)
    fused = fuse.fused
    log(f"tvm: {fused['decode']} decode attention(s) fused into one kernel each (the cache read in place"
        f"{', dequantised in registers' if kv_cache.get('layout') == LAYOUT_KIVI else ''}); "
        f"{fused['prefill']} prefill attention(s) into flash-style kernels (masked key blocks skipped)")
    for line in kept_attention_lines(fuse.kept):
        log(line)
    return mod, target_json, buckets, weights, segments, kv_outputs, attention_outputs, fused


def kept_attention_lines(kept: list[tuple[str, int, str]]) -> list[str]:
    """One line per reason an attention stayed on the generic path (FuseAttention's `kept`), naming
    the buckets and layers it holds for: attentions are counted in graph order, one per layer."""
    by_reason: dict[str, dict[str, list[int]]] = {}
    for function, index, reason in kept:
        by_reason.setdefault(reason, {}).setdefault(function, []).append(index)
    lines = []
    for reason, where in by_reason.items():
        layer_sets: dict[tuple[int, ...], list[str]] = {}
        for function, layers in where.items():
            layer_sets.setdefault(tuple(layers), []).append(function)
        places = "; ".join(f"{', '.join(functions)}: layer{'s' if len(layers) > 1 else ''} {_spans(layers)}"
                           for layers, functions in layer_sets.items())
        lines.append(f"tvm: attention kept on the generic path ({places}): {reason}")
    return lines


def _spans(numbers) -> str:
    """0, 1, 2, 5 -> "0-2, 5"."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n > start else f"{n}")
            start = None
    return ", ".join(out)


def _tune(mod, target_json: dict, options: dict, log):
    import tvm

    from optc.backends.tvm import tuning as tuning

    db_root = Path(options.get("tuning_cache") or tuning.default_cache_dir())
    database = tuning.open_database(db_root, target_json)
    trials = options.get("tune_trials")
    time_limit = options.get("tune_time_limit")
    stats = tuning.tune(mod, tvm.target.Target(target_json), database,
                            trials=DEFAULT_TRIALS if trials is None else trials,
                            time_limit=DEFAULT_TIME_LIMIT if time_limit is None else time_limit,
                            db_dir=tuning.database_dir(db_root, target_json), log=log)
    stats["database_key"] = tuning.database_dir(db_root, target_json).name
    return database, stats


def tune(model, info, target: str, *, kv_cache: dict | None = None, prefill: dict | None = None,
         options: dict | None = None, log=print) -> dict:
    """`optc tune`: fill the tuning database for this model and config; builds nothing."""
    _check_target(target, dict(options or {}))
    if target == "gpu":
        raise OptcError("optc tune --target gpu: the GPU code uses TVM's default schedules (dlight); "
                        "there is nothing to tune")
    mod, target_json, *_ = _prepare(model, info, kv_cache or {"layout": "float"}, dict(options or {}), log, prefill)
    _, stats = _tune(mod, target_json, dict(options or {}), log)
    return stats


def compile(model, info, out_dir: Path, target: str, *, kv_cache: dict | None = None, prefill: dict | None = None,
            options: dict | None = None, log=print) -> dict:
    options = dict(options or {})
    _check_target(target, options)
    t0 = time.perf_counter()
    mod, target_json, buckets, weights, segments, kv_outputs, attention_outputs, fused = _prepare(
        model, info, kv_cache or {"layout": "float"}, options, log, prefill, target)
    from tvm import relax
    import tvm

    out_dir = Path(out_dir)
    tvm_target = tvm.target.Target(target_json)
    if target == "gpu":
        from optc.backends.tvm import cuda as tvm_cuda

        log(f"tvm: building CUDA code for {target_json['arch']} with TVM's default GPU schedules (dlight)")
        try:
            with tvm_target, native_warnings_filtered():
                pipeline, cuda_stats = tvm_cuda.build_pipeline(tvm_target)
                mod = pipeline(mod)
                executable = relax.build(mod, tvm_target, relax_pipeline=None)
        except Exception as e:
            raise OptcError(f"tvm backend: CUDA build failed ({str(e).splitlines()[0]})") from None
        if cuda_stats["bool_loops"]:
            log(f"tvm: {cuda_stats['bool_loops']} vectorised bool access loop(s) kept scalar (TVM's CUDA codegen "
                f"loads bool vectors with the wrong width)")
        device_section = {"device": "cuda", "cuda": tvm_cuda.export_with_fatbin(executable, out_dir / LIBRARY_FILE,
                                                                               target_json["arch"], log),
                          "schedules": "dlight (TVM's default GPU schedules)",
                          "bool_loops_kept_scalar": cuda_stats["bool_loops"]}
    else:
        database, stats = _tune(mod, target_json, options, log)
        from tvm.s_tir import dlight

        from optc.backends.tvm.schedules.cpu import default_rules

        own_kernels = _scheduled_count(mod)  # optc's fused attention kernels come scheduled
        with tvm_target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            from_database = _scheduled_count(mod) - own_kernels
            # what the database has no schedule for gets optc's default CPU schedules
            # (schedules/cpu); what they do not match keeps TVM's naive loop nest
            mod = dlight.ApplyDefaultSchedule(*default_rules())(mod)
        total, scheduled = _function_count(mod), _scheduled_count(mod)
        log(f"tvm: schedules: {own_kernels} fused attention kernel(s), {from_database} from the tuning database, "
            f"{scheduled - from_database - own_kernels} optc defaults (matmul, row-wise), "
            f"{total - scheduled} of {total} functions left as plain loops (element-wise)")
        log("tvm: building the library")
        try:
            executable = relax.build(mod, tvm_target, relax_pipeline="default_build")
        except Exception as e:
            raise OptcError(f"tvm backend: build failed ({str(e).splitlines()[0]})") from None
        executable.export_library(str(out_dir / LIBRARY_FILE))
        # only what every compile of these inputs writes the same (the artifact is deterministic);
        # trials and times are in the compile log
        device_section = {"device": "cpu", "tuning": {"tasks": stats["tasks"], "untunable": stats["untunable"],
                                                      "database_key": stats["database_key"]},
                          "fused_decode_attention": fused["decode"],
                          "fused_prefill_attention": fused["prefill"]}
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(weights[k]) for k in sorted(weights)}, str(out_dir / PARAMS_FILE))
    log(f"tvm: compiled {len(buckets)} shapes in {time.perf_counter() - t0:.0f}s")
    return {
        "name": "tvm",
        "library": LIBRARY_FILE,
        "params": PARAMS_FILE,
        "target": target_json,
        "target_kind": target_json["kind"],
        **device_section,
        "segments": [s.to_dict() for s in segments],
        # block-sparse prefill: buckets with "branch" are picked by the real prompt length
        "sparse_prefill_min_tokens": (prefill or {}).get("min_prefill_tokens"),
        "buckets": buckets,
        "kv_outputs": kv_outputs,
        "attention_outputs": attention_outputs,
    }
