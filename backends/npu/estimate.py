"""A roofline estimate of an NPU step from the device profile: an ESTIMATE, not a measurement.

Per NPU partition: time = max(int8 ops / (TOPS x efficiency), bytes read and written / memory
bandwidth), where the ops are 2 x the multiply-accumulates of its MatMul/Gemm nodes and the bytes
its weights (int8 codes, scales) plus the activations crossing its boundary. Per NPU<->CPU
transfer: the profile's handover latency plus bytes / handover rate. The CPU partitions are not
modelled here: the caller adds their time as measured on a CPU and says which.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from optc.backends.npu.partition import NPU, PartitionPlan, tensor_bytes
from optc.backends.npu.profile import DeviceProfile


def _macs(node: ir.Node) -> int:
    if node.op_type not in ("MatMul", "Gemm", "MatMulInteger"):
        return 0
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None or a.shape is None or b.shape is None:
        return 0
    ad, bd = list(a.shape), list(b.shape)
    if not all(isinstance(d, int) for d in ad + bd) or len(bd) < 2:
        return 0
    k, n = bd[-2], bd[-1]
    if node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].as_int():
        k, n = bd[-1], bd[-2]
    return math.prod(ad[:-1]) * k * n * max(1, math.prod(bd[:-2]))


def estimate_step(static: ir.Model, plan: PartitionPlan, profile: DeviceProfile) -> dict:
    """Seconds for the NPU partitions and the handovers of one step of `static` (roofline)."""
    nodes = {n.name: n for n in static.graph}
    values = {v.name: v for v in static.graph.inputs}
    values.update({o.name: o for n in static.graph for o in n.outputs})
    peak = profile.compute.int8_tops.value * 1e12 * profile.compute.efficiency.value
    bandwidth = profile.memory.bandwidth_gb_s.value * 1e9
    npu_seconds, ops_total, weight_total, bound = 0.0, 0, 0, {"compute": 0, "memory": 0}
    for part in plan.partitions:
        if part.device != NPU:
            continue
        members = [nodes[n] for n in part.nodes]
        ops = 2 * sum(_macs(n) for n in members)
        weights = {v.name: v for n in members for v in n.inputs
                   if v is not None and v.const_value is not None}
        weight_bytes = sum(v.const_value.nbytes for v in weights.values())
        act_bytes = sum(tensor_bytes(values[t]) or 0 for t in part.inputs + part.outputs)
        t_compute, t_memory = ops / peak, (weight_bytes + act_bytes) / bandwidth
        bound["compute" if t_compute >= t_memory else "memory"] += 1
        npu_seconds += max(t_compute, t_memory)
        ops_total += ops
        weight_total += weight_bytes
    transfers = len(plan.transfers)
    handover = (transfers * profile.memory.transfer_latency_us.value * 1e-6
                + plan.bytes_moved / (profile.memory.transfer_gb_s.value * 1e9))
    return {"npu_seconds": npu_seconds, "handover_seconds": handover, "npu_int8_ops": ops_total,
            "npu_weight_bytes": weight_total, "transfers": transfers, "bytes_moved": plan.bytes_moved,
            "partitions_compute_bound": bound["compute"], "partitions_memory_bound": bound["memory"]}


def figures_used(profile: DeviceProfile) -> dict:
    """The profile figures the estimate rests on, each with whether it is published or assumed."""
    keys = ("compute.int8_tops", "compute.efficiency", "memory.bandwidth_gb_s", "memory.transfer_gb_s",
            "memory.transfer_latency_us")
    figs = profile.figures()
    return {k: {"value": figs[k].value, "basis": figs[k].label()} for k in keys}
