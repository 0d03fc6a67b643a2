"""Compile-time verification: does the artifact still compute what the original graph computed?

The artifact runs through the real runtime (prefill of the prompt head, then token-by-token
decode of the tail, so KV-cache handling is exercised); the reference is ONNX Runtime on the
original, unmodified graph running the whole window at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optc.config import VerifyBudget
from optc.errors import VerificationError
from optc.runtime.manifest import ATTENTION_MASK, INPUT_IDS, KV_KINDS, POSITION_IDS, past_name


def token_windows(tokenizer, texts: list[str], bos: int | None, *, count: int, length: int) -> list[np.ndarray]:
    windows = []
    for enc in tokenizer.encode_batch(texts):
        ids = ([bos] if bos is not None else []) + enc.ids
        if len(ids) >= length:
            windows.append(np.asarray(ids[:length], dtype=np.int64))
        if len(windows) == count:
            break
    if not windows:
        raise VerificationError(f"no evaluation document has {length} tokens")
    return windows


class ReferenceModel:
    """ONNX Runtime on an ONNX decoder in the common layout, full window, empty cache."""

    def __init__(self, onnx_path: Path, info):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.info = info
        self.inputs = {i.name for i in self.session.get_inputs()}
        # an fp16/bf16 export takes its cache in its own precision (the artifact computes in float32)
        kinds = {i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}
        self.cache_dtype = np.float16 if kinds == {"tensor(float16)"} else np.float32

    def logits(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        feeds = {INPUT_IDS: ids.reshape(1, n), ATTENTION_MASK: np.ones((1, n), np.int64)}
        if POSITION_IDS in self.inputs:
            feeds[POSITION_IDS] = np.arange(n, dtype=np.int64).reshape(1, n)
        empty = np.zeros((1, self.info.kv_heads, 0, self.info.head_dim), self.cache_dtype)
        for i in range(self.info.n_layers):
            for kind in KV_KINDS:
                feeds[past_name(i, kind)] = empty
        return self.session.run(["logits"], feeds)[0][0].astype(np.float32)


def artifact_logits(model, ids: np.ndarray, decode_tokens: int) -> np.ndarray:
    """Logits for every position: prefill of ids[:-decode_tokens], then one decode step per token."""
    model.reset()
    head = len(ids) - decode_tokens
    rows = [model.prefill(ids[:head], all_logits=True)]
    for t in ids[head:]:
        rows.append(model.decode(int(t))[None])
    return np.concatenate(rows)


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def compare(model, reference: ReferenceModel, windows: list[np.ndarray], decode_tokens: int = 16) -> dict:
    nll_a = nll_r = 0.0
    count = agree = positions = 0
    max_diff = 0.0
    for ids in windows:
        ref = reference.logits(ids)
        got = artifact_logits(model, ids, decode_tokens)
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += len(ids)
        a, n = _nll(got, ids)
        r, _ = _nll(ref, ids)
        nll_a, nll_r, count = nll_a + a, nll_r + r, count + n
    ppl_a, ppl_r = float(np.exp(nll_a / count)), float(np.exp(nll_r / count))
    return {
        "prompts": len(windows),
        "tokens": positions,
        "decode_tokens_per_prompt": decode_tokens,
        "perplexity_original": _round(ppl_r),
        "perplexity_artifact": _round(ppl_a),
        "perplexity_increase": _round(ppl_a / ppl_r - 1.0),
        "top1_agreement": _round(agree / positions),
        "max_abs_logit_diff": _round(max_diff),
    }


CONTINUATION_TOKENS = 64


def compare_continuation(model, reference: ReferenceModel, windows: list[np.ndarray],
                         continuation: int = CONTINUATION_TOKENS) -> dict:
    """How a pipeline that drops prompt tokens (token_dropping mode prefill) is judged: each window
    is a prompt plus the `continuation` tokens that follow it. The artifact prefills the prompt
    (dropping what it drops) and then decodes the continuation teacher-forced; the perplexity of
    those tokens is compared with ONNX Runtime's on the original graph over the whole window."""
    nll_a = nll_r = 0.0
    count = agree = 0
    max_diff = 0.0
    for ids in windows:
        head = len(ids) - continuation
        ref = reference.logits(ids)[head - 1:-1]          # the rows predicting ids[head:]
        model.reset()
        rows = [model.prefill(ids[:head])[None]]
        for t in ids[head:-1]:
            rows.append(model.decode(int(t))[None])
        got = np.concatenate(rows)
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        # _nll scores row j against ids[j + 1]: one unused row after the continuation's rows
        a, n = _nll(np.vstack([got, got[-1:]]), ids[head - 1:])
        r, _ = _nll(np.vstack([ref, ref[-1:]]), ids[head - 1:])
        nll_a, nll_r, count = nll_a + a, nll_r + r, count + n
    ppl_a, ppl_r = float(np.exp(nll_a / count)), float(np.exp(nll_r / count))
    return {
        "prompts": len(windows),
        "tokens": sum(len(w) for w in windows),
        "continuation_tokens_per_prompt": continuation,
        "perplexity_original": _round(ppl_r),
        "perplexity_artifact": _round(ppl_a),
        "perplexity_increase": _round(ppl_a / ppl_r - 1.0),
        "top1_agreement": _round(agree / count),
        "max_abs_logit_diff": _round(max_diff),
    }


