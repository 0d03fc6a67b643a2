"""The runtime model: prefill / decode / generate over a loaded artifact. Owns the KV cache."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from optc.errors import InvalidType, InvalidValue, PastContextWarning
from optc.runtime.artifact import MANIFEST_NAME, ArtifactError, artifact_file, read_manifest
from optc.runtime.cache import KVCache, make_cache
from optc.runtime.cache.window import SlotWindow
from optc.runtime.executors import make_executor
from optc.runtime.manifest import (KEY_POSITION_IDS, LAYER_CHANGE_OUTPUT, LAYERS_RUN_INPUT, MODEL_KIND_ENCODER,
                                   KVCacheSpec, LayerRoutingSpec, ModelSpec, SinkWindowPolicy, model_kind)
from optc.runtime.sampler import sample

if TYPE_CHECKING:
    from optc.runtime.encoder import EncoderModel


def _token_ids(ids) -> np.ndarray:
    """Token ids as a 1-D int64 array; floats, strings, bools and 2-D input are refused (never
    truncated or flattened silently)."""
    if isinstance(ids, (str, bytes)):
        raise InvalidType("token ids: got a string; encode text with Model.encode() first")
    arr = np.asarray(ids)
    if arr.size == 0:
        raise InvalidValue("prefill needs at least one token")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidType(f"token ids must be integers, got {arr.dtype} values")
    if arr.ndim != 1:
        raise InvalidValue(f"token ids must be one-dimensional (one sequence), got shape {arr.shape}")
    return arr.astype(np.int64)


def _check_sampling(prompt, max_new_tokens, temperature, top_k, top_p, seed) -> None:
    if not isinstance(prompt, str):
        raise InvalidType(f"prompt: expected text (str), got {type(prompt).__name__}")
    for name, v in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidType(f"{name}: expected an integer, got {type(v).__name__} {v!r}")
        if v < 0:
            raise InvalidValue(f"{name}: must be >= 0, got {v}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise InvalidType(f"{name}: expected a number, got {type(v).__name__} {v!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise InvalidValue(f"temperature: a finite number >= 0 (0 = greedy), got {temperature}")
    if not np.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidValue(f"top_p: in (0, 1], got {top_p}")


class Model:
    """A compiled decoder. Single sequence (batch 1); not thread-safe."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        where = self.root / MANIFEST_NAME
        spec = ModelSpec.from_dict(manifest.get("model"), f"{where}: model")
        kv_spec = KVCacheSpec.from_dict(manifest.get("kv_cache"), f"{where}: kv_cache")
        if not isinstance(manifest.get("tokenizer"), str):
            raise ArtifactError(f"{where}: tokenizer: expected the tokenizer file's name")
        cfg = manifest["model"]
        self.config = cfg
        self.executor = make_executor(self.root, manifest, spec)
        # Token ids are bounded by the table the compiled code gathers from (the graph's
        # initializer, the TVM parameter); a manifest that disagrees was edited.
        rows = self.executor.embedding_rows
        if rows is not None and rows != spec.vocab_size:
            raise ArtifactError(f"{where}: model.vocab_size {spec.vocab_size} does not match the compiled "
                                f"embedding table's {rows} rows")
        self.vocab_size = rows or spec.vocab_size
        self.cache = make_cache(kv_spec, cfg)
        self._check_cache_inputs(where)
        # an executor that writes the cache in place needs the plain growable cache (the backend
        # lowers only such artifacts; a manifest that pairs it with another was edited)
        self._in_place = getattr(self.executor, "kv_in_place", None) is not None
        # sink_window on the fused path: a bounded buffer GQA writes, compacted in batches
        windowed = self._in_place and self.executor.kv_in_place.attention_bias_input is not None
        if self._in_place and (type(self.cache) is not KVCache
                               or (kv_spec.pruned_from_layer is not None)
                               != (self.executor.kv_in_place.pruned_past_input is not None)
                               or (kv_spec.policy is not None or windowed)
                               != (windowed and isinstance(kv_spec.policy, SinkWindowPolicy))):
            raise ArtifactError(f"{where}: backend.kv_in_place needs a float cache without a policy (or sink_window, "
                                f"with the attention bias input), and pruned layers with the pruned-length input")
        self._window = SlotWindow(kv_spec.policy.sinks, kv_spec.policy.window,
                                  self.executor.kv_in_place.rotary_inv_freq, cfg.get("context"),
                                  self.executor.kv_in_place.max_positions,
                                  kv_spec.pruned_from_layer) if windowed else None
        # token_dropping (mode prefill): from this layer on, prefill caches (and returns logits
        # for) the kept prompt tokens only; each layer's cache keeps its own length
        self.pruned_from_layer = kv_spec.pruned_from_layer
        if self.pruned_from_layer is not None and self.pruned_from_layer >= spec.n_layers:
            raise ArtifactError(f"{where}: kv_cache.pruned_from_layer {self.pruned_from_layer} is not a layer of this "
                                f"{spec.n_layers}-layer model")
        # layer_routing: decode skips the layers the prompt's prefill changed least (or a static set)
        self.routing = LayerRoutingSpec.from_dict(manifest.get("layer_routing"), spec.n_layers,
                                                  f"{where}: layer_routing")
        # which layers run (all until the prompt's prefill has ranked them; reset() refills it)
        self.layers_run = np.ones(int(self.config["n_layers"]), bool)
        if self.routing is not None:
            if not hasattr(self.executor, "fetch"):
                raise ArtifactError(f"{where}: layer_routing needs the ONNX Runtime backend")
            self.executor.fetch([LAYER_CHANGE_OUTPUT])
            if self._in_place:  # the fused path binds the flags once; a step reads them as they are
                self.executor.bind_input(LAYERS_RUN_INPUT, self.layers_run)
        # "cache_slot": tokens are positioned by their slot in the (evicting) cache, StreamingLLM-style
        self.slot_positions = kv_spec.slot_positions
        self.policy = kv_spec.policy
        # sink_window: the cache holds sinks + window tokens at most
        self.sink_window = self.policy if isinstance(self.policy, SinkWindowPolicy) else None
        # past it: one warning (sink_window's slots stay within it)
        self._context_limit = (self.config.get("context") if self._window is None else None) or float("inf")
        self._tokenizer = None
        self.last_stats: dict = {}  # filled by generate(): prompt/new token counts, decode seconds
        self.reset()

    def _check_cache_inputs(self, where: Path) -> None:
        """Every input the cache feeds is one the compiled graph takes, with its static sizes
        (a hand-edited n_layers, kv_heads or head_dim would otherwise fail inside the backend)."""
        for name, arr in self.cache.feeds().items():
            if name not in self.executor.input_names:
                raise ArtifactError(f"{where}: the cache feeds {name!r}, which the compiled graph does not take "
                                    f"(model or kv_cache section edited?)")
            graph = self.executor.input_shapes.get(name)
            if graph is None:
                continue
            for axis, (g, a) in enumerate(zip(graph, arr.shape)):
                if axis != 2 and g is not None and g != a:  # (axis 2: cached tokens)
                    raise ArtifactError(f"{where}: the cache's {name!r} has {a} on axis {axis}, the compiled graph "
                                        f"{g} (model or kv_cache section edited?)")

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache.reset()
        if self._window is not None:
            self._window.reset()
        self.position = 0  # absolute position of the next token
        self._warned_past_context = False
        # layer_routing: every layer runs until the prompt's prefill has ranked them
        self.layers_run[:] = True
        self.skipped_layers: list[int] = []
        self.layer_change: dict[int, float] = {}

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the graph (e.g. CPUExecutionProvider)."""
        return self.executor.provider

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(artifact_file(self.root, self.manifest,
                                                                    self.manifest["tokenizer"])))
        return self._tokenizer

    # -- forward -----------------------------------------------------------------------------
    def _logit_rows(self, n: int, all_rows: bool) -> int | None:
        """Rows of logits a step of `n` tokens asks for (None: the executor computes every row's):
        the last one, unless every row is wanted or the step drops prompt tokens (token_dropping:
        its logit rows tell how many it kept)."""
        if all_rows or getattr(self.executor, "logit_rows_input", None) is None:
            return None
        if self.pruned_from_layer is not None and self.position == 0:
            return n
        return 1

    def _step(self, ids: np.ndarray, all_rows: bool = True) -> np.ndarray:
        """Runs `ids`, or as many of them as the executor takes in one step (a static-shape
        backend has a largest shape); returns logits for the tokens it ran (with all_rows=False,
        where the backend can, for the last one only)."""
        n = len(ids)
        if self._in_place:  # the fused path: the graph writes the new keys/values into the cache itself
            return self._step_in_place(ids, n, all_rows)
        if self.sink_window:
            self._make_room(n)
        feeds = self.cache.feeds()
        limit = self.executor.step_limit(feeds, n)
        if limit is not None and limit < n:
            n, ids = limit, ids[:limit]
        cached = self.cache.length  # (layer 0's: never pruned, never skipped)
        first = cached if self.slot_positions else self.position
        input_ids = np.asarray(ids, dtype=np.int64).reshape(1, n)
        position_ids = np.arange(first, first + n, dtype=np.int64).reshape(1, n)
        self._warn_past_context(first + n - 1, stacklevel=4)
        attention_mask = np.ones((1, cached + n), dtype=np.int64)
        if self.slot_positions:
            feeds[KEY_POSITION_IDS] = np.arange(cached + n, dtype=np.int64).reshape(1, -1)
        if self.routing is not None:
            feeds[LAYERS_RUN_INPUT] = self.layers_run
        rows = self._logit_rows(n, all_rows)
        extra = {} if rows is None else {"logit_rows": rows}
        logits, new_k, new_v, attention = self.executor.run(input_ids, position_ids, attention_mask, feeds, **extra)
        if self.routing is not None and self.position == 0:  # the prompt's prefill: choose what decode skips
            self._route(self.executor.extra[LAYER_CHANGE_OUTPUT])
        self.cache.append(new_k, new_v)
        self.position += n
        if attention is not None:  # a scoring policy (H2O): score cached tokens, then evict
            self.cache.observe(attention)
            self.cache.enforce_budget(tokens_seen=self.position)
        return logits[0]

    def _route(self, change: np.ndarray) -> None:
        """layer_routing: turn off, for the rest of this sequence, the `max_skip` routable layers
        whose change of the prompt's last hidden states was smallest (or the static set)."""
        r = self.routing
        self.layer_change = {layer: float(c) for layer, c in zip(r.layers, change)}
        if r.static is not None:
            skip = list(r.static)
        else:
            skip = [r.layers[j] for j in np.argsort(np.asarray(change), kind="stable")[:r.max_skip]]
        self.skipped_layers = sorted(int(i) for i in skip)
        self.layers_run[self.skipped_layers] = False

    def _warn_past_context(self, last: int, stacklevel: int) -> None:
        """Once per sequence: position `last` is past the trained context (the warning points
        `stacklevel` frames up, at the caller of prefill/decode)."""
        context = self.config.get("context")
        if context and last >= context and not self._warned_past_context:
            self._warned_past_context = True
            warnings.warn(PastContextWarning(
                f"position {last} is past the model's trained context ({context} tokens): "
                f"expect much worse predictions; compile with sink_window to stream long sequences"),
                stacklevel=stacklevel)

    def _step_in_place(self, ids: np.ndarray, n: int, all_rows: bool = True) -> np.ndarray:
        """_step on the fused path (a dense cache without policy: position = cache length)."""
        bias = self._window.step(self.cache, n, self.skipped_layers) if self._window is not None else (None, None)
        cached = self.cache.length
        if cached + n > self._context_limit:
            self._warn_past_context(cached + n - 1, stacklevel=5)  # (called from _step: one frame deeper)
        input_ids = np.asarray(ids, dtype=np.int64).reshape(1, n)
        position_ids = np.arange(cached, cached + n, dtype=np.int64).reshape(1, n)
        logits = self.executor.run_in_place(input_ids, position_ids, self.cache.buffers(n), cached, bias,
                                            self._pruned_length(), self._logit_rows(n, all_rows))
        # (token_dropping: in the step that drops, the pruned layers cached a row per logit row, the
        # kept tokens, for which _logit_rows asked every row; later steps keep all n)
        kept = logits.shape[1] if self.position == 0 else n
        self.cache.advance(n, skipped=self.skipped_layers, pruned=self._pruned_rows(kept))
        if self.routing is not None and self.position == 0:  # the prompt's prefill: choose what decode skips
            self._route(self.executor.extra[LAYER_CHANGE_OUTPUT])
        self.position += n
        return logits[0]

    def _pruned_length(self) -> int | None:
        """token_dropping: tokens in the cache of the layers from pruned_from_layer on (the last
        layer's, which layer_routing never skips)."""
        return None if self.pruned_from_layer is None else self.cache.keys[-1].length  # (no per-step list)

    def _pruned_rows(self, rows: int) -> tuple[int, int] | None:
        """cache.advance's `pruned`: (first pruned layer, rows its layers cached this step)."""
        return None if self.pruned_from_layer is None else (self.pruned_from_layer, rows)

    def _make_room(self, n: int) -> None:
        """sink_window: evict the oldest non-sink tokens of each layer so that its cache plus `n`
        new tokens fits in sinks + window. Each layer by its own length: token_dropping's later
        layers hold fewer tokens, and a layer that layer_routing skips stops growing."""
        sinks, window = self.sink_window.sinks, self.sink_window.window
        for i, length in enumerate(self.cache.layer_lengths):
            overflow = length + n - (sinks + window)
            if overflow > 0:
                self.cache.evict(start=sinks, count=min(overflow, length - sinks), layer=i)

    def _chunk(self) -> int | None:
        """Largest prefill chunk the cache policy allows (None: no limit). token_dropping scores
        the whole prompt in its first step, so with it the prompt runs in one step, and the
        window bounds the cache from the next step on."""
        if self.sink_window and not (self.pruned_from_layer is not None and self.position == 0):
            return max(1, self.sink_window.window // 2)
        return None

    def prefill(self, ids, all_logits: bool = False) -> np.ndarray:
        """Run the prompt `ids` (appended to whatever the cache holds). Returns next-token logits
        [vocab], or [len(ids), vocab] with all_logits=True."""
        ids = _token_ids(ids)
        self._check_ids(ids)
        if all_logits and self.pruned_from_layer is not None and self.position == 0:
            raise InvalidValue(f"prefill(all_logits=True): this artifact drops prompt tokens from layer "
                               f"{self.pruned_from_layer} on (token_dropping), so only the last token's logits are "
                               f"computed; call prefill(ids) and decode the rest")
        chunk = self._chunk() or ids.size  # an evicting cache is filled chunk by chunk
        parts, done = [], 0
        while done < ids.size:
            # A chunk's boundaries do not depend on the backend. Where the executor takes fewer
            # tokens a step (a static-shape backend's buckets), the rest of the chunk runs next,
            # before the next chunk makes room: evictions then happen as if the chunk ran whole,
            # and every token attends to the same keys on every backend.
            end = min(done + chunk, ids.size)
            while done < end:
                before = self.position
                parts.append(self._step(ids[done:end], all_rows=all_logits))
                done += self.position - before  # (a prompt-dropping step returns fewer logit rows)
        logits = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return logits if all_logits else logits[-1]

    def decode(self, token_id: int) -> np.ndarray:
        """One decode step; returns next-token logits [vocab]."""
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise InvalidType(f"decode: a token id must be an integer, got {type(token_id).__name__} {token_id!r}")
        if self.position == 0:
            raise InvalidValue("decode() before prefill(): prefill the prompt first (it fills the cache)")
        if self._in_place:  # the fused path: a token id and two lengths written, no array built
            return self._decode_in_place(int(token_id))
        ids = np.array([int(token_id)])
        self._check_ids(ids)
        return self._step(ids)[-1]

    def _decode_in_place(self, tok: int, copy: bool = True) -> np.ndarray:
        """decode() on the fused path; copy=False returns the executor's bound logits, which the
        next step overwrites (the generate loop samples from them at once)."""
        if not 0 <= tok < self.vocab_size:
            raise InvalidValue(f"token id {tok} is outside the vocabulary (0..{self.vocab_size - 1})")
        bias = self._window.step(self.cache, 1, self.skipped_layers) if self._window is not None else (None, None)
        cached = self.cache.length
        if cached >= self._context_limit:
            self._warn_past_context(cached, stacklevel=4)
        logits = self.executor.decode_in_place(tok, self.cache.buffers(1), cached, copy, bias, self._pruned_length())
        self.cache.advance(1, skipped=self.skipped_layers, pruned=self._pruned_rows(1))
        self.position += 1
        return logits

    def _check_ids(self, ids: np.ndarray) -> None:
        # compiled code gathers embeddings without bounds checks (TVM's fast take)
        vocab = self.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise InvalidValue(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")

    # -- text --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        bos = self.config.get("bos_token_id")
        ids = self.tokenizer.encode(text).ids
        return ([bos] if bos is not None else []) + ids

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, seed: int = 0, stream: bool = False):
        """Generate a continuation of `prompt`. stream=True yields text pieces as they are decoded."""
        _check_sampling(prompt, max_new_tokens, temperature, top_k, top_p, seed)
        pieces = self._generate(prompt, max_new_tokens, temperature, top_k, top_p, seed)
        return pieces if stream else "".join(pieces)

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed) -> Iterator[str]:
        rng = np.random.default_rng(seed)
        eos = self.config.get("eos_token_id")
        self.reset()
        logits = self.prefill(self.encode(prompt))
        out_ids: list[int] = []
        emitted = ""
        self.last_stats = {"prompt_tokens": self.position, "new_tokens": 0, "decode_seconds": 0.0}
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            tok = sample(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
            if tok == eos:
                break
            out_ids.append(tok)
            text = self.tokenizer.decode(out_ids)
            # a byte-level BPE token can end mid-character: hold it back until it completes
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
            # (the fused path samples from the executor's own logits array: no copy)
            logits = self._decode_in_place(tok, copy=False) if self._in_place else self.decode(tok)
            self.last_stats["new_tokens"] = len(out_ids)
        self.last_stats["decode_seconds"] = time.perf_counter() - t0
        tail = self.tokenizer.decode(out_ids)
        if len(tail) > len(emitted):
            yield tail[len(emitted):]


def load(path, *, expect: str | None = None, trusted_keys=None) -> Model | EncoderModel:
    """Load an artifact directory: verifies every file's sha256 and refuses paths outside it.
    A decoder artifact gives a Model, an encoder artifact (`model.kind: encoder`) an EncoderModel.

    `expect`: the artifact id to pin (`optc compile` prints it; `optc.runtime.artifact_id(path)`
    computes it): the manifest's digest must match before anything is loaded. `trusted_keys`:
    Ed25519 public keys (PEM text or bytes, key files, or hex), one of which must have signed the
    manifest (`optc sign`). A TVM artifact is native code that runs when loaded: pin or verify
    what you load from anywhere you do not trust (docs/security.md)."""
    root = Path(path)
    return _open(root, read_manifest(root, expect=expect, trusted_keys=trusted_keys))


def load_unpublished(path) -> Model | EncoderModel:
    """The compiler's own use: load an artifact it is still building (to verify it)."""
    root = Path(path)
    return _open(root, read_manifest(root, allow_staging=True))


def _open(root: Path, manifest: dict):
    """A decoder's Model, or an encoder's EncoderModel (runtime/encoder.py), by the manifest's
    `model.kind`; the manifest (hashes, paths, id, signature) is already verified either way."""
    if model_kind(manifest.get("model"), f"{root / MANIFEST_NAME}: model") == MODEL_KIND_ENCODER:
        from optc.runtime.encoder import EncoderModel

        return EncoderModel(root, manifest)
    return Model(root, manifest)
