"""Evaluate a reference decoder on what optc's context-reducing passes need it to do: use its
context, copy a repeated span, and model held-out Python.

    .venv/bin/python models/eval_reference.py models/pycoder-v2            # JSON + plot + card numbers
    .venv/bin/python models/eval_reference.py models/pycoder-5m --quick    # fewer windows
    .venv/bin/python models/eval_reference.py --make-data                  # (re)write models/data/heldout_2k.jsonl
    .venv/bin/python models/eval_reference.py --make-overlap               # (re)write models/data/train_overlap_v2.json

Measures (all on held-out files, never trained on):
- perplexity at 512-token windows on `models/data/heldout.jsonl` (pycoder-5m's held-out files) and
  at 2048-token windows on `models/data/heldout_2k.jsonl`;
- the **long-context gain**: the perplexity of the last 64 tokens of each 2048-token window given
  only the 64-127 tokens before them (plus the BOS token every sequence starts with, so that the
  ratio measures the context's content, not a missing sink), divided by the same with the whole window;
- **induction**: a span of 64 uniformly random token ids, seen once and repeated 1,000 tokens of
  held-out text later; the perplexity of the repeat's tokens 2-64 (its first token cannot be
  predicted), beside the first occurrence's;
- perplexity by position over the 2048-token windows (plot);
- samples, and the share of 20 sampled completions of held-out function headers that `ast.parse`
  accepts once cut at their last complete line.

**Contamination.** The held-out files were never trained on, but near-copies of some were: packages
vendor or adapt stdlib modules (joblib's loky carries a modified `concurrent/futures/process.py`),
transformers repeats code across model folders, httpcore generates its sync code from the async.
`--make-overlap` measures, for each held-out file, the share of its 24-token windows that occur
verbatim in pycoder-v2's training stream (`models/data/train_overlap_v2.json`). The perplexities
are also reported on the *clean* files (under 5%), and the goals are judged there.

Writes `<model>/eval.json` and `<model>/perplexity_by_position.png`. Per-window numbers are kept so
that tests/models/test_reference_models.py can recompute a few of them from the shipped weights.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))

LONG = 2048
SCORED = 64            # the long-context gain scores the last 64 tokens of a window
SHORT_CONTEXT = 64     # ... given 64-127 tokens of context (the 64 scored tokens' own prefix included)
SPAN = 64
GAP = 1000
HEADERS = 20
HEADER_NEW_TOKENS = 96
OVERLAP_NGRAM = 24          # a held-out file's n-grams found verbatim in the training stream...
CLEAN_BELOW = 0.05          # ... under this share: a clean file
OVERLAP_FILE = DATA / "train_overlap_v2.json"


# ---------------------------------------------------------------- data


def make_data(out: Path = DATA / "heldout_2k.jsonl", docs: int = 24, per_source: int = 2) -> None:
    """Held-out files of >= 2048 tokens (v2 split) in a seeded random order, at most `per_source`
    per source, each cut to the characters its first 2048 tokens need (+ a margin)."""
    from tokenizers import Tokenizer

    from corpus_v2 import corpus_v2

    tok = Tokenizer.from_file(str(HERE / "pycoder-5m" / "tokenizer.json"))
    split, _sources, origin = corpus_v2()
    held = [f for f in split["heldout"] if f.relpath.endswith(".py")]
    held = [held[i] for i in np.random.default_rng(2).permutation(len(held))]
    rows, used = [], {}
    for f, enc in zip(held, tok.encode_batch([f.text for f in held])):
        src = origin[f.relpath]
        if len(enc.ids) < LONG + 16 or used.get(src, 0) >= per_source:
            continue
        used[src] = used.get(src, 0) + 1
        end = enc.offsets[LONG + 8][1]
        rows.append({"source": f.relpath, "text": f.text[:end]})
        if len(rows) == docs:
            break
    with out.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"wrote {out}: {len(rows)} documents from {len(used)} sources")


def _ngram_hashes(ids: np.ndarray) -> np.ndarray:
    """A 64-bit polynomial hash of every OVERLAP_NGRAM-token window (wrapping arithmetic)."""
    a = np.asarray(ids, dtype=np.uint64)
    n = len(a) - OVERLAP_NGRAM + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    for i in range(OVERLAP_NGRAM):
        h = h * np.uint64(1000003) + a[i:n + i]
    return h


def make_overlap(out: Path = OVERLAP_FILE) -> None:
    """For every held-out text the evaluation uses, the share of its n-grams in the v2 training stream
    (the stream comes from the training script's cache, built on this machine if missing)."""
    from tokenizers import Tokenizer

    import train_reference_v2 as T

    data = T.prepare_data(T.default_ckpt_dir())
    train = np.unique(_ngram_hashes(data["stream"]))
    tok = Tokenizer.from_file(str(T.TOKENIZER))
    res: dict = {"ngram": OVERLAP_NGRAM, "corpus_key": data["meta"]["key"], "files": {}}
    for name, limit in (("heldout.jsonl", None), ("heldout_2k.jsonl", LONG - 1)):
        shares = {}
        for line in (DATA / name).read_text().splitlines():
            row = json.loads(line)
            h = _ngram_hashes(tok.encode(row["text"]).ids[:limit])
            j = np.minimum(np.searchsorted(train, h), len(train) - 1)
            shares[row["source"]] = round(float((train[j] == h).mean()) if len(h) else 0.0, 4)
        res["files"][name] = shares
        clean = sum(v < CLEAN_BELOW for v in shares.values())
        print(f"{name}: {clean}/{len(shares)} files clean (under {CLEAN_BELOW:.0%} of their "
              f"{OVERLAP_NGRAM}-grams in the training stream)")
    out.write_text(json.dumps(res, indent=1) + "\n")


def clean_sources(name: str) -> set[str] | None:
    if not OVERLAP_FILE.is_file():
        return None
    shares = json.loads(OVERLAP_FILE.read_text())["files"][name]
    return {k for k, v in shares.items() if v < CLEAN_BELOW}


def long_rows() -> list[dict]:
    return [json.loads(x) for x in (DATA / "heldout_2k.jsonl").read_text().splitlines()]


def long_windows(tok, rows: list[dict] | None = None) -> list[np.ndarray]:
    return [np.asarray([0] + tok.encode(r["text"]).ids[:LONG - 1], dtype=np.int64) for r in rows or long_rows()]


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def token_nll(model, ids: np.ndarray) -> np.ndarray:
    """-log p(ids[t+1] | ids[:t+1]) for every t (float64)."""
    x = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]
    logits = model(input_ids=x).logits[0, :-1].double()
    return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").numpy()