def check_budget(report: dict, budget: VerifyBudget) -> list[str]:
    failures = []
    if budget.max_perplexity_increase is not None and report["perplexity_increase"] > budget.max_perplexity_increase:
        failures.append(f"perplexity increase {report['perplexity_increase']:+.2%} > "
                        f"budget {budget.max_perplexity_increase:+.2%}")
    if budget.min_top1_agreement is not None and report["top1_agreement"] < budget.min_top1_agreement:
        failures.append(f"top-1 agreement {report['top1_agreement']:.2%} < budget {budget.min_top1_agreement:.2%}")
    if budget.max_abs_logit_diff is not None and report["max_abs_logit_diff"] > budget.max_abs_logit_diff:
        failures.append(f"max |Δlogit| {report['max_abs_logit_diff']:.3g} > budget {budget.max_abs_logit_diff:.3g}")
    return failures


# ---------------------------------------------------------------- encoders
ENCODER_BATCH = 8  # texts per batch (the bench's size: with token dropping, a batch's padded length sets k)


def read_pairs(path) -> list[tuple[str, str]]:
    """(query, document) pairs from a .jsonl file ({"query": ..., "document": ...} per line):
    an encoder's held-out verification set (default models/data/encoder_pairs.jsonl)."""
    import json

    from optc.data import DATA_DIR
    from optc.errors import OptcError

    path = Path(path) if path else DATA_DIR / "encoder_pairs.jsonl"
    if not path.is_file():
        raise OptcError(f"{path}: encoder evaluation pairs not found (pass --eval-text FILE.jsonl with 'query' and "
                        f"'document' per line)")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q, d = row["query"], row["document"]
        except (ValueError, KeyError, TypeError):
            raise OptcError(f"{path}:{n}: expected a JSON object with 'query' and 'document' (an encoder is "
                            f"verified on query/document pairs)") from None
        if not isinstance(q, str) or not isinstance(d, str):
            raise OptcError(f"{path}:{n}: 'query' and 'document' must be text")
        pairs.append((q, d))
    if len(pairs) < 2:
        raise OptcError(f"{path}: at least two query/document pairs are needed (retrieval ranks the documents)")
    return pairs


