"""Positions as a graph input, where the exporter computed them inside the graph.

transformers computes `position_ids = cache_position.unsqueeze(0)` with
`cache_position = arange(past_len, past_len + seq)` when the caller passes no positions, and
optimum exports some families that way (Gemma): the graph has no `position_ids` input. The
position-rewriting passes (sink_window) need positions as an input: they number a token by its
cache slot, which the runtime feeds. This rewrite adds the input and lets the rotary tables read
it; the runtime feeds the absolute positions the graph computed before, so the identity artifact is
unchanged. The Range itself stays where it feeds anything else (the causal mask).
"""

from __future__ import annotations

from collections import deque

import onnx_ir as ir
from onnx_ir.convenience import replace_all_uses_with

from optc.canonical_patterns import const_ints
from optc.runtime.manifest import INPUT_IDS, POSITION_IDS

_PAST_PREFIX = "past_key_values."


def _depends_on_past(value: ir.Value, limit: int = 64) -> bool:
    """Whether `value` is computed from a past_key_values input (the cache length)."""
    seen, todo = set(), deque([value])
    while todo and len(seen) < limit:
        v = todo.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input() and v.name.startswith(_PAST_PREFIX):
            return True
        if (node := v.producer()) is not None:
            todo.extend(node.inputs)
    return False


def _feeds_rotary(value: ir.Value, limit: int = 64) -> bool:
    """Whether `value` reaches a Cos/Sin (the rotary tables) or a RotaryEmbedding's positions."""
    seen, todo = set(), deque([value])
    while todo and len(seen) < limit:
        v = todo.popleft()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for user, slot in v.uses():
            if user.op_type in ("Cos", "Sin") or (user.op_type == "RotaryEmbedding" and slot == 3):
                return True
            todo.extend(user.outputs)
    return False


def _computed_positions(graph: ir.Graph) -> list[ir.Value]:
    """Unsqueeze(Range(past_len, past_len + seq, 1), axes=[0]) values that feed the rotary tables."""
    found = []
    for node in graph:
        if node.op_type != "Unsqueeze" or node.domain != "":
            continue
        rng = node.inputs[0].producer() if node.inputs[0] is not None else None
        if rng is None or rng.op_type != "Range" or const_ints(rng.inputs[2]) != [1]:
            continue
        if const_ints(node.inputs[1] if len(node.inputs) > 1 else None) != [0]:
            continue
        if _depends_on_past(rng.inputs[0]) and _feeds_rotary(node.outputs[0]):
            found.append(node.outputs[0])
    return found


def expose_position_ids(model: ir.Model) -> tuple[int, str | None]:
    """Add a `position_ids` input in place of positions the graph computes from the cache length.
    Returns (1 if done else 0, why not when the graph computes positions some other way)."""
    graph = model.graph
    if any(v.name == POSITION_IDS for v in graph.inputs):
        return 0, None
    found = _computed_positions(graph)
    if len(found) != 1:
        return 0, ("no arange(past_len, past_len + seq) positions feeding the rotary tables were found" if not found
                   else f"{len(found)} separately computed position tensors feed the rotary tables")
    computed = found[0]
    input_ids = next(v for v in graph.inputs if v.name == INPUT_IDS)
    dims = list(input_ids.shape.dims) if input_ids.shape is not None and len(input_ids.shape) == 2 else \
        ["batch_size", "sequence_length"]
    positions = ir.Value(name=POSITION_IDS, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(positions)
    replace_all_uses_with(computed, positions)
    return 1, None