def ppl_512(model, tok) -> dict:
    """Perplexity over all of heldout.jsonl's 512-token windows, and over its clean files' alone."""
    from eval_data import doc_windows

    rows = [json.loads(x) for x in (DATA / "heldout.jsonl").read_text().splitlines()]
    per = {r["source"]: np.concatenate([token_nll(model, w) for w in doc_windows(tok, [r["text"]])])
           for r in rows}
    res = {"all": float(math.exp(np.concatenate(list(per.values())).mean())),
           "per_file": {k: float(math.exp(v.mean())) for k, v in per.items()}}
    clean = clean_sources("heldout.jsonl")
    if clean is not None:
        res["clean"] = float(math.exp(np.concatenate([v for k, v in per.items() if k in clean]).mean()))
        res["clean_files"] = len(clean)
    return res


def long_context(model, w: np.ndarray) -> dict:
    """Full-window and short-context NLL of the window's last 64 tokens, and its per-position NLL."""
    full = token_nll(model, w)
    short_ids = np.concatenate([[0], w[LONG - SCORED - SHORT_CONTEXT:]])
    short = token_nll(model, short_ids)
    return {"full_nll": float(full[-SCORED:].mean()), "short_nll": float(short[-SCORED:].mean()),
            "window_nll": float(full.mean()), "by_position": full}


