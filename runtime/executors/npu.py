"""Runs an NPU artifact (backends/npu/): static-shape step graphs split into NPU and CPU partitions.

Each step runs the prefill graph (a chunk of `chunk` tokens, the last chunk padded) or the decode
graph (one token) over the cache padded to `max_cache` slots; `attention_mask` marks the real
cache slots and tokens, and the padded outputs are dropped. The partitions of a graph run in
order, each in its own ONNX Runtime session, handing tensors on by name.

NPU partitions run on the first NPU execution provider present, in this order: QNN (Qualcomm
HTP, through the onnxruntime-qnn plugin; on x86 its HTP backend is Qualcomm's simulator), then
OpenVINO's NPU device (only where OpenVINO sees one: its execution provider also serves CPUs and
GPUs, so an OpenVINO without an NPU device is not an NPU provider). CPU fallback is disabled in
those sessions, so a partition the provider cannot take fails to load instead of running on the
CPU. Without an NPU provider the artifact
refuses to load unless it was compiled with --allow-cpu-fallback; then its NPU partitions run on
the CPU and `partition_providers` (and `provider`) say so.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from optc.errors import InvalidValue
from optc.runtime.artifact import ArtifactError, artifact_file
from optc.runtime.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, ModelSpec, NpuBackend, past_name

QNN = "QNNExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
INSTALL_HINT = "pip install 'optc[npu]' (onnxruntime-qnn, Qualcomm's QNN execution provider)"


def qnn_plugin():
    """The onnxruntime-qnn module with its provider registered in ONNX Runtime, or None."""
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    import onnxruntime as ort

    try:
        ort.register_execution_provider_library(QNN, onnxruntime_qnn.get_library_path())
    except Exception as e:  # registered already in this process
        if "already" not in str(e).lower():
            raise ArtifactError(f"onnxruntime-qnn is installed but ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
    return onnxruntime_qnn


_ON_CPU = [False]


@contextlib.contextmanager
def npu_partitions_on_cpu():
    """Within this block NPU artifacts load with their NPU partitions on the CPU EP, and say so
    (compile-time verification: the HTP simulator is too slow for it)."""
    _ON_CPU[0] = True
    try:
        yield
    finally:
        _ON_CPU[0] = False


# OpenVINO device ids that are NPUs ("NPU", or "NPU.0" where there are several).
OPENVINO_NPU_DEVICES = ("NPU",)


def openvino_devices() -> list[str] | None:
    """The devices OpenVINO's execution provider sees here (e.g. ['CPU', 'GPU', 'NPU']), or None
    where this onnxruntime has no OpenVINO provider (the onnxruntime-openvino build)."""
    import onnxruntime as ort

    if OPENVINO not in ort.get_available_providers():
        return None
    from onnxruntime.capi import _pybind_state

    list_devices = getattr(_pybind_state, "get_available_openvino_device_ids", None)
    return list(list_devices()) if list_devices else []


def openvino_npu_device() -> str | None:
    """The OpenVINO device id of an NPU here ("NPU"), or None."""
    return next((d for d in openvino_devices() or [] if d.split(".")[0] in OPENVINO_NPU_DEVICES), None)


def _openvino(provider_options: dict) -> tuple[str, dict]:
    """OpenVINO's provider entry for a session: its NPU device, then the profile's options."""
    return OPENVINO, {"device_type": openvino_npu_device() or "NPU", **provider_options}


def npu_provider(kind: str = "any") -> str | None:
    """The NPU execution provider to use here (QNN first, then OpenVINO's NPU device), or None."""
    import onnxruntime as ort

    if kind in ("qnn", "any") and qnn_plugin() is not None:
        if any(d.ep_name == QNN for d in ort.get_ep_devices()):
            return QNN
    if kind in ("openvino", "any") and openvino_npu_device() is not None:
        return OPENVINO
    return None


def no_npu_provider_reason(kind: str = "any") -> str:
    """Why npu_provider(kind) found nothing, and what to install, in a few words."""
    devices = openvino_devices() if kind in ("openvino", "any") else None
    if devices is not None:  # (OpenVINO is present but without an NPU: say so rather than "install")
        seen = ", ".join(devices) or "no device"
        hint = f"OpenVINO's execution provider is present but sees no NPU device (it sees: {seen})"
        return hint if kind == "openvino" else f"{hint}; for Qualcomm's NPU: {INSTALL_HINT}"
    if kind == "openvino":
        return "pip install onnxruntime-openvino (OpenVINO's execution provider) on a machine with an Intel NPU"
    return INSTALL_HINT


def npu_session(path_or_bytes, provider: str, provider_options: dict, *, context_file: str | None = None):
    """An ONNX Runtime session of one NPU partition on `provider`, CPU fallback disabled (a node
    the provider rejects fails the load). `context_file`: also write the provider's compiled
    context there (ORT's EPContext model), so that a device loads it without compiling."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # (a rejected partition is our one-line error, not ORT's log line too)
    _quiet_threads(so)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_file is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", context_file)
        so.add_session_config_entry("ep.context_embed_mode", "1")
    if provider == QNN:
        qnn = qnn_plugin()
        devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN]
        so.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path(), **provider_options})
        return ort.InferenceSession(path_or_bytes, sess_options=so)
    if provider == OPENVINO:
        return ort.InferenceSession(path_or_bytes, sess_options=so, providers=[_openvino(provider_options)])
    raise ValueError(provider)


def _quiet_threads(so) -> None:
    """One thread per partition session, none spinning: an artifact holds dozens of sessions, and
    ONNX Runtime's default per-session pools spin while waiting (measured on pycoder-v2's 67
    sessions, 2 cores: a decode step 566 ms with default pools, 5.6 ms without spinning, 2.5 ms
    with one thread)."""
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")


def cpu_session(path_or_bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    _quiet_threads(so)
    return ort.InferenceSession(path_or_bytes, sess_options=so, providers=[CPU])


class PartitionRunner:
    """The partitions of one static graph, each in its own session, run in order on a dict of
    named tensors. `seconds[i]` accumulates partition i's run time while `timed` is set."""

    def __init__(self, parts: list, provider: str | None, provider_options: dict):
        """`parts`: (path or serialised model, NpuPartition[, path of its QNN context]) tuples; NPU
        partitions go to `provider` (None: the CPU EP, only where the caller allowed it)."""
        self.parts, self.sessions, self.providers = [], [], []
        self.from_context = 0
        for i, (path, part, *context) in enumerate(parts):
            ep = CPU if part.device == "cpu" or provider is None else provider
            if ep == QNN and context and context[0]:  # QNN's compiled context: loads without compiling
                path = context[0]
                self.from_context += 1
            try:
                s = cpu_session(path) if ep == CPU else npu_session(path, ep, provider_options)
            except Exception as e:  # onnxruntime raises its own exception types
                where = path if isinstance(path, str) else f"partition {i}"
                raise ArtifactError(f"{where}: {ep} cannot load this {part.device.upper()} partition "
                                    f"({str(e).splitlines()[0][:300]})") from None
            self.parts.append(part)
            self.sessions.append(s)
            self.providers.append((i, part.device, ep))
        self.timed = False
        self.seconds = [0.0] * len(self.parts)

    def run(self, env: dict) -> dict:
        for i, (session, part) in enumerate(zip(self.sessions, self.parts)):
            start = time.perf_counter() if self.timed else 0.0
            out = session.run(part.outputs, {k: env[k] for k in part.inputs})
            if self.timed:
                self.seconds[i] += time.perf_counter() - start
            env.update(zip(part.outputs, out))
        return env


