"""The one fact the runtime reads from an artifact's ONNX graph itself: how many rows the
embedding table that `input_ids` indexes has (the real bound on token ids, whatever the
manifest says).

The runtime imports no `onnx`, so this reads the protobuf wire format directly: ModelProto.graph
(field 7) -> GraphProto.node (1) and .initializer (5); NodeProto.input (1), .op_type (4);
TensorProto.dims (1), .name (8). Weights in external data are never read, only the graph file.
"""

from __future__ import annotations

from optc.runtime.manifest import INPUT_IDS

# ops between the table and its Gather that keep its rows (a quantised table is dequantised first)
_ROW_PRESERVING = ("Cast", "Identity", "DequantizeLinear")


class WireError(ValueError):
    """Not the protobuf this reader expects."""


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message: ints for varints, memoryviews for
    length-delimited fields; fixed-width fields are skipped."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > len(buf):
                raise WireError("truncated field")
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            continue
        else:
            raise WireError(f"wire type {wire}")
        yield number, wire, value


def _ints(wire: int, value) -> list[int]:
    """A repeated int64 field's entries, packed or not (negative values as two's complement)."""
    if wire == 0:
        raw = [value]
    else:
        raw, i = [], 0
        while i < len(value):
            v, i = _varint(value, i)
            raw.append(v)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in raw]


def embedding_rows(data: bytes) -> int | None:
    """Rows of the initializer that the Gather on `input_ids` reads (through casts or a
    dequantisation), or None where the graph has no such Gather."""
    model = memoryview(data)
    graph = next((v for n, w, v in _fields(model) if n == 7 and w == 2), None)
    if graph is None:
        return None
    producers: dict[str, tuple[str, list[str]]] = {}  # output name -> (op type, inputs)
    dims: dict[str, list[int]] = {}
    for number, wire, value in _fields(graph):
        if wire != 2:
            continue
        if number == 1:  # NodeProto
            inputs, outputs, op = [], [], ""
            for n, w, v in _fields(value):
                if w == 2 and n in (1, 2):
                    (inputs if n == 1 else outputs).append(bytes(v).decode("utf-8", "replace"))
                elif w == 2 and n == 4:
                    op = bytes(v).decode("utf-8", "replace")
            for out in outputs:
                producers[out] = (op, inputs)
        elif number == 5:  # TensorProto
            name, shape = None, []
            for n, w, v in _fields(value):
                if n == 1:
                    shape += _ints(w, v)
                elif n == 8 and w == 2:
                    name = bytes(v).decode("utf-8", "replace")
            if name is not None:
                dims[name] = shape
    for op, inputs in producers.values():
        if op == "Gather" and len(inputs) == 2 and inputs[1] == INPUT_IDS:
            table = inputs[0]
            for _ in range(len(_ROW_PRESERVING) + 1):
                if table in dims:
                    shape = dims[table]
                    return shape[0] if len(shape) == 2 and shape[0] > 0 else None
                op, src = producers.get(table, ("", []))
                if op not in _ROW_PRESERVING or not src:
                    break
                table = src[0]
    return None