def induction_trial(model, tok, seed: int, filler: np.ndarray, gap: int = GAP) -> dict:
    """[BOS] span <gap held-out tokens> span: NLL of the first occurrence and of the repeat."""
    rng = np.random.default_rng(seed)
    span = rng.integers(1, tok.get_vocab_size(), SPAN)
    ids = np.concatenate([[0], span, filler[:gap], span])
    nll = token_nll(model, ids)
    first = nll[1:SPAN]                 # span tokens 2..64 predicted (token 1 follows BOS)
    rep = nll[-(SPAN - 1):]             # the repeat's tokens 2..64
    return {"first_nll": float(first.mean()), "repeat_nll": float(rep.mean())}


def function_headers(n: int) -> list[str]:
    """`n` function headers (one line each, dedented) of the held-out 2k documents, taken
    round-robin: each document's first header, then each one's second, ..."""
    rows = [json.loads(x)["text"] for x in (DATA / "heldout_2k.jsonl").read_text().splitlines()]
    pat = re.compile(r"^\s*def \w+\(.*\).*:\s*$")
    per_doc = [[ln.strip() for ln in text.splitlines() if pat.match(ln) and "#" not in ln] for text in rows]
    heads = [h[k] for k in range(max(map(len, per_doc), default=0)) for h in per_doc if k < len(h)]
    return heads[:n]


def completion_parses(text: str) -> bool:
    cut = text[:text.rfind("\n")] if "\n" in text else text
    try:
        ast.parse(cut)
        return True
    except SyntaxError:
        return False


@torch.no_grad()
def sample(model, tok, prompt: str, seed: int, new_tokens: int) -> str:
    torch.manual_seed(seed)
    ids = torch.tensor([[0] + tok.encode(prompt).ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=True,
                         temperature=0.8, top_k=40, top_p=0.95, pad_token_id=0)
    return prompt + tok.decode(out[0, ids.shape[1]:].tolist())


SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\n\ndef list_files(path):",
]


