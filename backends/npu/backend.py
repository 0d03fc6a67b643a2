"""The NPU backend (`--target npu`): static-shape step graphs (static.py), partitioned for the
device profile (partition.py), one ONNX file per partition, NPU partitions checked at compile
by loading them on the NPU execution provider with CPU fallback disabled.

Options (CLI flags of `optc compile --target npu`): `chunk` (prefill tokens per step, default
64), `max_cache` (cache slots of the static graphs; default the model's context), `profile` (a
name in profiles/ or a YAML path; default qualcomm_htp_v73), `allow_cpu_fallback` (compile and
run where no NPU provider is present, or with no NPU partition: NPU partitions then run on the
CPU, and the runtime says so), `context_cache` (also store QNN's compiled context of each NPU
partition as an ORT EPContext model, which the runtime loads without compiling when QNN runs
it; QNN 2.7.0 writes a different context file each build, so such artifacts are not
byte-identical across builds: opt-in).

Encoders (`compile_encoder`): one static graph taking one text of exactly `max_length` tokens
(`--max-length`, default 128 or the model's own max_length where shorter; the runtime pads
shorter texts and masks the padding, the tokenizer truncates longer ones), partitioned and
checked on the NPU provider like a decoder's step graph; `profile`, `allow_cpu_fallback` and
`context_cache` as above, `chunk`/`max_cache` refused.
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
MODEL_KINDS = ("decoder", "encoder")


def _options(options: dict | None, info) -> dict:
    options = dict(options or {})
    if options.get("max_length") is not None:
        raise OptcError("--max-length: an encoder's static sequence length; a decoder's static graphs take "
                        "--chunk and --max-cache")
    options.pop("max_length", None)
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


def report_lines(static: ir.Model, plan: PartitionPlan, step: str) -> list[str]:
    """The partition as `optc inspect --target npu` prints it: nodes per partition (with their
    ops), the tensors crossing between partitions, bytes moved to and from the NPU per step."""
    from collections import Counter

    op_of = {n.name: n.op_type for n in static.graph}
    dev = {p.index: p.device for p in plan.partitions}
    size = {}
    for c in plan.crossings:
        size.setdefault((c.source, "out"), 0)
        size[(c.source, "out")] += c.bytes or 0
        size.setdefault((c.target, "in"), 0)
        size[(c.target, "in")] += c.bytes or 0
    lines = [f"{step}: {len(plan.partitions)} partitions ({sum(p.device == NPU for p in plan.partitions)} NPU), "
             f"{len(plan.transfers)} NPU<->CPU transfers, {plan.bytes_moved:,} bytes moved per step (estimated "
             f"from static shapes)"]
    for p in plan.partitions:
        ops = Counter(op_of[n] for n in p.nodes)
        top = ", ".join(f"{op}×{k}" for op, k in sorted(ops.items(), key=lambda x: (-x[1], x[0]))[:5])
        more = f", +{len(ops) - 5} op types" if len(ops) > 5 else ""
        lines.append(f"  p{p.index:<3} {p.device.upper():3} {len(p.nodes):5} nodes  in {len(p.inputs):2} "
                     f"({size.get((p.index, 'in'), 0):>9,} B)  out {len(p.outputs):2} "
                     f"({size.get((p.index, 'out'), 0):>9,} B)  {top}{more}")
    lines.append(f"  tensors crossing to or from the NPU ({len(plan.transfers)}):")
    for c in plan.transfers:
        src = c.source if c.source == "host" else f"p{c.source} {dev[c.source].upper()}"
        dst = c.target if c.target == "host" else f"p{c.target} {dev[c.target].upper()}"
        lines.append(f"    {c.tensor}  {src} -> {dst}  {c.dtype}  {c.bytes if c.bytes is not None else '?':,} B")
    reasons = Counter(plan.cpu_reasons.values())
    lines.append("  why nodes are on the CPU:")
    for why, k in sorted(reasons.items(), key=lambda x: -x[1])[:12]:
        lines.append(f"    {k:5} × {why}")
    return lines


def plans(model: ir.Model, info, options: dict | None):
    """{step: (static graph, partition plan)} for the prefill chunk and the decode step."""
    opts = _options(options, info)
    profile = load_profile(opts["profile"])
    out = {}
    for step, tokens in (("prefill", opts["chunk"]), ("decode", 1)):
        static, kv_outputs = make_static(model, info, tokens, opts["max_cache"])
        out[step] = (static, partition(static, profile), kv_outputs)
    return opts, profile, out


def compile(model: ir.Model, info, out_dir: Path, target: str, *, kv_cache=None, prefill=None, options=None,
            log=print) -> dict:
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
    provider = _npu_provider_or_refuse(profile, opts)
    out_dir = Path(out_dir)
    graphs, report = {}, {}
    _, _, step_plans = plans(model, info, options)
    for step, (static, plan, kv_outputs) in step_plans.items():
        tokens = opts["chunk"] if step == "prefill" else 1
        log(f"npu: {step} graph ({tokens} token(s) over {opts['max_cache']} cache slots): {_summary(plan)}")
        graphs[step], report[step] = write_partitions(step, tokens, static, plan, out_dir, provider, profile, opts,
                                                      log)
    return {"name": "npu", "profile": profile.name, "execution_provider": profile.execution_provider,
            "provider_options": dict(profile.provider_options), "allow_cpu_fallback": opts["allow_cpu_fallback"],
            "chunk": opts["chunk"], "max_cache": opts["max_cache"], "graphs": graphs, "kv_outputs": kv_outputs,
            "partition_report": report}


def _summary(plan: PartitionPlan) -> str:
    npu = sum(p.device == NPU for p in plan.partitions)
    return (f"{npu} NPU / {len(plan.partitions) - npu} CPU partitions, {len(plan.transfers)} NPU<->CPU transfers, "
            f"{plan.bytes_moved:,} bytes moved per step")


def write_partitions(step: str, tokens: int, static: ir.Model, plan: PartitionPlan, out_dir: Path,
                     provider: str | None, profile: DeviceProfile, opts: dict, log) -> tuple[dict, dict]:
    """One ONNX file per partition of a static graph (`{step}.p{i}.{device}.onnx`), each NPU
    partition loaded on `provider` with CPU fallback disabled (one it rejects fails here); the
    manifest's graph entry and the partition report."""
    from optc.runtime.executors.npu import npu_session

    npu_parts = [p for p in plan.partitions if p.device == NPU]
    if not npu_parts and not opts["allow_cpu_fallback"]:
        raise OptcError(f"--target npu: nothing in the graph runs on {profile.name} (it runs whole QDQ int8 "
                        f"units: quantise with outlier_split and quantize_outputs: true), or pass "
                        f"--allow-cpu-fallback to build a CPU-only NPU artifact")
    parts = []
    for part, proto in zip(plan.partitions, partition_models(static, plan)):
        name = f"{step}.p{part.index}.{part.device}.onnx"
        files = save_model(ir.from_proto(proto), out_dir / name)
        entry = {"file": name, "weights": [f.name for f in files[1:]], "device": part.device,
                 "nodes": len(part.nodes), "inputs": part.inputs, "outputs": part.outputs}
        if part.device == NPU and provider is not None:
            context = f"{step}.p{part.index}.qnn_context.onnx" if opts["context_cache"] else None
            _check_on_npu(out_dir / name, part.index, step, provider, profile, npu_session, log,
                          context_file=out_dir / context if context else None)
            if context:
                entry["context"] = context
        parts.append(entry)
    report = {"partitions": len(plan.partitions), "npu_partitions": len(npu_parts),
              "npu_nodes": sum(len(p.nodes) for p in npu_parts),
              "cpu_nodes": sum(len(p.nodes) for p in plan.partitions if p.device != NPU),
              "transfers": len(plan.transfers), "bytes_moved": plan.bytes_moved}
    return {"tokens": tokens, "partitions": parts}, report


