"""Train pycoder-v2, optc's second reference decoder: an 8-layer Llama trained at a 2048-token
context on the stdlib plus the Python sources of the locked packages, until it uses its context.

    .venv/bin/python models/train_reference_v2.py                       # CPU, resumable, hours
    .venv/bin/python models/train_reference_v2.py --device cuda         # minutes on a GPU
    .venv/bin/python models/train_reference_v2.py --max-minutes 60      # stop (and checkpoint) after an hour
    .venv/bin/python models/train_reference_v2.py --tokens 2e5 --ckpt-dir /tmp/smoke --out /tmp/smoke/model

A run checkpoints every --ckpt-minutes, on SIGTERM/SIGINT and at --max-minutes into --ckpt-dir
(outside the work tree by default, so a long CPU run survives a fresh checkout) and resumes from
there when started again with the same settings. The batch of step s depends only on (seed, s),
so a resumed run sees the same data as an uninterrupted one.

The learning rate is warm-up, stable, decay ("WSD"): constant after the warm-up, linear decay to
zero over the last --decay-fraction of --tokens. The checkpoint taken when the decay starts is
kept as `stable.pt`: a later run can resume from it with a larger --tokens and decay again.

Training sequences start with the BOS token (`<|endoftext|>`, id 0) at a document start and pack
the following documents after it (StreamingLLM: sinks form on a token every sequence begins with).
The tokenizer is pycoder-5m's (vocab 4096), so perplexities of the two models are comparable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import signal
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SEED = 0
CONTEXT = 2048
TOKENIZER = HERE / "pycoder-5m" / "tokenizer.json"
# Held-out 2048-token windows scored during training (a small, fixed sample: the full
# evaluation is models/eval_reference.py).
MONITOR_WINDOWS = 6
# The stdlib is 4% of the characters but the text both models are compared on: sample its
# files 4x as often as a package file.
STDLIB_WEIGHT = 4.0

MODEL_KW = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,  # grouped-query attention: 4 query heads share each KV head
    max_position_embeddings=CONTEXT,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)


def default_ckpt_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "optc" / "train" / "pycoder-v2"


# ---------------------------------------------------------------- data


# Bump when the corpus rules (models/corpus_v2.py) or the stream layout change: the cached stream
# and the checkpoints are tied to this key.
CORPUS_VERSION = "v2.1"


def data_key() -> str:
    """What the tokenized corpus depends on: its frozen list of distributions, the Python
    version, the tokenizer and the corpus rules' version."""
    h = hashlib.sha256()
    h.update((HERE / "corpus_v2_sources.txt").read_bytes())
    h.update(platform.python_version().encode())
    h.update(TOKENIZER.read_bytes())
    h.update(CORPUS_VERSION.encode())
    return h.hexdigest()[:16]