def evaluate(model_dir: Path, quick: bool = False, log=print) -> dict:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    model.config._attn_implementation = "sdpa"
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ctx = model.config.max_position_embeddings
    res: dict = {"model": model_dir.name, "trained_context": ctx}

    p512 = ppl_512(model, tok)
    res["ppl_512"] = p512["all"]
    res["ppl_512_clean"] = p512.get("clean")
    res["ppl_512_per_file"] = p512["per_file"]
    log(f"held-out perplexity, 512-token windows (heldout.jsonl): {res['ppl_512']:.2f}"
        + (f"; on its {p512['clean_files']} clean files: {p512['clean']:.2f}" if "clean" in p512 else ""))

    rows = long_rows()[: 6 if quick else None]
    windows = long_windows(tok, rows)
    per = [long_context(model, w) for w in windows]
    for p, row in zip(per, rows):
        p["source"] = row["source"]
    res["ppl_2048"] = float(math.exp(np.mean([p["window_nll"] for p in per])))
    full = float(np.mean([p["full_nll"] for p in per]))
    short = float(np.mean([p["short_nll"] for p in per]))
    res["long_context"] = {"windows": len(per), "ppl_full": math.exp(full), "ppl_short": math.exp(short),
                           "gain": math.exp(short - full),
                           "per_window": [{"source": p["source"], "full_nll": p["full_nll"],
                                           "short_nll": p["short_nll"]} for p in per]}
    clean2k = clean_sources("heldout_2k.jsonl")
    if clean2k is not None:
        cp = [p for p in per if p["source"] in clean2k]
        cf, cs = float(np.mean([p["full_nll"] for p in cp])), float(np.mean([p["short_nll"] for p in cp]))
        res["long_context"]["clean"] = {"windows": len(cp), "gain": math.exp(cs - cf),
                                        "ppl_2048": math.exp(float(np.mean([p["window_nll"] for p in cp])))}
    log(f"held-out perplexity, 2048-token windows: {res['ppl_2048']:.2f}"
        + ("" if ctx >= LONG else f" (past the trained context {ctx})"))
    log(f"long-context gain (last 64 tokens, 64-127 tokens of context vs the whole window): "
        f"{res['long_context']['gain']:.3f} ({math.exp(short):.2f} / {math.exp(full):.2f})"
        + (f"; on the {res['long_context']['clean']['windows']} clean windows: "
           f"{res['long_context']['clean']['gain']:.3f}" if "clean" in res["long_context"] else ""))
    pos = np.mean([p["by_position"] for p in per], axis=0)
    res["ppl_by_position"] = {f"{lo}-{hi - 1}": math.exp(float(pos[lo:hi].mean()))
                              for lo, hi in [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1024), (1024, 2047)]}

    filler = np.concatenate(windows)[1:] if windows else np.zeros(GAP, np.int64)
    trials = [induction_trial(model, tok, seed, filler[seed * 37:]) for seed in range(4 if quick else 8)]
    res["induction"] = {"gap": GAP, "span": SPAN, "trials": trials,
                        "ppl_first": math.exp(np.mean([t["first_nll"] for t in trials])),
                        "ppl_repeat": math.exp(np.mean([t["repeat_nll"] for t in trials]))}
    log(f"induction: random 64-token span repeated {GAP} tokens later: perplexity "
        f"{res['induction']['ppl_first']:,.1f} first, {res['induction']['ppl_repeat']:,.2f} on the repeat")
    # How far copying reaches: the same trials with the repeat right after the span, and 100 later.
    res["induction_by_gap"] = {str(g): math.exp(np.mean([induction_trial(model, tok, seed, filler[seed * 37:], g)
                                                        ["repeat_nll"] for seed in range(4)]))
                               for g in (0, 100)}
    res["induction_by_gap"][str(GAP)] = res["induction"]["ppl_repeat"]
    log("induction by gap (repeat perplexity): " + ", ".join(f"{g}: {v:,.1f}" for g, v in res["induction_by_gap"].items()))

    heads = function_headers(HEADERS)
    comps = [sample(model, tok, h, i, HEADER_NEW_TOKENS) for i, h in enumerate(heads)]
    ok = [completion_parses(c) for c in comps]
    res["headers"] = {"n": len(heads), "parse_share": sum(ok) / max(1, len(ok)),
                      "completions": [{"header": h, "text": c, "parses": o} for h, c, o in zip(heads, comps, ok)]}
    log(f"held-out function headers whose sampled completion parses: {sum(ok)}/{len(ok)}")
    res["samples"] = [{"prompt": p, "completion": sample(model, tok, p, i, 64)[len(p):]}
                      for i, p in enumerate(SAMPLE_PROMPTS)]
    res["_by_position"] = pos.tolist()
    return res


def plot_by_position(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r in results:
        nll = np.asarray(r["_by_position"])
        k = 32
        smooth = np.convolve(nll, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k // 2, np.exp(smooth),
                label=f"{r['model']} (trained context {r['trained_context']})", lw=1)
        ax.axvline(r["trained_context"], color="gray", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("position in a 2048-token held-out window")
    ax.set_ylabel("perplexity (32-token moving average)")
    ax.set_title("Perplexity by position")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, help="Hugging Face model directories")
    ap.add_argument("--quick", action="store_true", help="6 windows and 4 induction trials")
    ap.add_argument("--make-data", action="store_true", help="write models/data/heldout_2k.jsonl from the v2 corpus")
    ap.add_argument("--make-overlap", action="store_true",
                    help="write models/data/train_overlap_v2.json (needs the v2 training corpus on this machine)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.make_data:
        make_data()
    if args.make_overlap:
        make_overlap()
    results = []
    for m in args.models:
        print(f"== {m}")
        r = evaluate(m, quick=args.quick)
        results.append(r)
        plot_by_position([r], m / "perplexity_by_position.png")
        (m / "eval.json").write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")},
                                                indent=1) + "\n")
    if len(results) > 1:
        # the first model's plot shows the others beside it (e.g. pycoder-v2 against pycoder-5m)
        plot_by_position(results, args.models[0] / "perplexity_by_position.png")


if __name__ == "__main__":
    main()