def _npu_provider_or_refuse(profile: DeviceProfile, opts: dict) -> str | None:
    from optc.runtime.executors.npu import INSTALL_HINT, no_npu_provider_reason, npu_provider

    provider = npu_provider(profile.execution_provider)
    if provider is None and not opts["allow_cpu_fallback"]:
        raise OptcError(f"--target npu: no NPU execution provider here: "
                        f"{no_npu_provider_reason(profile.execution_provider)}, "
                        f"or pass --allow-cpu-fallback to build an artifact whose NPU partitions run on the CPU")
    if opts["context_cache"] and provider != "QNNExecutionProvider":
        raise OptcError(f"--context-cache: stores QNN's compiled context, and the QNN execution provider is not "
                        f"present here ({INSTALL_HINT})")
    return provider


# -- encoders ------------------------------------------------------------------------------------
# An encoder runs one static graph per batch of texts: its token inputs fixed to [ENCODER_BATCH,
# max_length]. Batch 1: each text runs alone (measured on MiniLM on the HTP simulator, [1, 128]
# 2.3 s, [4, 128] 23 s: batching does not pay there), padded to max_length.
ENCODER_BATCH = 1
DEFAULT_ENCODER_LENGTH = 128
ENCODER_OPTIONS = {"max_length", "profile", "allow_cpu_fallback", "context_cache"}
DECODER_ONLY = {"chunk": "--chunk", "max_cache": "--max-cache"}


