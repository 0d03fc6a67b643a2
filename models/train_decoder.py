"""Train optc's reference decoder: a ~5M-parameter Llama on the Python standard library.

    .venv/bin/python models/train_decoder.py            # ~25 min on a 2-core machine
    .venv/bin/python models/train_decoder.py --steps 20 --out /tmp/quick   # smoke run

Writes a Hugging Face directory (config, safetensors, tokenizer, generation config, model card,
loss curve) and the committed evaluation data under models/data/. Seeds are fixed: a rerun on
the same Python version reproduces the same corpus, tokenizer and (within float noise) losses.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from corpus import EOT, SourceFile, corpus  # noqa: E402
from eval_data import write_eval_data  # noqa: E402

SEED = 0
VOCAB = 4096
CONTEXT = 512

MODEL_KW = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,  # grouped-query attention: 4 query heads share each KV head
    max_position_embeddings=CONTEXT,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)

# No trailing newline: byte-level BPE merges a newline with the next line's indentation, so a
# prompt ending in a bare "\n" asks for the rare "newline then column 0" continuation.
SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\n\ndef list_files(path):",
]


def train_tokenizer(train: list[SourceFile]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.text for f in train), trainer=trainer)
    return tok


def encode_stream(tok: Tokenizer, files: list[SourceFile]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch([f.text for f in files]):
        ids.append(eot)
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.int64)


def unigram_ppl(train_ids: np.ndarray, eval_ids: list[np.ndarray]) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens."""
    counts = np.bincount(train_ids, minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([w[1:] for w in eval_ids])
    return float(np.exp(-logp[targets].mean()))


@torch.no_grad()
def model_ppl(model, windows: list[np.ndarray]) -> float:
    model.eval()
    nll, n = 0.0, 0
    for w in windows:
        x = torch.from_numpy(w)[None]
        logits = model(input_ids=x).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += len(w) - 1
    model.train()
    return math.exp(nll / n)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def generate_samples(model, tok: Tokenizer) -> list[dict]:
    samples = []
    model.eval()
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        torch.manual_seed(SEED + i)
        ids = torch.tensor([[0] + tok.encode(prompt).ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                             do_sample=True, temperature=0.8, top_k=40, top_p=0.95, pad_token_id=0)
        samples.append({"prompt": prompt, "completion": tok.decode(out[0, ids.shape[1]:].tolist())})
    return samples


def rewrite_card(out: Path) -> None:
    """Regenerate samples and the model card from a trained directory (no training)."""
    from transformers import AutoModelForCausalLM

    from model_card import write_card

    report = json.loads((out / "training_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    report["samples"] = generate_samples(model, Tokenizer.from_file(str(out / "tokenizer.json")))
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_card(out, report)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "pycoder-5m")
    ap.add_argument("--data-out", type=Path, default=HERE / "data")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--card-only", action="store_true", help="regenerate samples + model card of --out, no training")
    args = ap.parse_args()
    if args.card_only:
        rewrite_card(args.out)
        return

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(SEED)
    t_start = time.time()

    split = corpus()
    print(f"corpus: {len(split['train'])} train files, {len(split['heldout'])} held-out files "
          f"(Python {platform.python_version()} stdlib + pydoc topics)")
    tok = train_tokenizer(split["train"])
    train_ids = encode_stream(tok, split["train"])
    print(f"tokenizer: BPE vocab {tok.get_vocab_size()}; {len(train_ids):,} training tokens")

    eval_docs = write_eval_data(tok, split, args.data_out)
    heldout_windows = eval_docs["heldout_windows"]

    config = LlamaConfig(**MODEL_KW)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, context {CONTEXT}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    log: list[dict] = []
    tokens_seen = 0
    t_train = time.time()
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=args.steps, loss=float("nan"), tps=0.0)
        for step in range(args.steps):
            starts = rng.integers(0, len(train_ids) - CONTEXT - 1, size=args.batch)
            x = torch.from_numpy(np.stack([train_ids[s:s + CONTEXT] for s in starts]))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.lr, warmup)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += x.numel()
            entry = {"step": step + 1, "loss": round(loss.item(), 4), "tokens": tokens_seen}
            if (step + 1) % 100 == 0 or step + 1 == args.steps:
                entry["heldout_ppl"] = round(model_ppl(model, heldout_windows[:8]), 3)
            log.append(entry)
            tps = tokens_seen / (time.time() - t_train)
            progress.update(task, advance=1, loss=loss.item(), tps=tps)
            if not progress.console.is_terminal and ((step + 1) % 50 == 0 or "heldout_ppl" in entry):
                # a log file gets plain lines instead of the live bar
                print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} {tps:,.0f} tok/s"
                      + (f" held-out ppl {entry['heldout_ppl']}" if "heldout_ppl" in entry else ""), flush=True)
    train_seconds = time.time() - t_train

    final_ppl = model_ppl(model, heldout_windows)
    uni_ppl = unigram_ppl(train_ids, heldout_windows)
    print(f"held-out perplexity {final_ppl:.2f} vs unigram baseline {uni_ppl:.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "eager"
    model.save_pretrained(args.out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=None,
                                   model_max_length=CONTEXT)
    fast.save_pretrained(args.out)
    gen = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=True,
                           temperature=0.8, top_k=40, top_p=0.95, max_new_tokens=64)
    gen.save_pretrained(args.out)

    samples = generate_samples(model, tok)

    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seed": SEED,
        "steps": args.steps,
        "batch": args.batch,
        "context": CONTEXT,
        "peak_lr": args.lr,
        "parameters": n_params,
        "train_files": len(split["train"]),
        "heldout_files": len(split["heldout"]),
        "train_tokens_available": int(len(train_ids)),
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "heldout_eval_tokens": int(sum(len(w) - 1 for w in heldout_windows)),
        "heldout_ppl": round(final_ppl, 3),
        "unigram_ppl": round(uni_ppl, 3),
        "samples": samples,
        "log": log,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    from model_card import write_card

    write_card(args.out, report)
    print(f"wrote {args.out} in {report['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
