"""Why a window without sinks does or does not break a model: attention mass on the first token
per layer, and the perplexity of a window that has lost the sequence's first token.

    .venv/bin/python scripts/sink_analysis.py --hf models/pycoder-v2 --out docs/streaming/pycoder-v2

StreamingLLM (Xiao et al., 2023) finds that models put a large share of their attention on the
first tokens ("sinks"), and that window attention fails once they are evicted. optc's sink_window
numbers the cached keys by cache slot, so after the first tokens are evicted the oldest cached
token sits at position 0. This script measures, with the Hugging Face model (eager attention):

1. the attention mass on position 0, per layer (mean over heads and over queries 64..1023), for
   1024-token held-out windows (a) that start with BOS, (b) whose BOS is dropped (the file's first
   token at position 0) and (c) that start mid-file at position 0, without BOS;
2. the perplexity of the last 512 tokens of 1024-token chunks of the long stream
   (models/data/stream.txt), each chunk given (α) positions 0..1023 without BOS, as optc's
   sink_window without sinks sees it after eviction, (β) its positions in the stream (1024 and
   later), without BOS or any earlier token: StreamingLLM's window attention, and (γ) BOS at
   position 0 followed by the chunk at positions 1..1024.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

WINDOW = 1024
SCORED = 512
FIRST_QUERY = 64


@torch.no_grad()
def mass_on_first(model, ids: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]
    att = model(input_ids=x, output_attentions=True).attentions  # per layer: (1, heads, q, k)
    return np.array([float(a[0, :, FIRST_QUERY:, 0].mean()) for a in att])


@torch.no_grad()
def tail_nll(model, ids: list[int], positions: list[int]) -> float:
    x = torch.tensor([ids])
    logits = model(input_ids=x, position_ids=torch.tensor([positions])).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
    return float(nll[-SCORED:].mean())


def main() -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from eval_reference import long_windows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, default=ROOT / "models" / "pycoder-v2")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "streaming" / "pycoder-v2")
    ap.add_argument("--windows", type=int, default=6)
    args = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.hf, local_files_only=True, attn_implementation="eager").eval()
    tok = Tokenizer.from_file(str(args.hf / "tokenizer.json"))
    bos = model.config.bos_token_id
    wins = long_windows(tok)[: args.windows]
    masses = {
        "(a) BOS at position 0": np.mean([mass_on_first(model, w[:WINDOW]) for w in wins], axis=0),
        "(b) no BOS: the file's first token at position 0": np.mean(
            [mass_on_first(model, w[1:WINDOW + 1]) for w in wins], axis=0),
        "(c) no BOS: a mid-file token at position 0": np.mean(
            [mass_on_first(model, w[WINDOW - 1:2 * WINDOW - 1]) for w in wins], axis=0),
    }

    stream = tok.encode((ROOT / "models" / "data" / "stream.txt").read_text()).ids
    chunks = [stream[s:s + WINDOW] for s in range(WINDOW, len(stream) - WINDOW, WINDOW)][: 8]
    ppl = {
        "(α) positions 0..1023, no BOS (optc sink_window without sinks, after eviction)":
            [tail_nll(model, c, list(range(WINDOW))) for c in chunks],
        "(β) stream positions 1024+, no BOS (StreamingLLM's window attention)":
            [tail_nll(model, c, list(range(WINDOW, 2 * WINDOW))) for c in chunks],
        "(γ) BOS at position 0, the chunk at 1..1024":
            [tail_nll(model, [bos] + c, list(range(WINDOW + 1))) for c in chunks],
    }
    res = {"model": args.hf.name, "window": WINDOW, "scored": SCORED, "windows": len(wins), "chunks": len(chunks),
           "mass_on_position_0": {k: [round(float(v), 4) for v in m] for k, m in masses.items()},
           "ppl_last_512": {k: math.exp(float(np.mean(v))) for k, v in ppl.items()}}
    layers = len(next(iter(masses.values())))
    lines = [f"Attention mass on position 0 (mean over heads and queries {FIRST_QUERY}..{WINDOW - 1}; "
             f"{len(wins)} held-out {WINDOW}-token windows):", "",
             "| window | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
             "|---|" + "---|" * layers]
    lines += [f"| {k} | " + " | ".join(f"{v:.2f}" for v in m) + " |" for k, m in masses.items()]
    ref = res["ppl_last_512"]["(γ) BOS at position 0, the chunk at 1..1024"]
    lines += ["", f"Perplexity of the last {SCORED} tokens of {len(chunks)} {WINDOW}-token chunks of the stream:", "",
              "| chunk given | perplexity | vs (γ) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / ref - 1:+.1%} |" for k, v in res["ppl_last_512"].items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sinks.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "sinks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