def prepare_data(ckpt_dir: Path, log=print) -> dict:
    """Tokenize the corpus once (cached in ckpt_dir): the training stream, its document starts
    and sampling weights, the held-out monitor windows and the per-source counts."""
    cache = ckpt_dir / f"data-{data_key()}.npz"
    meta_path = cache.with_suffix(".json")
    if cache.is_file() and meta_path.is_file():
        d = np.load(cache)
        return {"stream": d["stream"], "starts": d["starts"], "weights": d["weights"],
                "monitor": d["monitor"], "meta": json.loads(meta_path.read_text())}

    from tokenizers import Tokenizer

    from corpus_v2 import corpus_v2, describe

    t0 = time.time()
    split, sources, origin = corpus_v2()
    log(f"corpus: {len(split['train'])} train files, {len(split['heldout'])} held-out files, "
        f"{len(sources)} sources ({time.time() - t0:.0f} s)")
    tok = Tokenizer.from_file(str(TOKENIZER))
    counts: dict[str, dict[str, int]] = {}
    pieces, starts, weights = [], [], []
    pos = 0
    train_enc = tok.encode_batch([f.text for f in split["train"]])
    for f, enc in zip(split["train"], train_enc):
        ids = [0] + enc.ids
        src = origin[f.relpath]
        c = counts.setdefault(src, {})
        c["train_files"] = c.get("train_files", 0) + 1
        c["train_tokens"] = c.get("train_tokens", 0) + len(enc.ids)
        pieces.append(np.asarray(ids, dtype=np.uint16))
        starts.append(pos)
        weights.append(STDLIB_WEIGHT if src == "stdlib" else 1.0)
        pos += len(ids)
    held_enc = tok.encode_batch([f.text for f in split["heldout"]])
    monitor = []
    for f, enc in zip(split["heldout"], held_enc):
        c = counts.setdefault(origin[f.relpath], {})
        c["heldout_files"] = c.get("heldout_files", 0) + 1
        c["heldout_tokens"] = c.get("heldout_tokens", 0) + len(enc.ids)
        if len(enc.ids) >= CONTEXT and len(monitor) < MONITOR_WINDOWS and origin[f.relpath] != "stdlib":
            monitor.append([0] + enc.ids[:CONTEXT - 1])
    stream = np.concatenate(pieces)
    starts_a = np.asarray(starts, dtype=np.int64)
    ok = starts_a + CONTEXT <= len(stream)
    w = np.asarray(weights)[ok]
    meta = {"train_files": len(split["train"]), "heldout_files": len(split["heldout"]),
            "train_tokens": int(len(stream)), "sources": describe(split, sources, origin, counts),
            "stdlib_weight": STDLIB_WEIGHT, "key": data_key()}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".{cache.name}.tmp.npz"
    np.savez(tmp, stream=stream, starts=starts_a[ok], weights=w / w.sum(),
             monitor=np.asarray(monitor, dtype=np.int64))
    os.replace(tmp, cache)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"tokenized: {len(stream):,} training tokens ({time.time() - t0:.0f} s)")
    return {"stream": stream, "starts": starts_a[ok], "weights": w / w.sum(),
            "monitor": np.asarray(monitor, dtype=np.int64), "meta": meta}


def batch_at(step: int, data: dict, batch: int) -> torch.Tensor:
    """The batch of one step: BOS-led sequences from seeded document starts (depends on step only)."""
    rng = np.random.default_rng([SEED, step])
    picks = rng.choice(len(data["starts"]), size=batch, p=data["weights"])
    s = data["starts"][picks]
    rows = np.stack([data["stream"][i:i + CONTEXT] for i in s]).astype(np.int64)
    return torch.from_numpy(rows)


# ---------------------------------------------------------------- schedule


def lr_at(tokens: float, total: float, peak: float, warmup: float, decay_frac: float) -> float:
    if tokens < warmup:
        return peak * (tokens + 1) / warmup
    decay_start = total * (1 - decay_frac)
    if tokens < decay_start:
        return peak
    return peak * max(0.0, (total - tokens) / max(1.0, total - decay_start))


# ---------------------------------------------------------------- checkpoints


def save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def monitor_loss(model, windows: np.ndarray, device: str, amp: bool) -> float:
    model.eval()
    nll, n = 0.0, 0
    for w in windows:
        x = torch.from_numpy(w)[None].to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
    model.train()
    return nll / n


