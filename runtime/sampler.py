"""Next-token sampling: temperature, top-k, top-p (nucleus), seeded. temperature 0 is greedy."""

from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> int:
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    order = np.argsort(-logits, kind="stable")
    if top_k and top_k < len(order):
        order = order[:top_k]
    kept = logits[order]
    probs = np.exp(kept - kept.max())
    probs /= probs.sum()
    if top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        order, probs = order[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
    return int(order[rng.choice(len(order), p=probs)])
