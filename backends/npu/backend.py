"""The NPU backend (`--target npu`): static-shape step graphs (static.py), partitioned for the
device profile (partition.py), one ONNX file per partition, NPU partitions checked at compile
by loading them on the NPU execution provider with CPU fallback disabled.

Options (CLI flags of `optc compile --target npu`): `chunk` (prefill tokens per step, default
64), `max_cache` (cache slots of the static graphs; default the model's context), `profile` (a
name in profiles/ or a YAML path; default qualcomm_htp_v73), `allow_cpu_fallback` (compile and
run where no NPU provider is present, or with no NPU partition: NPU partitions then run on the
CPU, and the runtime says so), `context_cache` (store QNN's compiled context in the artifact as
ORT EPContext models, so a device loads them without compiling).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import helper

from optc.backends.npu.partition import NPU, PartitionPlan, partition
from optc.backends.npu.profile import DEFAULT_PROFILE, DeviceProfile, load_profile
from optc.backends.npu.static import make_static
from optc.errors import OptcError
from optc.ir import save_model

DEFAULT_CHUNK = 64
OPTIONS = {"chunk", "max_cache", "profile", "allow_cpu_fallback", "context_cache"}


def _options(options: dict | None, info) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise OptcError(f"--target npu takes no option {unknown[0]!r} (options: {', '.join(sorted(OPTIONS))})")
    chunk = options.get("chunk") or DEFAULT_CHUNK
    max_cache = options.get("max_cache") or info.context
    if max_cache is None:
        raise OptcError("--target npu: the model records no context length: give --max-cache")
    if chunk < 2 or chunk > max_cache:
        raise OptcError(f"--chunk {chunk}: between 2 and --max-cache ({max_cache})")
    return {"chunk": chunk, "max_cache": max_cache, "profile": options.get("profile") or DEFAULT_PROFILE,
            "allow_cpu_fallback": bool(options.get("allow_cpu_fallback")),
            "context_cache": bool(options.get("context_cache"))}


def _value_info(v: ir.Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(v.name, int(v.dtype), list(v.shape))


def partition_models(static: ir.Model, plan: PartitionPlan) -> list[onnx.ModelProto]:
    """One ONNX model per partition: its nodes, the constants and initializers they read, the
    tensors crossing in as inputs and out as outputs."""
    proto = ir.to_proto(static)
    values = {v.name: v for v in static.graph.inputs}
    values.update({o.name: o for n in static.graph for o in n.outputs})
    nodes = {n.name: n for n in proto.graph.node}
    inits = {t.name: t for t in proto.graph.initializer}
    constants = {o: n for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    models = []
    for part in plan.partitions:
        body = [nodes[name] for name in part.nodes]
        read = {i for n in body for i in n.input if i}
        consts = [constants[i] for i in sorted(read) if i in constants]
        graph = helper.make_graph(
            consts + body, f"{static.graph.name or 'graph'}.p{part.index}",
            [_value_info(values[i]) for i in part.inputs], [_value_info(values[o]) for o in part.outputs],
            [inits[i] for i in sorted(read) if i in inits])
        m = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
                              producer_name="optc")
        models.append(m)
    return models


def compile(model: ir.Model, info, out_dir: Path, target: str, *, kv_cache=None, prefill=None, options=None,
            log=print) -> dict:
    from optc.runtime.executors.npu import INSTALL_HINT, npu_provider, npu_session

    if target != "npu":
        raise OptcError(f"--target {target}: the npu backend compiles for --target npu only")
    opts = _options(options, info)
    if kv_cache and (kv_cache.get("policy") or kv_cache.get("layout", "float") != "float"
                     or kv_cache.get("positions", "absolute") != "absolute"):
        raise OptcError("--target npu: runs a plain float cache (no eviction policy, quantised cache or slot "
                        "positions): drop the kv_cache passes from the config")
    if prefill:
        raise OptcError("--target npu: block_sparse prefill is not supported on the static NPU graphs")
    profile = load_profile(opts["profile"])
    provider = npu_provider(profile.execution_provider)
    if provider is None and not opts["allow_cpu_fallback"]:
        raise OptcError(f"--target npu: no NPU execution provider here: {INSTALL_HINT}, "
                        f"or pass --allow-cpu-fallback to build an artifact whose NPU partitions run on the CPU")
    out_dir = Path(out_dir)
    graphs, report, kv_outputs = {}, {}, None
    for step, tokens in (("prefill", opts["chunk"]), ("decode", 1)):
        static, kv_outputs = make_static(model, info, tokens, opts["max_cache"])
        plan = partition(static, profile)
        npu_parts = [p for p in plan.partitions if p.device == NPU]
        log(f"npu: {step} graph ({tokens} token(s) over {opts['max_cache']} cache slots): "
            f"{len(npu_parts)} NPU / {len(plan.partitions) - len(npu_parts)} CPU partitions, "
            f"{len(plan.transfers)} NPU<->CPU transfers, {plan.bytes_moved:,} bytes moved per step")
        if not npu_parts and not opts["allow_cpu_fallback"]:
            raise OptcError(f"--target npu: nothing in the graph runs on {profile.name} (it runs whole QDQ int8 "
                            f"units: quantise with outlier_split and quantize_outputs: true), or pass "
                            f"--allow-cpu-fallback to build a CPU-only NPU artifact")
        parts = []
        for part, proto in zip(plan.partitions, partition_models(static, plan)):
            name = f"{step}.p{part.index}.{part.device}.onnx"
            files = save_model(ir.from_proto(proto), out_dir / name)
            if part.device == NPU and provider is not None:
                _check_on_npu(out_dir / name, part.index, step, provider, profile, npu_session, log)
            parts.append({"file": name, "weights": [f.name for f in files[1:]], "device": part.device,
                          "nodes": len(part.nodes), "inputs": part.inputs, "outputs": part.outputs})
        graphs[step] = {"tokens": tokens, "partitions": parts}
        report[step] = {"partitions": len(plan.partitions), "npu_partitions": len(npu_parts),
                        "npu_nodes": sum(len(p.nodes) for p in npu_parts),
                        "cpu_nodes": sum(len(p.nodes) for p in plan.partitions if p.device != NPU),
                        "transfers": len(plan.transfers), "bytes_moved": plan.bytes_moved}
    return {"name": "npu", "profile": profile.name, "execution_provider": profile.execution_provider,
            "provider_options": dict(profile.provider_options), "allow_cpu_fallback": opts["allow_cpu_fallback"],
            "chunk": opts["chunk"], "max_cache": opts["max_cache"], "graphs": graphs, "kv_outputs": kv_outputs,
            "partition_report": report}


def _check_on_npu(path: Path, index: int, step: str, provider: str, profile: DeviceProfile, npu_session, log):
    """Load the partition on the NPU provider with CPU fallback disabled: one it rejects fails here."""
    try:
        npu_session(str(path), provider, dict(profile.provider_options))
    except Exception as e:  # onnxruntime raises its own exception types
        raise OptcError(f"--target npu: {provider} rejects {step} partition p{index} ({path.name}): "
                        f"{str(e).splitlines()[0][:300]}") from None