def describe_providers(providers: list, npu_provider: str | None, verifying_on_cpu: bool) -> str:
    """`providers` ((index, device, EP) per partition) as one line, saying where NPU partitions ran
    on the CPU and why."""
    counts = {}
    for _, device, ep in providers:
        counts[(ep, device)] = counts.get((ep, device), 0) + 1
    text = " + ".join(f"{ep} ({device.upper()} partitions: {n})" for (ep, device), n in sorted(counts.items()))
    if npu_provider is None and any(d == "npu" for _, d, _ in providers):
        text += (" [NPU partitions on the CPU for compile-time verification]" if verifying_on_cpu else
                 " [NPU partitions on the CPU: compiled with --allow-cpu-fallback]")
    return text


def choose_provider(root: Path, spec) -> tuple[str | None, bool]:
    """(the NPU provider for `spec`'s NPU partitions or None for the CPU EP, whether that is the
    compile's CPU verification); refuses an artifact that would run on the CPU silently."""
    verifying_on_cpu = _ON_CPU[0]
    provider = None if verifying_on_cpu else npu_provider(spec.execution_provider)
    if provider is None and not spec.allow_cpu_fallback and not verifying_on_cpu:
        raise ArtifactError(f"{root}: this NPU artifact needs an NPU execution provider and none is present "
                            f"({no_npu_provider_reason(spec.execution_provider)}); compile with "
                            f"--allow-cpu-fallback to run it on the CPU")
    return provider, verifying_on_cpu