def encoder_options(options: dict | None, model_max_length: int) -> dict:
    """The NPU options of an encoder: `max_length`, the static sequence length every text is
    padded (or truncated) to, default 128 or the model's own max_length where that is shorter."""
    options = {k: v for k, v in dict(options or {}).items() if v is not None}
    for key, flag in DECODER_ONLY.items():
        if key in options:
            raise OptcError(f"{flag}: a decoder's static prefill/cache size; an encoder's static graph takes "
                            f"--max-length tokens per text")
    unknown = sorted(set(options) - ENCODER_OPTIONS)
    if unknown:
        raise OptcError(f"--target npu takes no option {unknown[0]!r} for an encoder (options: "
                        f"{', '.join(sorted(ENCODER_OPTIONS))})")
    length = options.get("max_length") or min(DEFAULT_ENCODER_LENGTH, model_max_length)
    if length < 2 or length > model_max_length:
        raise OptcError(f"--max-length {length}: between 2 and the model's max_length ({model_max_length})")
    return {"max_length": length, "profile": options.get("profile") or DEFAULT_PROFILE,
            "allow_cpu_fallback": bool(options.get("allow_cpu_fallback")),
            "context_cache": bool(options.get("context_cache"))}


def encoder_plan(model: ir.Model, info, options: dict | None, model_max_length: int):
    """(options, profile, static graph, partition plan) of an encoder's one static graph."""
    from optc.backends.npu.static import make_static_encoder

    opts = encoder_options(options, model_max_length)
    profile = load_profile(opts["profile"])
    static = make_static_encoder(model, info, ENCODER_BATCH, opts["max_length"])
    return opts, profile, static, partition(static, profile)


def compile_encoder(model: ir.Model, info, out_dir: Path, target: str, *, options=None, model_max_length: int,
                    pooling_weights: str | None = None, log=print) -> dict:
    """The NPU artifact of an encoder: its static graph (`max_length` tokens per text), partitioned
    for the profile, one file per partition, NPU partitions loaded on the NPU provider."""
    if target != "npu":
        raise OptcError(f"--target {target}: the npu backend compiles for --target npu only")
    if pooling_weights is not None:
        raise OptcError(f"--target npu: the static encoder graph has no kept-token output ({pooling_weights}): "
                        f"token_dropping runs on --target cpu only")
    opts = encoder_options(options, model_max_length)
    profile = load_profile(opts["profile"])
    provider = _npu_provider_or_refuse(profile, opts)
    _, _, static, plan = encoder_plan(model, info, options, model_max_length)
    log(f"npu: encoder graph ({ENCODER_BATCH} text × {opts['max_length']} tokens, shorter texts padded, longer "
        f"truncated): {_summary(plan)}")
    graph, report = write_partitions("encoder", opts["max_length"], static, plan, Path(out_dir), provider, profile,
                                     opts, log)
    return {"name": "npu", "profile": profile.name, "execution_provider": profile.execution_provider,
            "provider_options": dict(profile.provider_options), "allow_cpu_fallback": opts["allow_cpu_fallback"],
            "batch": ENCODER_BATCH, "max_length": opts["max_length"], "graphs": {"encoder": graph},
            "partition_report": {"encoder": report}}


def _check_on_npu(path: Path, index: int, step: str, provider: str, profile: DeviceProfile, npu_session, log,
                  context_file: Path | None = None):
    """Load the partition on the NPU provider with CPU fallback disabled: one it rejects fails here.
    With `context_file`, the provider's compiled context is written there (ORT EPContext model)."""
    try:
        npu_session(str(path), provider, dict(profile.provider_options),
                    context_file=str(context_file) if context_file else None)
    except Exception as e:  # onnxruntime raises its own exception types
        raise OptcError(f"--target npu: {provider} rejects {step} partition p{index} ({path.name}): "
                        f"{str(e).splitlines()[0][:300]}") from None