def use_bf16(device: str, precision: str) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device == "cuda":
        return True
    # CPUs with native bf16 dot products (AVX512-BF16 / AMX): measured 1.5x faster here.
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="bf16 autocast (fp32 master weights) on CUDA and on CPUs with bf16 dot products")
    ap.add_argument("--out", type=Path, default=HERE / "pycoder-v2", help="the Hugging Face model directory written at the end")
    ap.add_argument("--ckpt-dir", type=Path, default=default_ckpt_dir())
    ap.add_argument("--tokens", type=float, default=12e6, help="training tokens in all (sets the LR schedule)")
    ap.add_argument("--batch", type=int, default=4, help="sequences of 2048 tokens per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-tokens", type=float, default=1e6)
    ap.add_argument("--decay-fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this long")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between held-out monitor losses")
    ap.add_argument("--prepare-only", action="store_true", help="build and cache the tokenized corpus, then stop")
    args = ap.parse_args()

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.ckpt_dir)
    if args.prepare_only:
        return
    amp = use_bf16(args.device, args.precision)
    tokens_per_step = args.batch * CONTEXT
    total_steps = math.ceil(args.tokens / tokens_per_step)

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KW)).to(args.device)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    last = args.ckpt_dir / "last.pt"
    step, log, train_seconds = 0, [], 0.0
    if last.is_file():
        state = torch.load(last, map_location=args.device, weights_only=False)
        if state["data_key"] != data["meta"]["key"] or state["batch"] != args.batch:
            sys.exit(f"error: {last} was written for other data or another --batch; move it away to start afresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log, train_seconds = state["step"], state["log"], state["train_seconds"]
        print(f"resumed from {last} at step {step} ({step * tokens_per_step:,} tokens)")
    print(f"model: {n_params / 1e6:.2f}M parameters, context {CONTEXT}; {data['meta']['train_tokens']:,} "
          f"training tokens available; {total_steps} steps of {tokens_per_step:,} tokens; "
          f"{'bf16 autocast' if amp else 'fp32'} on {args.device} ({args.threads} threads)")

    def state_dict() -> dict:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                "train_seconds": train_seconds, "data_key": data["meta"]["key"], "batch": args.batch,
                "args": {k: str(v) for k, v in vars(args).items()}, "device": args.device, "amp": amp}

    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.__setitem__("signal", s))

    decay_start_step = math.ceil(args.tokens * (1 - args.decay_fraction) / tokens_per_step)
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    t_session = time.time()
    t_ckpt = time.time()
    session_tokens = 0
    model.train()
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=total_steps, completed=step, loss=float("nan"), tps=0.0)
        while step < total_steps:
            if step == decay_start_step and not (args.ckpt_dir / "stable.pt").exists():
                save_ckpt(args.ckpt_dir / "stable.pt", state_dict())
            t0 = time.time()
            x = batch_at(step, data, args.batch).to(args.device)
            lr = lr_at(step * tokens_per_step, args.tokens, args.lr, args.warmup_tokens, args.decay_fraction)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=amp):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            train_seconds += dt
            session_tokens += tokens_per_step
            entry = {"step": step, "tokens": step * tokens_per_step, "loss": round(loss.item(), 4),
                     "lr": lr, "grad_norm": round(float(gnorm), 3), "seconds": round(train_seconds, 1)}
            if step % args.eval_every == 0 or step == total_steps:
                entry["heldout_loss"] = round(monitor_loss(model, data["monitor"], args.device, amp), 4)
            log.append(entry)
            tps = session_tokens / (time.time() - t_session)
            progress.update(task, completed=step, loss=loss.item(), tps=tps)
            if not progress.console.is_terminal and (step % 25 == 0 or "heldout_loss" in entry):
                print(f"step {step}/{total_steps} tokens {step * tokens_per_step:,} loss {loss.item():.3f} "
                      f"lr {lr:.2e} {tps:,.0f} tok/s"
                      + (f" held-out loss {entry['heldout_loss']}" if "heldout_loss" in entry else ""), flush=True)
            out_of_time = args.max_minutes is not None and time.time() - t_session > 60 * args.max_minutes
            if stop["signal"] or out_of_time or time.time() - t_ckpt > 60 * args.ckpt_minutes:
                save_ckpt(last, state_dict())
                t_ckpt = time.time()
                if stop["signal"] or out_of_time:
                    why = f"signal {stop['signal']}" if stop["signal"] else f"--max-minutes {args.max_minutes}"
                    print(f"stopped ({why}) at step {step}; checkpoint {last}; run again to resume", flush=True)
                    return
    save_ckpt(last, state_dict())
    write_model(model, args, data, log, n_params, train_seconds, amp)


def write_model(model, args, data, log, n_params, train_seconds, amp) -> None:
    """The Hugging Face directory: config, safetensors, tokenizer, generation config, report."""
    from transformers import GenerationConfig

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").float()
    model.config._attn_implementation = "eager"
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HERE / "pycoder-5m" / f, out / f)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = CONTEXT
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=True, temperature=0.8,
                     top_k=40, top_p=0.95, max_new_tokens=64).save_pretrained(out)
    report = {
        "python": platform.python_version(), "torch": torch.__version__, "seed": SEED,
        "device": args.device, "threads": args.threads, "precision": "bf16 autocast" if amp else "fp32",
        "context": CONTEXT, "batch": args.batch, "tokens_per_step": args.batch * CONTEXT,
        "steps": log[-1]["step"], "tokens_seen": log[-1]["tokens"], "peak_lr": args.lr,
        "warmup_tokens": args.warmup_tokens, "decay_fraction": args.decay_fraction,
        "parameters": n_params, "train_seconds": round(train_seconds, 1),
        "corpus": data["meta"], "log": log,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}: {report['tokens_seen']:,} tokens in {train_seconds / 3600:.2f} h of training; "
          f"evaluate with models/eval_reference.py", flush=True)


if __name__ == "__main__":
    main()
