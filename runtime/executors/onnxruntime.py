"""Runs an artifact's ONNX graph with ONNX Runtime: one forward step over new tokens + the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optc.errors import InvalidValue
from optc.runtime.artifact import ArtifactError, artifact_file, shown_key
from optc.runtime.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, OnnxRuntimeBackend
from optc.runtime.onnx_graph import WireError, embedding_rows


OPTIMIZATION_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_LAYOUT",
                       "ORT_ENABLE_ALL")


def _session_options(so, root: Path) -> dict:
    """The manifest's session options, type-checked (a hand-edited value is an ArtifactError)."""
    where = f"{root / 'manifest.json'}: backend.session_options"
    if not isinstance(so, dict):
        raise ArtifactError(f"{where}: expected an object")
    out = {"graph_optimization_level": so.get("graph_optimization_level", "ORT_ENABLE_ALL"),
           "intra_op_num_threads": so.get("intra_op_num_threads", 0),
           "inter_op_num_threads": so.get("inter_op_num_threads", 1)}
    extra = sorted(shown_key(k) for k in set(so) - set(out))
    if extra:
        raise ArtifactError(f"{where}.{extra[0]}: unknown key")
    if out["graph_optimization_level"] not in OPTIMIZATION_LEVELS:
        raise ArtifactError(f"{where}.graph_optimization_level: one of {', '.join(OPTIMIZATION_LEVELS)}")
    for k in ("intra_op_num_threads", "inter_op_num_threads"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1024:
            raise ArtifactError(f"{where}.{k}: an integer thread count 0..1024, got {v!r}")
    return out


def open_session(root: Path, manifest: dict, backend: OnnxRuntimeBackend):
    """(ONNX Runtime session, graph path) of an artifact's graph: the file the manifest lists (hence
    hash-checked, inside the artifact), its session options type-checked, its providers the first
    of those requested that this machine has. Decoder and encoder executors share it."""
    import onnxruntime as ort

    graph = artifact_file(root, manifest, backend.graph)
    opts = ort.SessionOptions()
    so = _session_options(backend.session_options, root)
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, so["graph_optimization_level"])
    opts.intra_op_num_threads = so["intra_op_num_threads"]
    opts.inter_op_num_threads = so["inter_op_num_threads"]
    opts.log_severity_level = 3
    requested = backend.providers
    available = set(ort.get_available_providers())
    providers = [p for p in requested if p in available]
    if not providers:
        raise ArtifactError(f"{graph}: none of the execution providers {requested} is available here "
                            f"(available: {sorted(available)})")
    try:
        session = ort.InferenceSession(str(graph), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise ArtifactError(f"{graph}: ONNX Runtime cannot load the graph ({str(e).splitlines()[0]})") from None
    return session, graph


class OnnxRuntimeExecutor:
    def __init__(self, root: Path, manifest: dict, backend: OnnxRuntimeBackend):
        self.session, graph = open_session(root, manifest, backend)
        self.providers = self.session.get_providers()
        self.kv_outputs = backend.kv_outputs  # per layer: [new key output, new value output]
        self._attention = backend.attention_outputs
        self._outputs = [LOGITS] + [name for pair in self.kv_outputs for name in pair] + self._attention
        self._extra: list[str] = []  # fetch(): outputs read by a runtime feature, in self.extra after a step
        self.extra: dict[str, np.ndarray] = {}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [name for name in self._outputs if name not in graph_outputs]
        if missing:
            raise ArtifactError(f"{root / 'manifest.json'}: backend: output {missing[0]!r} is not an output of "
                                f"{graph.name}")
        # the graph's static input shapes (None where symbolic): the model checks its cache against them
        self.input_shapes = {i.name: [d if isinstance(d, int) else None for d in i.shape]
                             for i in self.session.get_inputs()}
        self.input_names = set(self.input_shapes)
        try:  # the real bound on token ids: the rows of the table the graph gathers them from
            self.embedding_rows = embedding_rows(graph.read_bytes())
        except WireError as e:
            raise ArtifactError(f"{graph}: cannot read the embedding table's shape ({e})") from None

        # logits for the step's last N rows only (a prefill asks for its last token's)
        self.logit_rows_input = backend.logit_rows_input
        if self.logit_rows_input is not None and self.logit_rows_input not in self.input_names:
            raise ArtifactError(f"{root / 'manifest.json'}: backend.logit_rows_input: {self.logit_rows_input!r} is "
                                f"not an input of {graph.name}")
        self._logit_rows = np.ones(1, np.int64)  # (fused path: bound once, written per step)
        # the fused path: the graph writes the cache in place (backends/onnxruntime_fused.py)
        self.kv_in_place = backend.kv_in_place
        if self.kv_in_place is not None:
            p = self.kv_in_place
            optional = [name for name in (p.attention_bias_input, p.pruned_past_input, p.pruned_attention_bias_input)
                        if name]
            for name in (p.seqlens_input, p.total_input, *optional, *[n for pair in p.cache_inputs for n in pair]):
                if name not in self.input_names:
                    raise ArtifactError(f"{root / 'manifest.json'}: backend.kv_in_place: {name!r} is not an input "
                                        f"of {graph.name}")
            # each cache input's buffer is also the output the op writes (ORT shares them)
            self._present_of = {past: present for pair_in, pair_out in zip(p.cache_inputs, self.kv_outputs)
                                for past, present in zip(pair_in, pair_out)}
            self._io = self.session.io_binding()
            self._bound: dict[str, np.ndarray] = {}
            self._bound_buffers: dict[str, np.ndarray] | None = None  # the cache's buffer map last bound
            self._lengths = (np.zeros(1, np.int32), np.zeros((), np.int32))  # seqlens_k, total length
            self._pruned_past = np.zeros(1, np.int64)  # token_dropping: the pruned layers' cache length
            self._output_order: list[str] = []  # outputs in the order first bound (IOBinding.get_outputs's)
            self._needs_positions = POSITION_IDS in self.input_names
            self._needs_mask = ATTENTION_MASK in self.input_names
            # logits are written into an array of ours: their width is the graph's static vocab
            # dim, or the embedding table's rows (the same for every supported decoder)
            dims = next(o.shape for o in self.session.get_outputs() if o.name == LOGITS)
            self._vocab = dims[-1] if dims and isinstance(dims[-1], int) else self.embedding_rows
            if not self._vocab:
                raise ArtifactError(f"{graph}: cannot tell the logits' width for the fused path")
            # a decode step's token id and logits: the same two arrays every step
            self._decode_arrays = (np.zeros((1, 1), np.int64), np.zeros((1, 1, self._vocab), np.float32))

    @property
    def provider(self) -> str:
        return self.providers[0]

    def fetch(self, names: list[str]) -> None:
        """Also fetch these graph outputs at every step; `self.extra` holds them after it. (On the
        fused path they are arrays of their static shapes, bound once and written in place.)"""
        have = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in names if n not in have]
        if missing:
            raise ArtifactError(f"the graph has no output {missing[0]!r}")
        self._extra = list(names)
        if self.kv_in_place is not None:
            for name in names:
                shape = have[name].shape
                if not all(isinstance(d, int) for d in shape):
                    raise ArtifactError(f"the fused path binds {name!r} once, but its shape {shape} is not static")
                self.extra[name] = np.zeros(shape, np.float32)
                self._bind_array(name, self.extra[name], output=True)

    def bind_input(self, name: str, arr: np.ndarray) -> None:
        """Fused path: bind a graph input to `arr` for every later step; the graph reads whatever
        the array holds when a step runs (layer_routing's per-layer flags)."""
        if name not in self.input_names:
            raise ArtifactError(f"the graph has no input {name!r}")
        self._bind_array(name, arr)

    def step_limit(self, cache_feeds, n=None) -> None:
        """ONNX Runtime takes any number of new tokens in one step."""
        return None

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
            cache_feeds: dict[str, np.ndarray], logit_rows: int | None = None):
        """One forward step. `cache_feeds` are the KV cache's graph inputs (KVCache.feeds());
        `logit_rows`: logits for the step's last rows only (None: every row's)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.logit_rows_input is not None:
            feeds[self.logit_rows_input] = np.array([logit_rows or input_ids.shape[1]], np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = position_ids
        for name, arr in cache_feeds.items():
            # ORT needs dense inputs; cache views are dense only when kv_heads == 1 or the buffer is full.
            feeds[name] = np.ascontiguousarray(arr)
        out = self.session.run(self._outputs + self._extra, feeds)
        if self._extra:  # outputs a runtime feature reads after the step (layer_routing's change)
            self.extra = dict(zip(self._extra, out[len(self._outputs):]))
            out = out[:len(self._outputs)]
        n_kv = 2 * len(self.kv_outputs)
        logits, kv, attention = out[0], out[1:1 + n_kv], out[1 + n_kv:]
        return logits, kv[0::2], kv[1::2], attention or None

    def _bind_array(self, name: str, arr: np.ndarray, output: bool = False) -> None:
        """Bind `name` to `arr`'s memory unless it is bound to that very array already. The array
        is kept referenced while bound, so its memory cannot be reused under the binding."""
        if self._bound.get(name) is not arr:
            bind = self._io.bind_output if output else self._io.bind_input
            bind(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            self._bound[name] = arr
            if output and name not in self._output_order:
                self._output_order.append(name)

    def _bind_step(self, buffers: dict[str, np.ndarray], cached: int, n: int, bias=(None, None),
                   pruned_cached: int | None = None, rows: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Everything a step of `n` new tokens reads and writes, bound; returns the bound token ids
        and logits arrays. Rebinding happens only where something changed: the cache's buffer map
        when a buffer grew (KVCache.buffers returns the same dict until then), the ids and logits
        when the step size changes (decode steps share one pair). The lengths are two arrays bound
        once and written in place."""
        p = self.kv_in_place
        if cached + n > p.max_positions:
            raise InvalidValue(f"position {cached + n - 1} is past this artifact's rotary tables ({p.max_positions} "
                               f"positions, 4x the trained context): recompile with sink_window to stream "
                               f"longer sequences")
        if buffers is not self._bound_buffers:
            for name, buf in buffers.items():
                self._bind_array(name, buf)
                self._bind_array(self._present_of[name], buf, output=True)
            self._bind_array(p.seqlens_input, self._lengths[0])
            self._bind_array(p.total_input, self._lengths[1])
            if p.pruned_past_input:
                self._bind_array(p.pruned_past_input, self._pruned_past)
            if self.logit_rows_input is not None:
                self._bind_array(self.logit_rows_input, self._logit_rows)
            self._bound_buffers = buffers
        rows = n if rows is None or self.logit_rows_input is None else rows
        self._logit_rows[0] = rows
        self._lengths[0][0] = cached + n - 1
        self._lengths[1][()] = cached + n
        if p.pruned_past_input:
            self._pruned_past[0] = pruned_cached
        if n == 1:
            ids, logits = self._decode_arrays
        elif p.pruned_past_input:
            # token_dropping: a prompt's logits are the kept tokens', a count the graph chooses:
            # ONNX Runtime allocates them (run_in_place reads them back)
            ids, logits = np.empty((1, n), np.int64), None
            self._bind_array(INPUT_IDS, ids)
            self._io.bind_output(LOGITS, "cpu")
            self._bound[LOGITS] = None
            if LOGITS not in self._output_order:
                self._output_order.append(LOGITS)
        else:  # a prefill chunk: arrays of its size, bound for this step only
            ids, logits = np.empty((1, n), np.int64), np.empty((1, rows, self._vocab), np.float32)
        if logits is not None and self._bound.get(LOGITS) is not logits:
            self._bind_array(INPUT_IDS, ids)
            self._bind_array(LOGITS, logits, output=True)
        if self._needs_mask:  # (the lowering drops it where nothing reads it)
            self._io.bind_cpu_input(ATTENTION_MASK, np.ones((1, cached + n), np.int64))
        # sink_window: the bias (and the pruned layers' bias row, with token_dropping): their shape
        # follows the cache, so they are bound every step
        for name, arr in zip((p.attention_bias_input, p.pruned_attention_bias_input), bias):
            if arr is not None:
                self._io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
                self._bound[name] = arr
        return ids, logits

    def run_in_place(self, input_ids: np.ndarray, position_ids: np.ndarray, buffers: dict[str, np.ndarray],
                     cached: int, bias=(None, None), pruned_cached: int | None = None,
                     logit_rows: int | None = None) -> np.ndarray:
        """One forward step on the fused path: `buffers` are the cache's whole per-layer arrays
        (KVCache.buffers), the first `cached` entries filled; the graph writes this step's keys and
        values after them, in place. Returns the logits [1, n, vocab] (the caller's to keep); the
        caller advances the cache. `bias`: the sink_window artifact's attention bias and, with
        token_dropping, the pruned layers' bias row (runtime/cache/window.py; (None, None)
        without). `pruned_cached`: a token_dropping artifact's cache length in the pruned layers
        (the logits then have a row per kept token: the caller advances those layers by that
        many). `logit_rows`: logits for the step's last rows only (None: every row's)."""
        n = input_ids.shape[1]
        ids, logits = self._bind_step(buffers, cached, n, bias, pruned_cached, logit_rows)
        ids[...] = input_ids
        if self._needs_positions:
            self._io.bind_cpu_input(POSITION_IDS, position_ids)
        self.session.run_with_iobinding(self._io)
        if logits is None:
            return self._io.get_outputs()[self._output_order.index(LOGITS)].numpy()
        return logits.copy() if logits is self._decode_arrays[1] else logits

    def decode_in_place(self, token: int, buffers: dict[str, np.ndarray], cached: int, copy: bool = True,
                        bias=(None, None), pruned_cached: int | None = None) -> np.ndarray:
        """One decode step of `token` on the fused path (see run_in_place): writes the token id
        and the two lengths into arrays bound once, runs, and returns the logits [vocab]. With
        copy=False they are the bound array itself, which the next step overwrites (for a caller
        that samples from them at once: the generate loop)."""
        ids, logits = self._bind_step(buffers, cached, 1, bias, pruned_cached)
        ids[0, 0] = token
        if self._needs_positions:
            self._io.bind_cpu_input(POSITION_IDS, np.array([[cached]], np.int64))
        self.session.run_with_iobinding(self._io)
        return logits[0, 0].copy() if copy else logits[0, 0]
