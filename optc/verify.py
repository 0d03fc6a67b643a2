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
