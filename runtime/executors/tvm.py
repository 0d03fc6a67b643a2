"""Runs a TVM artifact: a compiled library of static-shape Relax functions (one per bucket).

Only the TVM *runtime* is loaded (`TVM_USE_RUNTIME_LIB=1`): no compiler library, no `tvm.relax`.
A prompt is split into the steps of least estimated time (`step_limit`), and each step is padded
into the cheapest compiled bucket that holds it:
- every cache segment (e.g. the float cache, or a quantised cache's stored groups and residual)
  is copied into its bucket capacity; the unused slots are masked out through `attention_mask`;
- the new tokens are padded at the end; causality keeps real tokens from seeing the padding and
  the padded outputs are dropped.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

from optc.runtime.artifact import ArtifactError, artifact_file
from optc.runtime.cache.buffers import aligned_zeros
from optc.tvm_env import torch_hidden, use_available_cpus
from optc.runtime.manifest import ATTENTION_MASK, INPUT_IDS, KEY_POSITION_IDS, POSITION_IDS, ModelSpec, TvmBackend

_tvm = None


def import_tvm_runtime():
    """`tvm` with the runtime library only (and without torch, see torch_hidden)."""
    global _tvm
    if _tvm is not None:
        return _tvm
    use_available_cpus()
    fresh = "tvm" not in sys.modules  # else the compiler (full TVM) is loaded already: use it
    env_before = os.environ.get("TVM_USE_RUNTIME_LIB")
    if fresh:
        # read when tvm is imported; restored afterwards so that child processes (MetaSchedule's
        # workers, say) still get the full library
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    try:
        with torch_hidden():
            import tvm
            from tvm.runtime import vm  # noqa: F401
    except ImportError as e:
        raise ArtifactError(f"this artifact needs the TVM runtime, which is not installed ({e}); "
                            f"pip install 'optc[tvm]'") from None
    finally:
        if fresh:
            if env_before is None:
                os.environ.pop("TVM_USE_RUNTIME_LIB", None)
            else:
                os.environ["TVM_USE_RUNTIME_LIB"] = env_before
    if fresh:
        tvm._optc_runtime_only = True  # the compiler cannot be loaded into this process any more
    _tvm = tvm
    return tvm


def _step_cost(bucket: dict) -> int:
    """A step's estimated time, in units of one query token against one key: tokens x (1,200 +
    cached keys + tokens / 2), plus 16,000 a step. The constant is the per-step cost (weights
    streamed, VM calls); the 1,200 the per-token work that does not grow with the keys
    (projections, FFN, LM head); tokens / 2 because the prefill kernel skips the masked half of
    the new tokens' keys. Fitted on pycoder-5m's buckets, 2 threads (one unit ~0.15 µs):
    prefill 32 / 128 / 512 tokens 8.6 / 26 / 113 ms, 64 tokens over 512 / 2,048 cached 19 / 34
    ms, decode over 2,048 cached 3.0 ms."""
    tokens = bucket["tokens"]
    return tokens * (1200 + sum(bucket["segments"]) + tokens // 2) + 16000


def _storage_of(arr: np.ndarray, shape: tuple) -> np.ndarray | None:
    """`arr` (the filled part of a cache buffer, tokens on axis 2) widened to `shape` in place,
    if the buffer behind it has exactly that capacity: a 64-byte aligned, C-ordered
    [1, heads, capacity, ...] array. Then TVM can read the cache where it lies. None otherwise."""
    itemsize = arr.dtype.itemsize
    strides = tuple(math.prod(shape[i + 1:]) * itemsize for i in range(len(shape)))
    nbytes = math.prod(shape) * itemsize
    base = arr.base
    if arr.strides != strides or not isinstance(base, np.ndarray) or arr.ctypes.data % 64 or not nbytes:
        return None
    start, lo = arr.ctypes.data, base.ctypes.data
    if start < lo or start + nbytes > lo + base.nbytes:  # the padded span must lie inside the buffer
        return None
    return np.lib.stride_tricks.as_strided(arr, shape=shape, strides=strides)


def _cuda_device(tvm, root: Path):
    """The first CUDA GPU, after loading TVM's CUDA runtime (a separate library that needs the
    NVIDIA driver). The artifact's kernels are a compiled fatbin: nothing is compiled here."""
    import ctypes

    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise ArtifactError(f"{root}: this artifact runs on an NVIDIA GPU, and TVM's CUDA runtime cannot be "
                            f"loaded here ({str(e).splitlines()[0]})") from None
    device = tvm.cuda(0)
    if not device.exist:
        raise ArtifactError(f"{root}: this artifact runs on an NVIDIA GPU, and none is visible")
    return device


