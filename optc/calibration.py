"""Calibration: run a graph on shipped text and record statistics of its activations.

A pass that needs activation statistics (outlier_split: per-input-channel absmax of each
quantised MatMul's input) asks for them here. The graph is serialised as it stands (after the
passes before it), the values of interest are made graph outputs, and ONNX Runtime runs it on
token windows of the calibration text (CPU, one window at a time, a progress bar on stderr).

Feeds are built from the graph's own inputs, so decoders (input_ids, attention_mask,
position_ids, an empty cache per layer) and encoders (input_ids, attention_mask, token_type_ids)
both calibrate; an input this module does not know is an error naming it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from optc.config import Strict, no_float
from optc.data import DATA_DIR, read_texts
from optc.errors import OptcError
from optc.runtime.manifest import ATTENTION_MASK, INPUT_IDS, POSITION_IDS

DEFAULT_CALIBRATION_TEXT = DATA_DIR / "calibration.jsonl"
TOKEN_TYPE_IDS = "token_type_ids"
PAST_PREFIX = "past_key_values."
SAMPLE_ROWS = 512  # activation rows kept per value (spread over all windows) for error estimates


class CalibrationOptions(Strict):
    """The `calibration:` option of the passes that calibrate (outlier_split, weight_quant awq)."""

    text: str | None = Field(None, description="calibration text (.jsonl with 'text', or .txt one sample per "
                                               "line); default models/data/calibration.jsonl")
    samples: int = Field(16, ge=1, le=4096, description="documents (windows) to run")
    samples_is_an_integer = field_validator("samples", mode="before")(no_float)
    length: int = Field(256, ge=2, le=65536, description="tokens per window at most")
    length_is_an_integer = field_validator("length", mode="before")(no_float)


def read_calibration_texts(path: Path | None) -> list[str]:
    """Documents from a .jsonl ({"text": ...} per line) or a .txt file (one document per non-empty
    line: short sentences for an encoder)."""
    path = Path(path) if path else DEFAULT_CALIBRATION_TEXT
    if path.suffix == ".txt":
        if not path.is_file():
            raise OptcError(f"{path}: calibration text not found")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = read_texts(path)
    if not texts:
        raise OptcError(f"{path}: no calibration text in it")
    return texts


def token_windows(tokenizer_path: Path, texts: list[str], *, samples: int, length: int,
                  bos: int | None = None) -> list[np.ndarray]:
    """Up to `samples` windows: the first `length` tokens of each document (shorter documents
    whole), in file order."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    out = []
    for enc in tok.encode_batch(texts[:samples]):
        ids = ([bos] if bos is not None else []) + list(enc.ids)
        if len(ids) >= 2:
            out.append(np.asarray(ids[:length], np.int64))
    if not out:
        raise OptcError("calibration: no document gives two or more tokens")
    return out


def calibration_windows(who: str, tokenizer, text: str | None, *, samples: int, length: int, bos: int | None,
                        text_key: str = "calibration.text") -> list[np.ndarray]:
    """The token windows a calibrating pass runs on: its calibration text (default
    models/data/calibration.jsonl), up to `samples` windows of up to `length` tokens. One-line
    errors: no tokenizer (naming the pass, `who`), a calibration text that is no file (as the
    pass option `text_key`)."""
    from optc.passes.base import PassConfigError  # (here, not at the top: the passes import this module)

    if tokenizer is None:
        raise OptcError(f"{who}: calibration needs a tokenizer (tokenizer.json beside the model, or --tokenizer)")
    if text is not None and not Path(text).is_file():
        raise PassConfigError(text_key, f"{text}: no such file")
    texts = read_calibration_texts(Path(text) if text else None)
    return token_windows(Path(tokenizer), texts, samples=samples, length=length, bos=bos)