def graph_runner(root: Path, manifest: dict, graph, provider: str | None, provider_options: dict) -> PartitionRunner:
    """The partitions of one of the manifest's static graphs (every file hash-checked), in sessions."""
    parts = []
    for part in graph.partitions:
        for w in part.weights:
            artifact_file(root, manifest, w)  # (hash-checked like every file)
        context = str(artifact_file(root, manifest, part.context)) if part.context else None
        parts.append((str(artifact_file(root, manifest, part.file)), part, context))
    return PartitionRunner(parts, provider, provider_options)


class NpuEncoderExecutor:
    """An encoder's static graph ([batch, max_length] token inputs) on its partitions: `run`
    takes one padded batch of any length up to max_length and returns the output rows of the
    real tokens (each text padded to max_length here, its padding masked)."""

    def __init__(self, root: Path, manifest: dict, spec):
        self.spec = spec
        self.batch, self.max_length = spec.batch, spec.max_length
        self.npu_provider, self.verifying_on_cpu = choose_provider(root, spec)
        self.runner = graph_runner(root, manifest, spec.graph, self.npu_provider, spec.provider_options)
        self.partition_providers = {"encoder": self.runner.providers}

    @property
    def provider(self) -> str:
        return describe_providers(self.runner.providers, self.npu_provider, self.verifying_on_cpu)

    def run(self, feeds: dict[str, np.ndarray], fetch: list[str], pad_token_id: int) -> list[np.ndarray]:
        """`fetch` for the batch `feeds` ([B, n] token inputs, n <= max_length), in groups of the
        graph's batch, each text padded to max_length; the outputs cut back to [B, n, ...]."""
        rows, n = next(iter(feeds.values())).shape
        if n > self.max_length:
            raise InvalidValue(f"sequence length {n}: this NPU artifact's static graph takes at most "
                               f"{self.max_length} tokens (recompile with a larger --max-length)")
        out: list[list[np.ndarray]] = [[] for _ in fetch]
        for start in range(0, rows, self.batch):
            env = {}
            for name, arr in feeds.items():
                buf = np.full((self.batch, self.max_length), pad_token_id if name == INPUT_IDS else 0, np.int64)
                chunk = arr[start:start + self.batch]
                buf[:len(chunk), :n] = chunk
                env[name] = buf
            real = min(self.batch, rows - start)
            self.runner.run(env)
            for i, name in enumerate(fetch):
                out[i].append(env[name][:real, :n])
        return [np.concatenate(o) for o in out]