class TvmExecutor:
    def __init__(self, root: Path, manifest: dict, spec: TvmBackend, model: ModelSpec):
        tvm = import_tvm_runtime()
        from tvm.runtime.vm import VirtualMachine

        backend = manifest["backend"]  # (type-checked: `spec`)
        lib_path = artifact_file(root, manifest, spec.library)
        params_path = artifact_file(root, manifest, spec.params)
        device = spec.device
        if device == "cuda":
            self.device = _cuda_device(tvm, root)
        elif device == "cpu":
            self.device = tvm.cpu()
        else:
            raise ArtifactError(f"{root / 'manifest.json'}: unknown TVM device {device!r}")
        self.on_cpu = device == "cpu"
        try:
            lib = tvm.runtime.load_module(str(lib_path))
            self.vm = VirtualMachine(lib, self.device)
        except Exception as e:  # tvm raises its own error types
            raise ArtifactError(f"{lib_path}: the TVM runtime cannot load the library ({str(e).splitlines()[0]})") \
                from None
        from safetensors.numpy import load_file

        try:
            weights = load_file(str(params_path))
        except Exception as e:
            raise ArtifactError(f"{params_path}: cannot read parameters ({e})") from None
        self._weights = {name: tvm.runtime.tensor(arr, self.device) for name, arr in weights.items()}
        self.segments = backend["segments"]
        self.sparse_min = spec.sparse_prefill_min_tokens
        self.buckets = backend["buckets"]
        for b in self.buckets:
            missing = [p for p in b["params"] if p not in self._weights]
            if missing:
                raise ArtifactError(f"{params_path}: parameter {missing[0]!r} of {b['name']!r} is missing")
        self.embedding_rows = self._embedding_rows(model, params_path)
        self.input_names = {name for b in self.buckets for name in b["inputs"]}
        self.input_shapes: dict = {}  # (the VM checks every argument's shape on each call)
        self._functions = {}
        self._staging: dict = {}  # (input, padded shape, dtype) -> (numpy buffer, TVM tensor on it)
        self._inputs: dict = {}  # (input, shape, dtype) -> (aligned numpy buffer, TVM tensor on it)
        self._plan = None  # ((cache length, tokens to run), the remaining step sizes) of the prompt in progress
        self._borrowed: dict = {}  # input -> ((shape, address, strides), TVM tensor on the cache's buffer or None)
        self.kv_outputs = backend["kv_outputs"]
        self.n_layers = len(self.kv_outputs)
        self.has_attention = bool(backend.get("attention_outputs"))
        self.provider = f"TVM ({backend.get('target_kind', 'llvm')}, {len(self.buckets)} compiled shapes)"

    def _embedding_rows(self, model: ModelSpec, params_path: Path) -> int:
        """Rows of the embedding table: a parameter every compiled shape takes, and the VM checks
        each parameter's shape against the compiled function on every call, so these are the
        rows the compiled code gathers token ids from (it does so without bounds checks)."""
        everywhere = set.intersection(*(set(b["params"]) for b in self.buckets))
        if model.embedding is not None:
            table = self._weights.get(model.embedding)
            if model.embedding not in everywhere or table is None or len(table.shape) != 2:
                raise ArtifactError(f"{params_path}: the embedding table {model.embedding!r} is not a 2-D parameter "
                                    f"of every compiled shape")
            return int(table.shape[0])
        # an artifact compiled before the manifest named its table: a table of the manifest's
        # shape must be there
        shape = (model.vocab_size, model.hidden_size)
        if any(tuple(self._weights[name].shape) == shape for name in everywhere):
            return model.vocab_size
        raise ArtifactError(f"{params_path}: no parameter has the embedding table's shape [vocab_size {shape[0]}, "
                            f"hidden_size {shape[1]}] that the manifest's model section gives")

    # -- buckets --------------------------------------------------------------------------------
    def _segment_lengths(self, cache_feeds: dict) -> list[int]:
        out = []
        for seg in self.segments:
            name, per_index = next(iter(seg["inputs"].items()))
            out.append(cache_feeds[name].shape[2] * per_index)
        return out

    def _fits(self, bucket: dict, lengths: list[int], n: int | None = None) -> bool:
        if not any(bucket["segments"]) and any(lengths):
            return False
        if n is not None and "branch" in bucket:  # block-sparse prefill: the branch the real prompt takes
            sparse = not any(lengths) and n >= self.sparse_min
            if (bucket["branch"] == "sparse") != sparse:
                return False
        return all(cap >= length for cap, length in zip(bucket["segments"], lengths))

    def step_limit(self, cache_feeds: dict, n: int | None = None) -> int:
        """How many of `n` new tokens to run in this step with the cache as it is (without `n`:
        the most one step can take). A prompt is split into the steps of least estimated time
        (`_step_cost`): 130 tokens run as prefill_128 + 2 decode steps, not padded to 512."""
        lengths = self._segment_lengths(cache_feeds)
        fitting = [b for b in self.buckets if self._fits(b, lengths, n)]
        if not fitting:
            largest = max(sum(b["segments"]) for b in self.buckets)
            raise ArtifactError(f"the cache holds {sum(lengths)} tokens but the largest compiled TVM shape holds "
                                f"{largest}: recompile with larger --cache-sizes")
        largest = max(b["tokens"] for b in fitting)
        if n is None:
            return largest
        if n == 1:
            self._plan = None  # (a plan's last step, or a decode step)
            return 1
        cached = sum(lengths)
        plan = self._plan
        if not (plan and plan[0] == (cached, n) and any(b["tokens"] >= plan[1][0] for b in fitting)):
            steps = self._split(cached, n, fitting)
            plan = self._plan = ((cached, n), steps) if steps else None
        if plan is None:  # no split fits the compiled shapes (an evicting cache): the largest step
            return min(n, largest)
        first, rest = plan[1][0], plan[1][1:]
        self._plan = ((cached + first, n - first), rest) if rest else None
        return first

    def _split(self, cached: int, n: int, fitting_now: list[dict]) -> list[int]:
        """Step sizes that run `n` tokens over `cached` ones in the least estimated time (dynamic
        programming over tokens done; later steps judged by total cache length only). [] if none."""
        inf = float("inf")
        cost = [inf] * n + [0.0]
        choice = [0] * n
        for done in range(n - 1, -1, -1):
            held = cached + done
            options = fitting_now if done == 0 else [
                b for b in self.buckets if any(b["segments"]) and sum(b["segments"]) >= held]
            for b in options:
                take = min(n - done, b["tokens"])
                c = _step_cost(b) + cost[done + take]
                if c < cost[done]:
                    cost[done], choice[done] = c, take
        if cost[0] == inf:
            return []
        steps, done = [], 0
        while done < n:
            steps.append(choice[done])
            done += choice[done]
        return steps

    def _choose(self, n: int, lengths: list[int]) -> dict:
        fitting = [b for b in self.buckets if b["tokens"] >= n and self._fits(b, lengths, n)]
        if not fitting:
            raise ArtifactError(f"no compiled TVM shape takes {n} new tokens over a cache of {sum(lengths)} "
                                f"(the runtime asks step_limit() first; this is a bug)")
        return min(fitting, key=lambda b: (_step_cost(b), b["name"]))

    def _function(self, name: str):
        if name not in self._functions:
            self._functions[name] = self.vm[name]
        return self._functions[name]

    def _stage(self, name: str, arr: np.ndarray, capacity: int):
        """`arr` (a cache input, tokens on axis 2) in a TVM tensor of `capacity` tokens. The
        padded buffers persist per input and capacity, so a step copies the cache once, into
        memory TVM reads in place (on the CPU), instead of allocating and zero-filling a padded
        array and copying it again into a fresh tensor. Slots past the cache keep old, finite
        values, which the attention mask hides."""
        shape = arr.shape[:2] + (capacity,) + arr.shape[3:]
        if self.on_cpu:
            # the cache's own buffer has the bucket's capacity (it grows in powers of two, like
            # the default buckets): TVM reads it in place, no copy at all
            key = (shape, arr.ctypes.data, arr.strides)
            borrowed = self._borrowed.get(name)
            if borrowed is None or borrowed[0] != key:  # (else: the same buffer as last step)
                storage = _storage_of(arr, shape)
                borrowed = (key, None if storage is None else _tvm.runtime.from_dlpack(storage))
                self._borrowed[name] = borrowed
            if borrowed[1] is not None:
                return borrowed[1]
        key = (name, shape, arr.dtype.str)
        if key not in self._staging:
            buffer = aligned_zeros(shape, arr.dtype)
            in_place = self.on_cpu and buffer.size  # (an empty buffer may have any address)
            tensor = _tvm.runtime.from_dlpack(buffer) if in_place else _tvm.runtime.tensor(buffer, self.device)
            self._staging[key] = (buffer, tensor)
        buffer, tensor = self._staging[key]
        buffer[:, :, : arr.shape[2]] = arr
        if not self.on_cpu and buffer.size:  # a GPU: one host-to-device copy
            tensor.copyfrom(buffer)
        return tensor

    def _small_input(self, name: str, arr: np.ndarray):
        """ids, positions, mask: copied into a persistent aligned buffer that TVM reads in place
        (a fresh tvm.runtime.tensor costs ~40 µs each, a good part of a short decode step)."""
        if not self.on_cpu:
            return _tvm.runtime.tensor(arr, self.device)
        key = (name, arr.shape, arr.dtype.str)
        if key not in self._inputs:
            buffer = aligned_zeros(arr.shape, arr.dtype)
            self._inputs[key] = (buffer, _tvm.runtime.from_dlpack(buffer))
        buffer, tensor = self._inputs[key]
        np.copyto(buffer, arr)
        return tensor

    # -- one step -------------------------------------------------------------------------------
    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
            cache_feeds: dict[str, np.ndarray]):
        tvm = _tvm
        n = input_ids.shape[1]
        lengths = self._segment_lengths(cache_feeds)
        bucket = self._choose(n, lengths)
        caps, n_pad = bucket["segments"], bucket["tokens"]
        total = sum(caps) + n_pad
        # where each real key slot (cache segments, then the new tokens) lands in the padded layout
        slots = np.concatenate([off + np.arange(length) for off, length in
                                zip(np.cumsum([0] + caps[:-1]), lengths)] + [sum(caps) + np.arange(n)]).astype(np.int64)
        feeds = {}
        ids = np.zeros((1, n_pad), np.int64)
        ids[:, :n] = input_ids
        pos = np.zeros((1, n_pad), np.int64)
        pos[:, :n] = position_ids
        pos[:, n:] = position_ids[0, -1] + 1 + np.arange(n_pad - n)  # beyond the real ones: harmless
        mask = np.zeros((1, total), np.int64)
        mask[0, slots] = attention_mask[0]
        feeds.update({INPUT_IDS: ids, POSITION_IDS: pos, ATTENTION_MASK: mask})
        if KEY_POSITION_IDS in cache_feeds:
            kp = np.zeros((1, total), np.int64)
            kp[0, slots] = cache_feeds[KEY_POSITION_IDS][0]
            feeds[KEY_POSITION_IDS] = kp
        staged = {}
        for seg, cap in zip(self.segments, caps):
            for name, per_index in seg["inputs"].items():
                staged[name] = self._stage(name, cache_feeds[name], cap // per_index)
        args = [staged[name] if name in staged else self._small_input(name, feeds[name])
                for name in bucket["inputs"]]
        args += [self._weights[p] for p in bucket["params"]]
        try:
            out = self._function(bucket["name"])(*args)
        except Exception as e:  # the VM checks each argument against the compiled function (TVM's own errors)
            raise ArtifactError(f"compiled shape {bucket['name']!r}: the TVM VM refuses its arguments "
                                f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        # on the CPU the outputs are numpy views of TVM's fresh output tensors (each view keeps its
        # tensor alive); Tensor.numpy() copies, ~13 µs per output, 13+ outputs per step
        out = [np.from_dlpack(o) for o in out] if self.on_cpu else [o.numpy() for o in out]
        logits = out[0][:, :n]
        kv = out[1:1 + 2 * self.n_layers]
        new_k = [a[:, :, :n] for a in kv[0::2]]
        new_v = [a[:, :, :n] for a in kv[1::2]]
        attention = None
        if self.has_attention:
            attention = [a[:, :, :n][..., slots] for a in out[1 + 2 * self.n_layers:]]
        return logits, new_k, new_v, attention
