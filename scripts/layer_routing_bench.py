"""layer_routing on a decoder (pycoder-v2), measured. Prints Markdown tables.

    flock /tmp/optc-bench.lock .venv/bin/python scripts/layer_routing_bench.py [--hf models/pycoder-v2]
        [--onnx PATH] [--prompt 1984] [--windows 12] [--rounds 3] [--oracle K]

Every row is a compiled artifact run by optc.runtime (ONNX Runtime CPU). Each held-out window
(models/data/heldout_2k.jsonl) is a prompt plus the 64 tokens after it: the artifact prefills the
prompt (every layer runs, and per_prompt routing ranks the layers there), then decodes the 64
tokens teacher-forced with its layers skipped; perplexity of those tokens against the dense
artifact on the same windows. Decode speed: ms per decode step over the 64 steps after a prompt,
median over interleaved rounds; against the dense artifact optc ships (the fused
GroupQueryAttention path, which routed artifacts also run: GQA inside each routed layer's If) and
the dense generic graph (`--no-fused-attention`).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import numpy as np

from token_dropping_bench import CONTINUATION, _builder, _nll, continuation_rows

SKIPS = (0, 1, 2, 3, 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, default=Path("models/pycoder-v2"))
    ap.add_argument("--onnx", type=Path, help="its `optc export` (exported into a temporary folder if not given)")
    ap.add_argument("--prompt", type=int, default=1984)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timed", type=int, default=2, help="prompts whose decode is timed per setting and round")
    ap.add_argument("--oracle", type=int, default=0, metavar="K",
                    help="instead: the continuation perplexity of every fixed set of up to K skipped layers (what the "
                         "best choice could reach; no timing)")
    args = ap.parse_args()
    if args.oracle:
        return oracle(args)

    from optc.data import DATA_DIR, read_texts
    from optc.verify import token_windows

    with tempfile.TemporaryDirectory(prefix="optc-lr-bench-") as tmp:
        build = _builder(args, Path(tmp))
        dense = build("dense")
        generic = build("generic", fused_attention=False)
        models = {}
        for mode in ("per_prompt", "static"):
            for k in SKIPS:
                if mode == "static" and k == 0:
                    continue
                models[(mode, k)] = build(f"{mode}_{k}", [{"name": "layer_routing", "mode": mode, "max_skip": k}])
        windows = token_windows(dense.tokenizer, read_texts(DATA_DIR / "heldout_2k.jsonl"),
                                dense.config.get("bos_token_id"), count=args.windows, length=args.prompt + CONTINUATION)
        targets = [w[args.prompt:] for w in windows]
        ref = [continuation_rows(dense, w) for w in windows]
        nll_ref = np.concatenate([_nll(r, t) for r, t in zip(ref, targets)])
        ppl_ref = float(np.exp(nll_ref.mean()))
        acc, chosen = {}, {}
        for key, m in models.items():
            rows, sets = [], collections.Counter()
            for w in windows:
                rows.append(continuation_rows(m, w))
                sets[tuple(m.skipped_layers)] += 1
            nll = np.concatenate([_nll(r, t) for r, t in zip(rows, targets)])
            agree = np.mean(np.concatenate([r.argmax(1) == q.argmax(1) for r, q in zip(rows, ref)]))
            acc[key], chosen[key] = (float(np.exp(nll.mean())), float(agree)), sets
        # decode speed: the CONTINUATION steps after each timed prompt, every artifact in every round
        timed = {"dense": dense, "generic": generic, **models}
        per_step = {k: [] for k in timed}
        for _ in range(args.rounds):
            for key, m in timed.items():
                for w in windows[:args.timed]:
                    m.reset()
                    m.prefill(w[:args.prompt])
                    t0 = time.perf_counter()
                    for t in w[args.prompt:-1]:
                        m.decode(int(t))
                    per_step[key].append((time.perf_counter() - t0) / (CONTINUATION - 1))
        ms = {k: 1000 * float(np.median(v)) for k, v in per_step.items()}
        print(f"{args.hf.name}: {len(windows)} held-out windows of {args.prompt} prompt + {CONTINUATION} continuation "
              f"tokens; dense continuation perplexity {ppl_ref:.4f}; decode = ms per step over the {CONTINUATION - 1} "
              f"steps after a prompt, median of {args.rounds} rounds x {args.timed} prompts (all artifacts interleaved "
              f"per round); dense {ms['dense']:.2f} ms (fused GQA path), {ms['generic']:.2f} ms (generic graph)")
        print()
        print("| mode | max_skip | decode ms/step | speed-up vs dense | vs dense generic | continuation ppl | Δppl | "
              "top-1 agreement | layers skipped (windows) |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| dense | - | {ms['dense']:.2f} | 1.00x | {ms['generic'] / ms['dense']:.2f}x | {ppl_ref:.4f} | - | "
              f"100.0% | - |")
        for key in sorted(models, key=lambda k: (k[1], k[0])):
            mode, k = key
            ppl, agree = acc[key]
            sets = ", ".join(f"{list(s)}: {c}" for s, c in chosen[key].most_common(4))
            more = len(chosen[key]) - 4
            sets += f" (+{more} more sets)" if more > 0 else ""
            print(f"| {mode} | {k} | {ms[key]:.2f} | {ms['dense'] / ms[key]:.2f}x | {ms['generic'] / ms[key]:.2f}x | "
                  f"{ppl:.4f} | {ppl / ppl_ref - 1:+.2%} | {agree:.1%} | {sets} |")


def oracle(args) -> None:
    """Every fixed set of 1..K routable layers skipped at decode (an artifact with max_skip K whose
    choice after the prompt is overridden): the bound on what any routing score could reach."""
    import itertools

    from optc.data import DATA_DIR, read_texts
    from optc.verify import token_windows

    with tempfile.TemporaryDirectory(prefix="optc-lr-oracle-") as tmp:
        build = _builder(args, Path(tmp))
        dense, routed = build("dense"), build("routed", [{"name": "layer_routing", "max_skip": args.oracle}])
        windows = token_windows(dense.tokenizer, read_texts(DATA_DIR / "heldout_2k.jsonl"),
                                dense.config.get("bos_token_id"), count=args.windows, length=args.prompt + CONTINUATION)
        targets = [w[args.prompt:] for w in windows]

        def ppl(model):
            nll = np.concatenate([_nll(continuation_rows(model, w), t) for w, t in zip(windows, targets)])
            return float(np.exp(nll.mean()))

        ref = ppl(dense)
        forced: list[int] = []

        def route(_change):  # the set under test, whatever the prompt measured
            routed.skipped_layers = list(forced)
            routed.layers_run[:] = True
            routed.layers_run[forced] = False

        routed._route = route
        layers = routed.routing.layers
        print(f"{args.hf.name}: continuation perplexity over {len(windows)} windows of {args.prompt} + "
              f"{CONTINUATION} tokens with a fixed set of layers skipped at decode; dense {ref:.4f}")
        print()
        print("| layers skipped | continuation ppl | Δppl |")
        print("|---|---|---|")
        for k in range(1, args.oracle + 1):
            for skip in itertools.combinations(layers, k):
                forced[:] = skip
                p = ppl(routed)
                print(f"| {list(skip)} | {p:.4f} | {p / ref - 1:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