class EncoderReference:
    """ONNX Runtime on the original encoder graph; mean pooling over the attention mask."""

    def __init__(self, onnx_path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        h = self.session.run(None, feeds)[0]
        m = mask[..., None].astype(np.float32)
        return ((h * m).sum(1) / np.maximum(m.sum(1), 1e-9)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def compare_embeddings(model, reference: EncoderReference, pairs: list[tuple[str, str]],
                       batch: int = ENCODER_BATCH, short_texts: list[str] | None = None) -> dict:
    """Pooled-embedding cosine of the artifact (the runtime's EncoderModel) to the original graph
    on every query and document, and retrieval: each query ranks every document by cosine; the
    agreement is how often the artifact's top-1 document is the original's. `short_texts` (one
    sentence each, embedded one at a time) are reported beside, unbudgeted: token dropping keeps a
    share of each input's tokens, which costs short inputs far more than the passages."""
    def both(texts):
        got, ref = [], []
        for i in range(0, len(texts), batch):
            ids, mask = model.tokenize(texts[i:i + batch])  # the same tokens for both
            got.append(model.embed_ids(ids, mask, normalize=True))
            ref.append(_unit(reference.embed_ids(ids, mask)))
        return np.concatenate(got), np.concatenate(ref)

    qa, qr = both([q for q, _ in pairs])
    da, dr = both([d for _, d in pairs])
    cos = np.concatenate([(qa * qr).sum(1), (da * dr).sum(1)])
    top_a, top_r = (qa @ da.T).argmax(1), (qr @ dr.T).argmax(1)
    truth = np.arange(len(pairs))
    short = {}
    if short_texts:
        sa, sr = zip(*(both([t]) for t in short_texts))
        c = (np.concatenate(sa) * np.concatenate(sr)).sum(1)
        short = {"short_texts": len(short_texts), "short_cosine_mean": _round(float(c.mean())),
                 "short_cosine_min": _round(float(c.min()))}
    return {
        "pairs": len(pairs),
        "texts": 2 * len(pairs),
        "batch": batch,
        "embedding_cosine_mean": _round(float(cos.mean())),
        "embedding_cosine_min": _round(float(cos.min())),
        "retrieval_agreement": _round(float((top_a == top_r).mean())),
        "retrieval_top1_original": _round(float((top_r == truth).mean())),
        "retrieval_top1_artifact": _round(float((top_a == truth).mean())),
        **short,
    }


def check_encoder_budget(report: dict, budget: VerifyBudget) -> list[str]:
    failures = []
    if budget.min_embedding_cosine is not None and report["embedding_cosine_mean"] < budget.min_embedding_cosine:
        failures.append(f"pooled-embedding cosine {report['embedding_cosine_mean']:.4f} < budget "
                        f"{budget.min_embedding_cosine:.4f}")
    if budget.min_retrieval_agreement is not None and report["retrieval_agreement"] < budget.min_retrieval_agreement:
        failures.append(f"retrieval top-1 agreement {report['retrieval_agreement']:.2%} < budget "
                        f"{budget.min_retrieval_agreement:.2%}")
    return failures


def format_encoder_report(r: dict, budget: VerifyBudget | None = None) -> str:
    def limit(v, fmt):
        return f"   (budget ≥ {fmt.format(v)})" if v is not None else ""

    b = budget or VerifyBudget()
    rows = [
        ("pooled-embedding cosine, mean", f"{r['embedding_cosine_mean']:.4f}"
                                          + limit(b.min_embedding_cosine, "{:.4f}")),
        ("pooled-embedding cosine, min", f"{r['embedding_cosine_min']:.4f}"),
        ("retrieval top-1 agreement", f"{r['retrieval_agreement']:.2%}" + limit(b.min_retrieval_agreement, "{:.2%}")),
        ("retrieval top-1 (original → artifact)", f"{r['retrieval_top1_original']:.2%} → "
                                                  f"{r['retrieval_top1_artifact']:.2%}"),
    ]
    if "short_cosine_mean" in r:
        rows.append((f"short sentences ({r['short_texts']}, one at a time), cosine mean / min",
                     f"{r['short_cosine_mean']:.4f} / {r['short_cosine_min']:.4f}   (reported, not budgeted)"))
    width = max(len(k) for k, _ in rows)
    return (f"verification ({r['pairs']} query/document pairs, {r['texts']} texts, batches of {r['batch']}):\n"
            + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
