"""Write the small, committed evaluation texts under models/data/ (see models/data/README.md).

All texts come from the held-out split of the stdlib corpus (never trained on), except the
calibration set, which is training-split text: calibration may look like training data,
evaluation must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from corpus import EOT, SourceFile

CONTEXT = 512
HELDOUT_TOKENS = 24_000      # ~47 windows of 512 tokens for perplexity
STREAM_MIN_TOKENS = 12_000   # >= 8k tokens, comfortably past the 512-token trained context
CALIBRATION_DOCS = 32
CALIBRATION_CHARS = 4_000


def doc_windows(tok: Tokenizer, texts: list[str], context: int = CONTEXT) -> list[np.ndarray]:
    """Each document as [EOT] + tokens, cut into non-overlapping windows of <= context tokens."""
    eot = tok.token_to_id(EOT)
    out = []
    for enc in tok.encode_batch(texts):
        ids = [eot] + enc.ids
        for s in range(0, len(ids), context):
            w = ids[s:s + context]
            if len(w) >= 64:
                out.append(np.asarray(w, dtype=np.int64))
    return out


def write_eval_data(tok: Tokenizer, split: dict[str, list[SourceFile]], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    held = [f for f in split["heldout"] if f.relpath.endswith(".py")]
    ntok = {f.relpath: len(tok.encode(f.text).ids) for f in held}

    # The stream: the largest held-out modules, whole and in order, until >= STREAM_MIN_TOKENS.
    stream_files, total = [], 0
    for f in sorted(held, key=lambda f: (-ntok[f.relpath], f.relpath)):
        stream_files.append(f)
        total += ntok[f.relpath]
        if total >= STREAM_MIN_TOKENS:
            break
    stream_text = "\n\n".join(f.text for f in stream_files)
    (out / "stream.txt").write_text(stream_text, encoding="utf-8")
    (out / "stream_sources.json").write_text(json.dumps([f.relpath for f in stream_files], indent=1) + "\n")

    # Held-out perplexity documents: the remaining held-out files (plus held-out prose topics).
    used = {f.relpath for f in stream_files}
    docs, total = [], 0
    for f in split["heldout"]:
        if f.relpath in used:
            continue
        n = ntok.get(f.relpath) or len(tok.encode(f.text).ids)
        if n < 64:
            continue
        docs.append({"source": f.relpath, "text": f.text})
        total += min(n, 4 * CONTEXT)
        if total >= HELDOUT_TOKENS:
            break
    # Long files are capped at 4 windows so that no single module dominates the average.
    for d in docs:
        ids = tok.encode(d["text"]).ids
        if len(ids) > 4 * CONTEXT - 1:
            d["text"] = tok.decode(ids[:4 * CONTEXT - 1])
    with (out / "heldout.jsonl").open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")

    rng = np.random.default_rng(1)
    train_py = [f for f in split["train"] if f.relpath.endswith(".py") and len(f.text) > 1000]
    picks = sorted(rng.choice(len(train_py), size=CALIBRATION_DOCS, replace=False).tolist())
    with (out / "calibration.jsonl").open("w", encoding="utf-8") as fh:
        for i in picks:
            f = train_py[i]
            fh.write(json.dumps({"source": f.relpath, "text": f.text[:CALIBRATION_CHARS]}) + "\n")

    print(f"eval data: {len(docs)} held-out docs (~{total} tokens), stream {len(stream_files)} files "
          f"({sum(ntok[f.relpath] for f in stream_files)} tokens), {CALIBRATION_DOCS} calibration docs")
    return {"heldout_windows": doc_windows(tok, [d["text"] for d in docs])}
