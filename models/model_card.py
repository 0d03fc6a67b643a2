"""Render the reference decoder's model card (README.md) and loss curve from its training report."""

from __future__ import annotations

from pathlib import Path


def plot_loss(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in report["log"]]
    loss = [e["loss"] for e in report["log"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, label="train loss (nats/token)")
    ev = [(e["step"], e["heldout_ppl"]) for e in report["log"] if "heldout_ppl" in e]
    if ev:
        import math

        ax.plot([s for s, _ in ev], [math.log(p) for _, p in ev], "o-", label="held-out loss (8 windows)")
    ax.axhline(__import__("math").log(report["unigram_ppl"]), color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("pycoder-5m training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png")
    plt.close(fig)


def write_card(out: Path, r: dict) -> None:
    plot_loss(out, r)
    samples = "\n\n".join(
        f"**Prompt** `{s['prompt']!r}`\n\n```python\n{s['prompt']}{s['completion']}\n```" for s in r["samples"]
    )
    text = f"""# pycoder-5m — optc's reference decoder

A {r['parameters'] / 1e6:.2f}M-parameter `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU, grouped-query
attention: 8 query heads over 2 KV heads, head dim 32, 6 layers, hidden 256, tied embeddings)
trained from scratch on this machine so that optc's lossy passes are judged on a model with real
attention patterns and a meaningful perplexity. It is a test subject, not a useful code model.

## Data
- Corpus: the Python {r['python']} standard-library sources (`*.py`, test suites, codec tables and
  GUI demos excluded) plus the interpreter's `pydoc_data` help topics — text every machine here has.
- Split **by file** (sha256 of the path): {r['train_files']} train files, {r['heldout_files']} held-out files.
- Tokenizer: byte-level BPE, vocab 4096, trained with `tokenizers` on the train split only;
  `<|endoftext|>` (id 0) separates documents and is the BOS/EOS token.
- {r['train_tokens_available']:,} training tokens available.

## Training
- {r['steps']} steps × batch {r['batch']} × {r['context']} tokens = {r['tokens_seen']:,} tokens
  (less than one epoch), AdamW (β=0.9/0.95, weight decay 0.1), peak LR {r['peak_lr']}, 5% warm-up,
  cosine to 10%, gradient clip 1.0, seed {r['seed']}, fp32, torch {r['torch']}.
- Wall time: {r['train_seconds'] / 60:.1f} min of training ({r['total_seconds'] / 60:.1f} min end to end)
  on 2 CPU cores.
- Reproduce: `.venv/bin/python models/train_decoder.py` (same Python version → same corpus).
  A from-scratch retrain on this machine (Python 3.11.7, torch 2.13.0 CPU, 2 threads)
  reproduced these weights bit for bit (docs/benchmarks.md).

![loss curve](loss_curve.png)

## Evaluation (held-out files, {r['heldout_eval_tokens']:,} predicted tokens, windows of ≤ {r['context']})

| model | perplexity |
|---|---|
| pycoder-5m | **{r['heldout_ppl']:.2f}** |
| unigram baseline (add-one, fitted on train tokens) | {r['unigram_ppl']:.2f} |

The held-out text is `models/data/heldout.jsonl`; `tests/models/test_reference_models.py` recomputes the
perplexity from the shipped weights.

## Samples (temperature 0.8, top-k 40, top-p 0.95, 64 new tokens)

{samples}
"""
    (out / "README.md").write_text(text, encoding="utf-8")
