"""NPU device profiles: `profiles/<name>.yaml` loaded into a strict typed model.

A profile says what the device runs (ONNX ops and the tensor types it takes for each), its size
limits, and the figures a roofline estimate needs (int8 TOPS, memory bandwidth, the cost of an
NPU<->CPU handover). Every figure is a `Figure`: a value with either the public `source` it was
taken from or the `assumption` behind it, so that an estimate can say what it rests on.
Unknown keys and wrong types are one-line errors naming their path (`limits.max_rank.value: ...`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from optc.config import Strict, first_error
from optc.errors import OptcError

DType = Literal["float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint16", "uint8", "bool"]
PROFILE_PACKAGE = "optc.profiles"
DEFAULT_PROFILE = "qualcomm_htp_v73"


class Figure(Strict):
    """A number with where it comes from: exactly one of `source` and `assumption`."""

    value: float = Field(ge=0)
    source: str | None = Field(None, min_length=1, description="public document the value is taken from")
    assumption: str | None = Field(None, min_length=1, description="why the value was chosen (nobody published it)")

    @model_validator(mode="after")
    def _one_provenance(self):
        if (self.source is None) == (self.assumption is None):
            raise ValueError("give exactly one of 'source' (a public document) and 'assumption'")
        return self

    def label(self) -> str:
        return "assumption" if self.assumption else "published"


class Limits(Strict):
    static_shapes: bool = Field(True, description="the device compiles static shapes only")
    max_rank: Figure
    vtcm_bytes: Figure
    max_tensor_bytes: Figure


class Compute(Strict):
    int8_tops: Figure
    fp16_tflops: Figure
    efficiency: Figure


class Memory(Strict):
    bandwidth_gb_s: Figure
    transfer_gb_s: Figure
    transfer_latency_us: Figure


class DeviceProfile(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    execution_provider: Literal["qnn", "openvino", "any"]
    provider_options: dict[str, str] = {}
    float_compute: bool = Field(False, description="float ops run on the NPU (in fp16); else only QDQ units do")
    ops: dict[str, list[DType]] = Field(min_length=1)
    dtypes: list[DType] = Field(min_length=1)
    limits: Limits
    compute: Compute
    memory: Memory

    @model_validator(mode="after")
    def _op_types_known(self):
        for op, types in self.ops.items():
            if not types:
                raise ValueError(f"ops.{op}: list the tensor types the device takes for it")
        return self

    def supports(self, op_type: str, dtypes) -> tuple[bool, str]:
        """Whether the device runs `op_type` on tensors of `dtypes`, and if not, why (one phrase)."""
        if op_type not in self.ops:
            return False, f"{op_type} is not an op of profile {self.name}"
        bad = sorted({d for d in dtypes if d not in self.ops[op_type]})
        if bad:
            return False, f"{op_type} on {'/'.join(bad)} is not supported by profile {self.name}"
        return True, ""

    def figures(self) -> dict[str, Figure]:
        """Every figure by its dotted path (for reports)."""
        out = {}
        for section in ("limits", "compute", "memory"):
            for key, value in getattr(self, section):
                if isinstance(value, Figure):
                    out[f"{section}.{key}"] = value
        return out


def profile_dir():
    return resources.files(PROFILE_PACKAGE)


def available_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in profile_dir().iterdir() if p.name.endswith(".yaml"))


def parse_profile(data, source: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise OptcError(f"{source}: a device profile is a mapping (name, ops, dtypes, limits, compute, memory)")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise OptcError(f"{source}: {first_error(e, '')}") from None


def load_profile(name_or_path: str | Path | None = None) -> DeviceProfile:
    """A profile by name (`qualcomm_htp_v73`, a file in profiles/) or by the path of a YAML file."""
    name_or_path = name_or_path or DEFAULT_PROFILE
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise OptcError(f"{path}: no such device profile")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        res = profile_dir() / f"{name_or_path}.yaml"
        if not res.is_file():
            raise OptcError(f"--profile {name_or_path}: unknown device profile "
                            f"(available: {', '.join(available_profiles())}, or a path to a .yaml file)")
        text, source = res.read_text(encoding="utf-8"), f"profiles/{name_or_path}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise OptcError(f"{source}{where}: invalid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
    return parse_profile(data, source)
