"""Loading and saving ONNX models as onnx-ir Models, with the input checks users need, and the
few graph edits that passes and backends both make (constants on a tape, a value taking over
another's place).

Every failure is an OptcError naming the file: missing, truncated or not ONNX, external-data
locations that escape the model's directory or point at missing/short files.
"""

from __future__ import annotations


from pathlib import Path, PurePosixPath

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import tape

from optc.errors import OptcError


EXTERNAL_DATA_KEYS = ("location", "offset", "length", "checksum")  # the ONNX spec's keys


def _external_info(t: onnx.TensorProto, path: Path) -> dict[str, str]:
    """The external-data entries of one initializer, refusing what the spec does not define:
    unknown keys (e.g. `basepath`, which onnx's loader would honour), a key given twice (a
    later `location` could point elsewhere than the one checked), non-integer offsets."""
    info: dict[str, str] = {}
    for e in t.external_data:
        if e.key not in EXTERNAL_DATA_KEYS:
            raise OptcError(f"{path}: initializer {t.name!r}: unknown external-data key {e.key!r} "
                            f"(allowed: {', '.join(EXTERNAL_DATA_KEYS)})")
        if e.key in info:
            raise OptcError(f"{path}: initializer {t.name!r}: external-data key {e.key!r} given twice")
        info[e.key] = e.value
    for key in ("offset", "length"):
        if key in info and not info[key].isdigit():
            raise OptcError(f"{path}: initializer {t.name!r}: external-data {key} {info[key]!r} is not a "
                            f"non-negative integer")
    return info


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    base = path.parent.resolve()
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(t, path)
        loc = info.get("location", "")
        pure = PurePosixPath(loc.replace("\\", "/"))
        target = (base / loc).resolve()
        if not loc or pure.is_absolute() or ".." in pure.parts or not target.is_relative_to(base):
            raise OptcError(f"{path}: initializer {t.name!r} has external data location {loc!r} "
                            f"outside the model directory")
        if not target.is_file():
            raise OptcError(f"{path}: external data file {loc!r} for initializer {t.name!r} is missing")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise OptcError(f"{path}: external data file {loc!r} is truncated (initializer {t.name!r} "
                            f"needs {end} bytes, file has {target.stat().st_size})")


# No tensor a backend indexes has more elements along one axis than a signed 32-bit index
# reaches; a larger static dimension is a broken or hostile graph, not a model to allocate for.
MAX_DIM = 2**31 - 1


def _check_input_dims(proto: onnx.ModelProto, path: Path) -> None:
    """Static dimensions of the graph inputs: none negative, none absurd (a 10^12-token
    `input_ids` would otherwise reach shape inference, allocation or a backend's bucket plan)."""
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and not 0 <= dim.dim_value <= MAX_DIM:
                raise OptcError(f"{path}: input {value.name!r} axis {axis} has dimension {dim.dim_value:,} "
                                f"(a static dimension must be 0..{MAX_DIM:,})")


def load_model(path) -> ir.Model:
    path = Path(path)
    if not path.is_file():
        raise OptcError(f"{path}: no such ONNX file")
    if path.stat().st_size == 0:
        raise OptcError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise OptcError(f"{path}: not a valid ONNX model (truncated or corrupt: {type(e).__name__})") from None
    if not proto.graph.node:
        raise OptcError(f"{path}: not a valid ONNX model (no graph nodes; truncated or not ONNX)")
    _check_external_data(proto, path)
    _check_input_dims(proto, path)
    try:
        model = ir.load(str(path))
        # Weights move into memory: passes, the checker and the backend then never depend on the
        # source directory (edge-sized models; a multi-GB model would want lazy tensors here).
        return ir.external_data.load_to_model(model)
    except Exception as e:
        raise OptcError(f"{path}: onnx-ir cannot read the model ({str(e).splitlines()[0]})") from None


def save_model(model: ir.Model, path: Path) -> list[Path]:
    """Write `path` and its weights as `<name>.data`; returns the files written."""
    path = Path(path)
    data = path.name + ".data"
    ir.save(model, str(path), external_data=data)
    written = [path]
    if (path.parent / data).exists():
        written.append(path.parent / data)
    return written


def to_checked_proto(model: ir.Model, where: str) -> onnx.ModelProto:
    """onnx.checker (full_check: with shape inference) on an in-memory copy of `model`."""
    proto = ir.to_proto(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise OptcError(f"{where}: the graph fails onnx.checker ({str(e).splitlines()[0]})") from None
    return proto




def embedding_table(model: ir.Model, input_name: str) -> str | None:
    """The initializer that the Gather on `input_name` reads (through a cast or dequantisation,
    which keep its rows): the runtime bounds token ids by its rows."""
    value = next((v for v in model.graph.inputs if v.name == input_name), None)
    if value is None:
        return None
    for use in value.uses():
        node = use.node if hasattr(use, "node") else use[0]
        if node.op_type != "Gather" or len(node.inputs) < 2 or node.inputs[1] is not value:
            continue
        table = node.inputs[0]
        while table is not None and not table.is_initializer():
            producer = table.producer()
            if producer is None or producer.op_type not in ("Cast", "Identity", "DequantizeLinear"):
                return None
            table = producer.inputs[0]
        return None if table is None else table.name
    return None


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy (passes and backends rewrite graphs in place)."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def const(t: tape.Tape, value) -> ir.Value:
    """A Constant node on the tape holding `value` (numpy keeps its dtype)."""
    return t.op("Constant", [], {"value": ir.tensor(np.asarray(value))})


def ints(t: tape.Tape, *xs: int) -> ir.Value:
    """A Constant node on the tape holding the int64 vector `xs` (shapes, axes, slice bounds)."""
    return const(t, np.array(xs, np.int64))


def take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` takes `old`'s place: every use (a graph output too), its name, shape and type, so
    graph outputs and later rewrites see the same value name (the LM head's stays `logits`)."""
    name, shape, typ = old.name, old.shape, old.type
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = f"{name}.replaced"  # names stay unique while `old` is still in the graph
    new.name, new.shape, new.type = name, shape, typ