def feeds_for(graph_inputs: list[ir.Value], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one window with nothing cached, from the graph's declared inputs."""
    n = len(ids)
    feeds: dict[str, np.ndarray] = {}
    for v in graph_inputs:
        name = v.name
        if name == INPUT_IDS:
            feeds[name] = ids.reshape(1, n)
        elif name == ATTENTION_MASK:
            feeds[name] = np.ones((1, n), np.int64)
        elif name == POSITION_IDS:
            feeds[name] = np.arange(n, dtype=np.int64).reshape(1, n)
        elif name == TOKEN_TYPE_IDS:
            feeds[name] = np.zeros((1, n), np.int64)
        elif name.startswith(PAST_PREFIX) and v.shape is not None and len(v.shape) == 4:
            dims = [d if isinstance(d, int) else 0 for d in v.shape]
            dims[0], dims[2] = 1, 0
            dtype = v.dtype.numpy() if v.dtype is not None else np.float32
            feeds[name] = np.zeros(dims, dtype)
        else:
            raise OptcError(f"calibration: cannot feed graph input {name!r} (known: {INPUT_IDS}, {ATTENTION_MASK}, "
                            f"{POSITION_IDS}, {TOKEN_TYPE_IDS}, {PAST_PREFIX}*); run this pass before passes "
                            f"that add inputs")
    return feeds


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one activation value [..., K] over the calibration run."""

    absmax: np.ndarray      # [K] float32: max |x| per channel
    rows: np.ndarray        # [r, K] float32: a sample of rows (tokens) for error estimates
    tokens: int             # rows seen in all
    absmean: np.ndarray | None = None  # [K] float32: mean |x| per channel over every row seen


def channel_stats(model: ir.Model, names: list[str], windows: list[np.ndarray], *, progress: bool = True,
                  label: str = "calibrating", sample: set[str] | None = None,
                  sample_rows: int = SAMPLE_ROWS, channel_axes: tuple[int, ...] = (-1,)) -> dict[str, ChannelStats]:
    """Run `model` on each window and return, per value name, its per-channel absmax and mean |x|,
    and, for the names in `sample` (default: all), a sample of its rows (every k-th row, k chosen
    so that about `sample_rows` are kept; other names get an empty sample). A channel is an index
    over `channel_axes` (default the last axis; e.g. (1, 3), head and head dim, for a cache tensor
    [B, heads, S, D]), flattened in their order."""
    import onnx
    import onnxruntime as ort
    from tqdm import tqdm

    proto = ir.serde.serialize_model(model)
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no graph rewrites: the values asked for must exist as named, not be fused away
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(proto.SerializeToString(), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise OptcError(f"calibration: ONNX Runtime cannot load the graph ({str(e).splitlines()[0][:200]})") from None
    total = sum(len(w) for w in windows)
    stride = max(1, total // sample_rows)
    absmax: dict[str, np.ndarray] = {}
    abssum: dict[str, np.ndarray] = {}
    sample = set(names) if sample is None else sample
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    seen = 0
    bar = tqdm(windows, desc=label, unit="window", file=sys.stderr, disable=not progress, leave=False)
    for ids in bar:
        outs = session.run(names, feeds_for(model.graph.inputs, ids))
        for name, x in zip(names, outs):
            x = np.asarray(x, np.float32)
            last = tuple(range(x.ndim - len(channel_axes), x.ndim))
            x = np.moveaxis(x, channel_axes, last)
            x = x.reshape(-1, int(np.prod(x.shape[x.ndim - len(channel_axes):])))
            ax = np.abs(x)
            m = ax.max(axis=0)
            absmax[name] = m if name not in absmax else np.maximum(absmax[name], m)
            t = ax.sum(axis=0, dtype=np.float64)
            abssum[name] = t if name not in abssum else abssum[name] + t
            if name in sample:
                rows[name].append(x[np.arange((-seen) % stride, len(x), stride)])
        seen += len(ids)
    bar.close()
    return {n: ChannelStats(absmax[n], np.concatenate(rows[n]) if rows[n] else np.zeros((0, len(absmax[n])),
                                                                                         np.float32), seen,
                            (abssum[n] / max(seen, 1)).astype(np.float32))
            for n in names}
