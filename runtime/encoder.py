"""The runtime side of an encoder artifact (manifest `model.kind: encoder`): text in, one pooled
embedding per text out.

    m = optc.runtime.load("build/minilm")        # same hash / path / id / signature checks as a decoder
    e = m.embed(["a sentence", "another one"])    # float32 [2, hidden], L2-normalised if the model is

Texts are tokenized with the tokenizer shipped in the artifact, truncated to `max_length` tokens
and padded to the longest text of each batch; the graph's hidden-state rows are mean-pooled,
weighted by the output the manifest names (`pooling_weights`: token_dropping's kept-token sizes
under reduce merge, so the pooled vector still averages every real token; its kept-token mask
under reduce drop) or by the attention mask. With token dropping, a batch's padded length sets how
many rows are kept (`keep` is a share of it): `embed` batches texts in the order given, so the
same texts in the same batches give the same embeddings.

An NPU artifact (`backend.name: npu`, backends/npu/) holds one static graph of `max_length`
tokens per text: the tokenizer truncates to it, each text is padded to it with attention_mask 0
there, its partitions run in order (NPU ones on the NPU provider, never silently on the CPU:
`provider` names the EP of every partition) and the real tokens' rows are pooled as above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optc.errors import InvalidType, InvalidValue
from optc.runtime.artifact import MANIFEST_NAME, ArtifactError, artifact_file
from optc.runtime.manifest import (ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS, EncoderSpec, NpuEncoderBackend,
                                   OnnxRuntimeBackend)
from optc.runtime.onnx_graph import WireError, embedding_rows


class EncoderModel:
    """A compiled encoder. Stateless between calls; not thread-safe (one ONNX Runtime session)."""

    kind = "encoder"

    def __init__(self, root: Path, manifest: dict):
        from optc.runtime.executors.onnxruntime import open_session

        self.root = Path(root)
        self.manifest = manifest
        where = self.root / MANIFEST_NAME
        self.spec = spec = EncoderSpec.from_dict(manifest.get("model"), f"{where}: model")
        self.config = manifest["model"]
        if not isinstance(manifest.get("tokenizer"), str):
            raise ArtifactError(f"{where}: tokenizer: expected the tokenizer file's name")
        backend = manifest.get("backend")
        name = backend.get("name") if isinstance(backend, dict) else None
        self._fetch = [spec.output] + ([spec.pooling_weights] if spec.pooling_weights else [])
        self.npu = None
        if name == "npu":  # static partitions (backends/npu/): each text padded to the graph's max_length
            from optc.runtime.executors.npu import NpuEncoderExecutor

            section = NpuEncoderBackend.from_dict(backend, f"{where}: backend")
            if section.max_length != spec.max_length:
                raise ArtifactError(f"{where}: model.max_length {spec.max_length} is not the static graph's "
                                    f"{section.max_length} tokens")
            self.npu = NpuEncoderExecutor(self.root, manifest, section)
            produced = {o for p in section.graph.partitions for o in p.outputs}
            missing = [n for n in self._fetch if n not in produced]
            if missing:
                raise ArtifactError(f"{where}: model: output {missing[0]!r} is not an output of the static graph")
            self.vocab_size = spec.vocab_size  # (the table is in one partition; the manifest bounds ids)
            self.providers = [self.npu.provider]
            self._tokenizer = None
            return
        if name != "onnxruntime":
            raise ArtifactError(f"{where}: backend: an encoder artifact runs on the onnxruntime or npu backend, "
                                f"got {name!r}"[:300])
        # no KV cache: no per-layer outputs (kv_outputs is empty)
        section = OnnxRuntimeBackend.from_dict(backend, 0, f"{where}: backend")
        self.session, graph = open_session(self.root, manifest, section)
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self._fetch if n not in outputs]
        if missing:
            raise ArtifactError(f"{where}: model: output {missing[0]!r} is not an output of {graph.name}")
        taken = sorted(i.name for i in self.session.get_inputs())
        if taken != sorted(spec.inputs):
            raise ArtifactError(f"{where}: model.inputs {spec.inputs} are not the graph's inputs {taken}")
        try:  # token ids are bounded by the table the graph gathers from
            rows = embedding_rows(graph.read_bytes())
        except WireError as e:
            raise ArtifactError(f"{graph}: cannot read the embedding table's shape ({e})") from None
        if rows is not None and rows != spec.vocab_size:
            raise ArtifactError(f"{where}: model.vocab_size {spec.vocab_size} does not match the compiled "
                                f"embedding table's {rows} rows")
        self.vocab_size = rows or spec.vocab_size
        self.providers = self.session.get_providers()
        self._tokenizer = None

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def dim(self) -> int:
        return self.spec.hidden_size

    @property
    def tokenizer(self):
        """The artifact's tokenizer: truncation to max_length, no padding (batches pad themselves)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(artifact_file(self.root, self.manifest, self.manifest["tokenizer"])))
            tok.no_padding()
            tok.enable_truncation(self.spec.max_length)
            self._tokenizer = tok
        return self._tokenizer

    # -- forward -----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 [len(texts), longest], right-padded."""
        encs = self.tokenizer.encode_batch(list(texts))
        n = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), n), self.spec.pad_token_id, np.int64)
        mask = np.zeros((len(encs), n), np.int64)
        for i, e in enumerate(encs):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        return ids, mask

    def hidden(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hidden rows [B, rows, hidden], pooling weights [B, rows]) of one padded batch."""
        ids, mask = np.asarray(ids), np.asarray(mask)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise InvalidValue(f"input_ids and attention_mask must be [batch, sequence] of one shape, got "
                               f"{ids.shape} and {mask.shape}")
        if not np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_:
            raise InvalidType(f"token ids must be integers, got {ids.dtype} values")
        if ids.shape[1] == 0 or ids.shape[1] > self.spec.max_length:
            raise InvalidValue(f"sequence length {ids.shape[1]}: 1..{self.spec.max_length} tokens")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise InvalidValue(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        feeds = {INPUT_IDS: ids.astype(np.int64), ATTENTION_MASK: mask.astype(np.int64)}
        if TOKEN_TYPE_IDS in self.spec.inputs:
            feeds[TOKEN_TYPE_IDS] = np.zeros_like(feeds[INPUT_IDS])
        if self.npu is not None:
            out = self.npu.run(feeds, self._fetch, self.spec.pad_token_id)
        else:
            out = self.session.run(self._fetch, feeds)
        weights = out[1] if len(out) > 1 else feeds[ATTENTION_MASK]
        return out[0], np.asarray(weights, np.float32)

    def embed_ids(self, ids: np.ndarray, mask: np.ndarray, normalize: bool | None = None) -> np.ndarray:
        """Pooled embeddings [B, hidden] float32 of one padded batch of token ids."""
        h, w = self.hidden(ids, mask)
        e = (h * w[..., None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1e-9)
        if self.spec.normalize if normalize is None else normalize:
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return e.astype(np.float32)

    def embed(self, texts, batch_size: int = 32, normalize: bool | None = None) -> np.ndarray:
        """One embedding per text, float32 [len(texts), hidden] (L2-normalised when the model's
        pooling says so, or as `normalize` says), in batches of `batch_size` texts, in order."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
            raise InvalidType(f"embed: a list of texts, got {type(texts).__name__}")
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise InvalidType(f"embed: every text must be a str, got {type(bad).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidValue(f"batch_size: a positive integer, got {batch_size!r}")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        parts = [self.embed_ids(*self.tokenize(texts[i:i + batch_size]), normalize=normalize)
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts)