class NpuExecutor:
    def __init__(self, root: Path, manifest: dict, spec: NpuBackend, model: ModelSpec):
        self.spec = spec
        self.chunk, self.max_cache = spec.chunk, spec.max_cache
        self.kv_outputs = spec.kv_outputs
        self.n_layers = len(self.kv_outputs)
        self.kv_in_place = None
        self.embedding_rows = None  # (the table is in one partition; the manifest's vocab bounds ids)
        provider, self.verifying_on_cpu = choose_provider(root, spec)
        self.npu_provider = provider
        self.runners: dict[str, PartitionRunner] = {}
        for step, graph in (("prefill", spec.prefill), ("decode", spec.decode)):
            self.runners[step] = graph_runner(root, manifest, graph, provider, spec.provider_options)
        self.partition_providers = {step: r.providers for step, r in self.runners.items()}
        self.input_names = {INPUT_IDS, POSITION_IDS, ATTENTION_MASK} | {
            past_name(i, k) for i in range(self.n_layers) for k in ("key", "value")}
        self.input_shapes = {past_name(i, k): [1, model.kv_heads, None, model.head_dim]
                             for i in range(self.n_layers) for k in ("key", "value")}
        self._past = {name: np.zeros((1, model.kv_heads, self.max_cache, model.head_dim), np.float32)
                      for name in self.input_shapes}

    @property
    def provider(self) -> str:
        """Which execution provider ran which partitions, e.g. `QNNExecutionProvider (NPU, 7 partitions)
        + CPUExecutionProvider (CPU, 8)`."""
        return describe_providers(self.partition_providers["prefill"], self.npu_provider, self.verifying_on_cpu)

    def step_limit(self, cache_feeds, n=None) -> int:
        """A step takes at most one chunk of tokens."""
        return self.chunk

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
            cache_feeds: dict[str, np.ndarray]):
        n = input_ids.shape[1]
        step = "decode" if n == 1 else "prefill"
        tokens = 1 if n == 1 else self.chunk
        if n > tokens:
            raise InvalidValue(f"a step takes at most {self.chunk} tokens (the artifact's chunk), got {n}")
        cached = next(iter(cache_feeds.values())).shape[2] if cache_feeds else 0
        if cached + n > self.max_cache:
            raise InvalidValue(f"{cached + n} tokens do not fit this NPU artifact's cache of {self.max_cache} "
                               f"(its static graphs were compiled for that many; recompile with a larger --max-cache)")
        m = self.max_cache
        ids = np.zeros((1, tokens), np.int64)
        ids[0, :n] = input_ids[0]
        pos = np.full((1, tokens), position_ids[0, -1], np.int64)  # padded tokens repeat the last position
        pos[0, :n] = position_ids[0]
        mask = np.zeros((1, m + tokens), np.int64)
        mask[0, :cached] = attention_mask[0, :cached]
        mask[0, m:m + n] = attention_mask[0, cached:cached + n]
        env = {INPUT_IDS: ids, POSITION_IDS: pos, ATTENTION_MASK: mask}
        for name, arr in cache_feeds.items():
            buf = self._past[name]
            buf[:, :, :cached] = arr  # slots past `cached` hold stale values: masked out
            env[name] = buf
        self.runners[step].run(env)
        logits = env[LOGITS][:, :n]
        new_k = [env[k][:, :, :n] for k, _ in self.kv_outputs]
        new_v = [env[v][:, :, :n] for _, v in self.kv_outputs]
        return logits, new_k, new_v, None


def assigned_nodes(path: str, provider: str, provider_options: dict) -> dict[str, int]:
    """{execution provider: nodes ONNX Runtime assigned it} for the partition at `path` loaded on
    `provider` WITH CPU fallback allowed: counts what would have fallen back to the CPU (the
    artifact's own sessions disable fallback, so there such a node fails the load instead)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    _quiet_threads(so)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if provider == QNN:
        qnn = qnn_plugin()
        devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN]
        so.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path(), **provider_options})
        session = ort.InferenceSession(path, sess_options=so)
    elif provider == OPENVINO:
        session = ort.InferenceSession(path, sess_options=so, providers=[_openvino(provider_options), CPU])
    else:
        session = ort.InferenceSession(path, sess_options=so, providers=[provider, CPU])
    counts: dict[str, int] = {}
    for sub in session.get_provider_graph_assignment_info():
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts
