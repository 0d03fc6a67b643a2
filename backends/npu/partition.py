"""Partitioning a (quantised, static-shape) graph into NPU and CPU parts with networkx.

1. **Placement.** Each node is NPU-capable if the device profile runs its op on the node's
   *effective* tensor types: a float tensor produced by DequantizeLinear counts as the DQ's
   integer type, a float tensor read only by QuantizeLinear as the Q's type. So a MatMul inside a
   whole QDQ unit (`DQ -> MatMul -> Q`) is a uint8/int8 op, and a float MatMul (outlier_split's
   outlier branch) or any op the profile lacks is a CPU op. Compute ops that are capable must go
   to the NPU; so must the DQ/Q nodes that make their QDQ units whole. The remaining Q/DQ nodes
   at the edge of a unit may go either way.
2. **Fewest bytes moved.** Where those free nodes go is a minimum s-t cut (networkx) over the
   dataflow graph: every tensor is a node joined to its producer and consumers by edges weighing
   its size in bytes, graph inputs and outputs are joined to the CPU (host) side. A cut is the
   set of tensors handed between NPU and CPU, each counted once: e.g. an activation's
   QuantizeLinear goes to the CPU because then the NPU is handed uint8, a quarter of the float.
3. **Contiguous, acyclic partitions.** Nodes are layered by how many device changes lie on the
   longest path to them; each (layer, device) group splits into weakly connected components.
   Every dataflow edge then goes to the same or a later layer, so the partition graph has no
   cycle. Neighbouring partitions of one device are merged while the partition graph stays
   acyclic (a merge that would route a path out through another partition and back in is
   refused).

The plan lists each partition's nodes, the tensors crossing between partitions and their bytes.
Constant nodes belong to no partition: each partition that reads one gets its own copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import onnx_ir as ir

from optc.backends.npu.profile import DeviceProfile
from optc.runtime.manifest import FLOAT_BRANCH_KEY

NPU, CPU = "npu", "cpu"
HOST = "host"  # graph inputs come from, and outputs go to, host (CPU) memory
QDQ = {"QuantizeLinear", "DequantizeLinear"}

_DTYPES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
           ir.DataType.INT64: "int64", ir.DataType.INT32: "int32", ir.DataType.INT16: "int16",
           ir.DataType.INT8: "int8", ir.DataType.UINT16: "uint16", ir.DataType.UINT8: "uint8",
           ir.DataType.BOOL: "bool"}


def dtype_name(dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).lower() if dtype is not None else "unknown")


def tensor_bytes(value: ir.Value) -> int | None:
    """Bytes of a tensor with a static shape and known type; None otherwise."""
    if value.dtype is None or value.shape is None:
        return None
    dims = list(value.shape)
    if not all(isinstance(d, int) for d in dims):
        return None
    return int(math.prod(dims) * value.dtype.itemsize)


@dataclass
class Crossing:
    tensor: str
    source: int | str  # partition index or HOST
    target: int | str
    bytes: int | None
    dtype: str

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "from": self.source, "to": self.target, "bytes": self.bytes,
                "dtype": self.dtype}


@dataclass
class Partition:
    index: int
    device: str
    nodes: list[str]
    inputs: list[str] = field(default_factory=list)   # tensors it reads from elsewhere (host or a partition)
    outputs: list[str] = field(default_factory=list)  # tensors it hands to others (or the graph's outputs)

    def to_dict(self) -> dict:
        return {"index": self.index, "device": self.device, "nodes": self.nodes, "inputs": self.inputs,
                "outputs": self.outputs}


@dataclass
class PartitionPlan:
    profile: str
    partitions: list[Partition]
    crossings: list[Crossing]
    cpu_reasons: dict[str, str]        # node -> why it is not on the NPU
    unknown_sizes: list[str]           # crossing tensors whose size is not static

    @property
    def transfers(self) -> list[Crossing]:
        """Crossings into or out of an NPU partition (the NPU<->host handovers)."""
        dev = {p.index: p.device for p in self.partitions}
        return [c for c in self.crossings if NPU in (dev.get(c.source), dev.get(c.target))]

    @property
    def bytes_moved(self) -> int:
        return sum(c.bytes or 0 for c in self.transfers)

    def device_of(self) -> dict[str, str]:
        return {n: p.device for p in self.partitions for n in p.nodes}

    def to_dict(self) -> dict:
        return {"profile": self.profile, "partitions": [p.to_dict() for p in self.partitions],
                "crossings": [c.to_dict() for c in self.crossings],
                "transfers": len(self.transfers), "bytes_moved": self.bytes_moved}


# -- placement -----------------------------------------------------------------------------------

def _is_constant_node(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.inputs


def _effective_dtype(value: ir.Value) -> str:
    """The type a tensor really holds: DQ outputs are their quantised input, float tensors read
    only by Q are the Q's output type."""
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0] is not None:
        return dtype_name(producer.inputs[0].dtype)
    uses = [u.node for u in value.uses()]
    if uses and all(u.op_type == "QuantizeLinear" and u.inputs[0] is value for u in uses) and not value.is_graph_output():
        return dtype_name(uses[0].outputs[0].dtype)
    return dtype_name(value.dtype)


def _data_values(node: ir.Node):
    """A node's tensors that carry data: not initializers or constants (a Q/DQ's scale and zero
    point, a MatMul's weight), nor empty optional inputs."""
    for v in list(node.inputs) + list(node.outputs):
        if v is None or v.const_value is not None or v.is_initializer():
            continue
        p = v.producer()
        if p is not None and _is_constant_node(p):
            continue
        yield v


def capability(node: ir.Node, profile: DeviceProfile, float_ok: bool) -> tuple[bool, str]:
    """Whether the profile's device can run `node` (and why not)."""
    if node.domain not in ("", "ai.onnx"):
        return False, f"{node.domain}::{node.op_type} is a custom op"
    if FLOAT_BRANCH_KEY in node.metadata_props:
        return False, "outlier branch (float, by design on the CPU)"
    values = list(_data_values(node))
    dtypes = []
    for v in values:
        d = _effective_dtype(v)
        if d == "float32" and float_ok and node.op_type not in QDQ:
            d = "float16"  # (float_compute: the device runs float ops in fp16)
        dtypes.append(d)
    ok, why = profile.supports(node.op_type, dtypes)
    if not ok:
        return ok, why
    max_rank = int(profile.limits.max_rank.value)
    for v in values:
        if v.shape is None:
            if profile.limits.static_shapes:
                return False, f"{v.name} has no known shape"
            continue
        if len(v.shape) > max_rank:
            return False, f"{v.name} has rank {len(v.shape)} > {max_rank}"
        if profile.limits.static_shapes and not all(isinstance(d, int) for d in v.shape):
            return False, f"{v.name} has a dynamic shape {list(v.shape)}"
        size = tensor_bytes(v)
        if size is not None and size > profile.limits.max_tensor_bytes.value:
            return False, f"{v.name} is {size:,} bytes (> the device's {int(profile.limits.max_tensor_bytes.value):,})"
    return True, ""


def place(graph: ir.Graph, profile: DeviceProfile) -> tuple[dict[ir.Node, str | None], dict[str, str]]:
    """Node -> NPU / CPU (forced) or None (free: an edge Q/DQ), and the CPU nodes' reasons."""
    capable, reasons = {}, {}
    for node in graph:
        if _is_constant_node(node):
            continue
        ok, why = capability(node, profile, profile.float_compute)
        capable[node] = ok
        if not ok:
            reasons[node.name] = why
    placement: dict[ir.Node, str | None] = {}
    for node, ok in capable.items():
        if not ok:
            placement[node] = CPU
        elif node.op_type not in QDQ:
            placement[node] = NPU
    for node, ok in capable.items():  # Q/DQ: forced onto the NPU where they complete a unit there
        if not ok or node in placement:
            continue
        if node.op_type == "DequantizeLinear":
            consumers = [u.node for u in node.outputs[0].uses()]
            forced = any(placement.get(c) == NPU and c.op_type not in QDQ for c in consumers)
        else:
            producer = node.inputs[0].producer()
            forced = producer is not None and placement.get(producer) == NPU and producer.op_type not in QDQ
        placement[node] = NPU if forced else None
    return placement, reasons


# -- the cut -------------------------------------------------------------------------------------

def _tensors(graph: ir.Graph, nodes: set[ir.Node]):
    """(value, producer or HOST, [consumers or HOST]) for every data tensor between nodes."""
    for v in list(graph.inputs) + [o for n in graph for o in n.outputs]:
        if v is None or v.const_value is not None or v.is_initializer():
            continue
        p = v.producer()
        if p is not None and p not in nodes:
            continue  # a constant node's output: copied into each reader
        consumers = sorted({u.node for u in v.uses() if u.node in nodes}, key=lambda n: n.name)
        targets = consumers + ([HOST] if v.is_graph_output() else [])
        if targets:
            yield v, (p if p is not None else HOST), targets


def _min_cut(graph: ir.Graph, placement: dict) -> dict[ir.Node, str]:
    """Free nodes placed so that the bytes handed between NPU and CPU are fewest."""
    if all(d is not None for d in placement.values()):
        return dict(placement)
    g = nx.DiGraph()
    src, sink = ("side", NPU), ("side", CPU)
    g.add_nodes_from([src, sink])
    for node, dev in placement.items():
        g.add_node(node)
        if dev == NPU:
            g.add_edge(src, node)  # no capacity attribute: infinite (networkx)
        elif dev == CPU:
            g.add_edge(node, sink)
    for v, producer, targets in _tensors(graph, set(placement)):
        size = tensor_bytes(v)
        weight = size if size is not None else 1
        t = ("tensor", v.name)
        for end in [producer, *targets]:
            end = sink if end == HOST else end
            for a, b in ((end, t), (t, end)):
                g.add_edge(a, b, capacity=g.edges[a, b]["capacity"] + weight if g.has_edge(a, b) else weight)
    _, (npu_side, _) = nx.minimum_cut(g, src, sink)
    return {n: (NPU if n in npu_side else CPU) for n in placement}


# -- contiguous acyclic partitions ---------------------------------------------------------------

def _dataflow(graph: ir.Graph, nodes: set[ir.Node]) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    for n in nodes:
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if p is not None and p in nodes:
                g.add_edge(p, n)
    return g


def _quotient(flow: nx.DiGraph, part_of: dict) -> nx.DiGraph:
    q = nx.DiGraph()
    q.add_nodes_from(set(part_of.values()))
    for a, b in flow.edges:
        if part_of[a] != part_of[b]:
            q.add_edge(part_of[a], part_of[b])
    return q


def _group(flow: nx.DiGraph, device: dict) -> dict:
    """Node -> group id: (layer, device) groups split into connected components, then merged."""
    order = list(nx.topological_sort(flow))
    layer = {}
    for n in order:
        layer[n] = max((layer[p] + (device[p] != device[n]) for p in flow.predecessors(n)), default=0)
    part_of, next_id = {}, 0
    for key in sorted({(layer[n], device[n]) for n in flow}):
        members = [n for n in flow if (layer[n], device[n]) == key]
        for comp in nx.weakly_connected_components(flow.subgraph(members)):
            for n in comp:
                part_of[n] = next_id
            next_id += 1
    dev_of = {part_of[n]: device[n] for n in flow}
    changed = True
    while changed:  # merge same-device neighbours while the partition graph stays acyclic
        changed = False
        q = _quotient(flow, part_of)
        for a, b in sorted(q.edges):
            if dev_of[a] != dev_of[b]:
                continue
            q.remove_edge(a, b)
            if nx.has_path(q, a, b):  # another route a -> ... -> b: merging would make a cycle
                q.add_edge(a, b)
                continue
            for n, p in part_of.items():
                if p == b:
                    part_of[n] = a
            changed = True
            break
    return part_of


def _refine(flow: nx.DiGraph, part_of: dict, device: dict, cost) -> dict:
    """Move single nodes to a neighbouring partition of their device while that lowers `cost`
    (bytes handed to or from the NPU) and keeps partitions connected and the partition graph
    acyclic: e.g. a DequantizeLinear joins the unit that reads it, so the uint8 tensor crosses
    rather than the float one."""
    part_of = dict(part_of)
    best = cost(part_of)
    improved = True
    while improved:
        improved = False
        for n in sorted(flow, key=lambda x: x.name):
            here = part_of[n]
            for other in sorted({part_of[m] for m in nx.all_neighbors(flow, n)} - {here}):
                if device[next(m for m in part_of if part_of[m] == other)] != device[n]:
                    continue
                trial = {**part_of, n: other}
                rest = [m for m in part_of if part_of[m] == here and m is not n]
                if rest and not nx.is_weakly_connected(flow.subgraph(rest)):
                    continue
                if not nx.is_directed_acyclic_graph(_quotient(flow, trial)):
                    continue
                c = cost(trial)
                if c < best:
                    part_of, best, improved = trial, c, True
                    break
    return part_of


def partition(model: ir.Model, profile: DeviceProfile) -> PartitionPlan:
    graph = model.graph
    placement, reasons = place(graph, profile)
    device = _min_cut(graph, placement)
    for node, dev in device.items():
        if dev == CPU and node.name not in reasons:
            reasons[node.name] = "fewer bytes moved on the CPU side (edge Q/DQ)"
    flow = _dataflow(graph, set(device))
    tensors = [(v, tensor_bytes(v) or 0, p, ts) for v, p, ts in _tensors(graph, set(device))]

    def moved(part_of: dict) -> int:  # bytes handed to or from an NPU partition
        total = 0
        for _, size, producer, targets in tensors:
            src = HOST if producer == HOST else part_of[producer]
            for dst in {HOST if t == HOST else part_of[t] for t in targets} - {src}:
                if NPU in (device.get(producer), *(device.get(t) for t in targets if t != HOST and part_of[t] == dst)):
                    total += size
        return total

    part_of = _refine(flow, _group(flow, device), device, moved)
    q = _quotient(flow, part_of)
    if not nx.is_directed_acyclic_graph(q):  # the construction rules this out
        raise AssertionError("npu partitioning produced a cycle between partitions")
    # number partitions in a topological order (ties by their first node's position in the graph)
    position = {n: i for i, n in enumerate(graph)}
    first = {}
    for n, p in part_of.items():
        first[p] = min(first.get(p, len(position)), position[n])
    order = list(nx.lexicographical_topological_sort(q, key=lambda p: first[p]))
    index = {p: i for i, p in enumerate(order)}
    members: dict[int, list[ir.Node]] = {i: [] for i in index.values()}
    for n in graph:
        if n in part_of:
            members[index[part_of[n]]].append(n)
    parts = [Partition(i, device[members[i][0]], [n.name for n in members[i]]) for i in sorted(members)]
    node_part = {n: index[part_of[n]] for n in part_of}

    crossings, unknown = [], []
    for v, producer, targets in _tensors(graph, set(device)):
        src = HOST if producer == HOST else node_part[producer]
        dsts = sorted({HOST if t == HOST else node_part[t] for t in targets}, key=str)
        for dst in dsts:
            if dst == src:
                continue
            size = tensor_bytes(v)
            crossings.append(Crossing(v.name, src, dst, size, dtype_name(v.dtype)))
            if size is None:
                unknown.append(v.name)
            if isinstance(src, int) and v.name not in parts[src].outputs:
                parts[src].outputs.append(v.name)
            if isinstance(dst, int) and v.name not in parts[dst].inputs:
                parts[dst].inputs.append(v.name)
    return PartitionPlan(profile.name, parts, crossings, reasons, sorted(set(unknown)))
