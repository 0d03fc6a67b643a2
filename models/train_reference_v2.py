"""Train pycoder-v2, optc's second reference decoder: an 8-layer Llama trained at a 2048-token
context on the stdlib plus the Python sources of the locked packages, until it uses its context.

    .venv/bin/python models/train_reference_v2.py                       # CPU, resumable, hours
    .venv/bin/python models/train_reference_v2.py --device cuda         # minutes on a GPU
    .venv/bin/python models/train_reference_v2.py --max-minutes 60      # stop (and checkpoint) after an hour
    .venv/bin/python models/train_reference_v2.py --tokens 2e5 --ckpt-dir /tmp/smoke --out /tmp/smoke/model

On a borrowed GPU machine that cannot rebuild the corpus (no site-packages to read, no network):

    .venv/bin/python models/train_reference_v2.py --export-data .devdata     # here: ~30 MB, xz
    python3 models/train_reference_v2.py --data .devdata --device cuda --batch 32 \
        --tokens-for-minutes 7 --max-minutes 8 --write-model-on-stop --out $OUT/model   # there

--tokens-for-minutes times the first steps (inside the warm-up, whose learning rate does not depend
on the total) and then fixes --tokens to what fits; the run is then the same as one started with
that --tokens, which it prints so that it can be repeated.

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

Continuing the shipped model, with copying in the data (induction heads; see --repeat-share):

    .venv/bin/python models/train_reference_v2.py --init-from models/pycoder-v2 --repeat-share 0.5 \
        --lr 3e-4 --warmup-tokens 2e5 --tokens 4e6 --out ~/.cache/optc/pycoder-v2-induct \
        --ckpt-dir ~/.cache/optc/train/pycoder-v2-induct

--init-from DIR starts from a Hugging Face directory's weights (same architecture) with a fresh
optimizer and a fresh schedule (--lr, --warmup-tokens, --tokens count from that start).

--repeat-share F: in a share F of the training sequences, a span of that sequence's own code
(REPEAT_SPAN tokens, length drawn per sequence) is copied over the code that stands a gap later in
the same sequence (gap drawn per sequence, 0..REPEAT_MAX_GAP tokens), so that predicting the copy
rewards attending back to the first occurrence and reading on from there: the induction-head
mechanism (Olsson et al. 2022, "In-context learning and induction heads"). Only real code is
copied, never random token ids like the evaluation's induction test. The draws depend on
(seed, step, row) only; without the option the batches are exactly those of earlier versions.
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


def export_data(data: dict, out: Path, log=print) -> None:
    """Write the tokenized corpus as a portable bundle: the training stream xz-compressed (the
    uint16 stream is 162 MB raw, ~29 MB compressed), the index arrays and the corpus description."""
    import lzma

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tmp = out / ".stream.u16.xz.tmp"
    with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(np.ascontiguousarray(data["stream"], dtype="<u2").tobytes())
    os.replace(tmp, out / "stream.u16.xz")
    np.savez(out / "index.npz", starts=data["starts"], weights=data["weights"], monitor=data["monitor"])
    (out / "meta.json").write_text(json.dumps(data["meta"], indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    log(f"exported the corpus to {out} ({size:.1f} MiB, {time.time() - t0:.0f} s); "
        f"train elsewhere with --data {out}")


def load_data_bundle(src: Path) -> dict:
    """Read a bundle written by --export-data (its key is the machine that built it: the corpus
    depends on that machine's Python and packages, not on the one training)."""
    import lzma

    missing = [n for n in ("stream.u16.xz", "index.npz", "meta.json") if not (src / n).is_file()]
    if missing:
        sys.exit(f"error: --data {src}: not a corpus bundle (missing {', '.join(missing)}); "
                 f"write one with --export-data")
    with lzma.open(src / "stream.u16.xz", "rb") as f:
        stream = np.frombuffer(f.read(), dtype="<u2")
    idx = np.load(src / "index.npz")
    meta = json.loads((src / "meta.json").read_text())
    if len(stream) != meta["train_tokens"]:
        sys.exit(f"error: --data {src}: the stream holds {len(stream):,} tokens, meta.json says "
                 f"{meta['train_tokens']:,}")
    return {"stream": stream, "starts": idx["starts"], "weights": idx["weights"],
            "monitor": idx["monitor"], "meta": meta}


# How training sequences are cut from the stream (stored in checkpoints: a resumed run must
# sample as the run that wrote them did).
SAMPLING = "pieces-v1"


def add_pieces(data: dict) -> dict:
    """Cut every document into pieces of CONTEXT-1 tokens; a training sequence is BOS + one piece
    + whatever follows it in the stream (the next documents, each after its own BOS).

    Sampling only from document starts (the first version) trained on 20.3M of the 80.8M tokens:
    7,287 files are longer than the context, and only their first 2,048 tokens were ever seen.
    A piece other than a file's first starts mid-file, after BOS, so every sequence still begins
    with the BOS token at position 0, where StreamingLLM's sink forms. A piece is drawn with its
    file's weight (the stdlib's 4x), so the sampling is proportional to tokens, not files."""
    stream, starts, weights = data["stream"], data["starts"], data["weights"]
    ends = np.append(starts[1:], len(stream))
    pieces, piece_w = [], []
    for bos, end, w in zip(starts, ends, weights):
        at = np.arange(bos + 1, end, CONTEXT - 1)
        at = at[at + CONTEXT - 1 <= len(stream)]
        pieces.append(at)
        piece_w.append(np.full(len(at), w))
    data["pieces"] = np.concatenate(pieces)
    pw = np.concatenate(piece_w)
    data["piece_weights"] = pw / pw.sum()
    return data


def batch_at(step: int, data: dict, batch: int, repeat_share: float = 0.0) -> torch.Tensor:
    """The batch of one step: BOS + a seeded draw of pieces (depends on step only); with
    repeat_share, some rows carry a copy of one of their own spans (add_repeats)."""
    rng = np.random.default_rng([SEED, step])
    picks = rng.choice(len(data["pieces"]), size=batch, p=data["piece_weights"])
    rows = np.zeros((batch, CONTEXT), dtype=np.int64)  # column 0: BOS (id 0)
    for r, i in enumerate(data["pieces"][picks]):
        rows[r, 1:] = data["stream"][i:i + CONTEXT - 1]
    if repeat_share > 0:
        add_repeats(rows, step, repeat_share)
    return torch.from_numpy(rows)


# --repeat-share: the copied span's length and the gap between the span's end and its copy are
# drawn uniformly per sequence; the longest gap reaches past the evaluation's 1,000 tokens.
REPEAT_SPAN = (16, 128)
REPEAT_MAX_GAP = 1536
# Stored in checkpoints and the report (with the share): a resumed run must copy as its writer did.
REPEAT_VERSION = "repeat-v1"


def add_repeats(rows: np.ndarray, step: int, share: float) -> list[tuple[int, int, int, int]]:
    """In place: in each row chosen with probability `share`, copy rows[r, s:s+L] over
    rows[r, s+L+G : s+2L+G] (the row's own code, BOS at column 0 never touched). The draws come
    from their own generator, seeded by (seed, step, 1), so the pieces drawn for the step are
    those of a run without copies. Returns (row, start, length, gap) of each copy."""
    rng = np.random.default_rng([SEED, step, 1])
    done = []
    for r in range(rows.shape[0]):
        use, u_len, u_gap, u_start = rng.random(4)
        if use >= share:
            continue
        length = REPEAT_SPAN[0] + int(u_len * (REPEAT_SPAN[1] - REPEAT_SPAN[0] + 1))
        gap = int(u_gap * (REPEAT_MAX_GAP + 1))
        room = CONTEXT - 1 - (2 * length + gap)        # columns 1..CONTEXT-1 hold code
        start = 1 + int(u_start * (room + 1))
        rows[r, start + length + gap:start + 2 * length + gap] = rows[r, start:start + length]
        done.append((r, start, length, gap))
    return done


def sampling_id(repeat_share: float) -> str:
    return SAMPLING if not repeat_share else f"{SAMPLING}+{REPEAT_VERSION}:{repeat_share:g}"


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


# Induction monitor: the evaluation's test (models/eval_reference.py), a few fixed trials. A random
# 64-token span, 1,000 held-out tokens, the span again: the repeat's mean NLL falls towards 0 once
# induction heads form, so a run's log shows whether (and when) the model starts to copy.
INDUCTION_SPAN, INDUCTION_GAP, INDUCTION_TRIALS = 64, 1000, 3


@torch.no_grad()
def monitor_induction(model, windows: np.ndarray, device: str, amp: bool) -> float:
    model.eval()
    nll = []
    for trial in range(INDUCTION_TRIALS):
        span = np.random.default_rng(trial).integers(1, MODEL_KW["vocab_size"], INDUCTION_SPAN)
        filler = windows[trial % len(windows)][1:INDUCTION_GAP + 1]
        x = torch.from_numpy(np.concatenate([[0], span, filler, span]).astype(np.int64))[None].to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits[0, :-1].float()
        per_token = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        nll.append(per_token[-(INDUCTION_SPAN - 1):].mean().item())   # repeat tokens 2..64
    model.train()
    return float(np.mean(nll))


# With --repeat-share the log also shows the copying it trains, on held-out code: the induction
# monitor's layout with a 64-token span of held-out code (from another window than the filler's)
# in place of the random one; the repeat's NLL next to the first occurrence's.
@torch.no_grad()
def monitor_code_copy(model, windows: np.ndarray, device: str, amp: bool) -> tuple[float, float]:
    model.eval()
    first, rep = [], []
    for trial in range(INDUCTION_TRIALS):
        span = windows[(trial + 1) % len(windows)][1 + INDUCTION_GAP:1 + INDUCTION_GAP + INDUCTION_SPAN]
        filler = windows[trial % len(windows)][1:INDUCTION_GAP + 1]
        x = torch.from_numpy(np.concatenate([[0], span, filler, span]).astype(np.int64))[None].to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits[0, :-1].float()
        per_token = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        first.append(per_token[1:INDUCTION_SPAN].mean().item())        # span tokens 2..64
        rep.append(per_token[-(INDUCTION_SPAN - 1):].mean().item())
    model.train()
    return float(np.mean(first)), float(np.mean(rep))


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
    ap.add_argument("--export-data", type=Path, metavar="DIR",
                    help="write the tokenized corpus as a portable bundle (for a machine that cannot build it), then stop")
    ap.add_argument("--data", type=Path, metavar="DIR", help="train on a bundle written by --export-data")
    ap.add_argument("--tokens-for-minutes", type=float, metavar="M",
                    help="time the first steps, then set --tokens to what M minutes of training fit")
    ap.add_argument("--write-model-on-stop", action="store_true",
                    help="at --max-minutes or a signal, also write the model directory (marked as stopped early)")
    ap.add_argument("--init-from", type=Path, metavar="DIR",
                    help="start from this Hugging Face model directory's weights (same architecture; e.g. "
                         "models/pycoder-v2) with a fresh optimizer and schedule")
    ap.add_argument("--repeat-share", type=float, default=0.0, metavar="F",
                    help=f"in this share of training sequences, copy a {REPEAT_SPAN[0]}-{REPEAT_SPAN[1]}-token span "
                         f"of the sequence's own code 0-{REPEAT_MAX_GAP} tokens later in it (induction heads; "
                         f"real code only); default 0: no copies")
    args = ap.parse_args()
    if not 0.0 <= args.repeat_share <= 1.0:
        ap.error("--repeat-share must lie in [0, 1]")
    if args.init_from is not None and not (args.init_from / "config.json").is_file():
        ap.error(f"--init-from {args.init_from}: not a Hugging Face model directory (no config.json)")

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    data = load_data_bundle(args.data) if args.data else prepare_data(args.ckpt_dir)
    if args.export_data:
        export_data(data, args.export_data)
        return
    if args.prepare_only:
        return
    add_pieces(data)
    amp = use_bf16(args.device, args.precision)
    tokens_per_step = args.batch * CONTEXT
    total_steps = math.ceil(args.tokens / tokens_per_step)

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KW)).to(args.device)
    model.config._attn_implementation = "sdpa"
    if args.init_from is not None:
        init = LlamaForCausalLM.from_pretrained(args.init_from, local_files_only=True)
        shape = {k: v.shape for k, v in model.state_dict().items()}
        if {k: v.shape for k, v in init.state_dict().items()} != shape or any(
                getattr(init.config, k, None) != v for k, v in MODEL_KW.items() if k != "rope_theta"):
            sys.exit(f"error: --init-from {args.init_from}: another architecture than {MODEL_KW}")
        model.load_state_dict(init.state_dict())
        del init
        print(f"initialised from {args.init_from} (fresh optimizer and schedule)")
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=args.device == "cuda")

    last = args.ckpt_dir / "last.pt"
    step, log, train_seconds = 0, [], 0.0
    if last.is_file():
        state = torch.load(last, map_location=args.device, weights_only=False)
        if (state["data_key"] != data["meta"]["key"] or state["batch"] != args.batch
                or state.get("sampling") != sampling_id(args.repeat_share)
                or state.get("init_from") != (str(args.init_from) if args.init_from else None)):
            sys.exit(f"error: {last} was written for other data, another --batch, another sampling "
                     f"(--repeat-share) or another --init-from; "
                     f"move it away to start afresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log, train_seconds = state["step"], state["log"], state["train_seconds"]
        if state.get("tokens_fixed"):
            args.tokens, args.tokens_for_minutes = state["tokens_fixed"], None
            total_steps = math.ceil(args.tokens / tokens_per_step)
        print(f"resumed from {last} at step {step} ({step * tokens_per_step:,} tokens)")
    print(f"model: {n_params / 1e6:.2f}M parameters, context {CONTEXT}; {data['meta']['train_tokens']:,} "
          f"training tokens in {len(data['pieces']):,} pieces; {total_steps} steps of {tokens_per_step:,} tokens; "
          f"{'bf16 autocast' if amp else 'fp32'} on {args.device} ({args.threads} threads)")

    def state_dict() -> dict:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                "train_seconds": train_seconds, "data_key": data["meta"]["key"], "batch": args.batch,
                "sampling": sampling_id(args.repeat_share),
                **({"init_from": str(args.init_from)} if args.init_from else {}),
                "args": {k: str(v) for k, v in vars(args).items()}, "device": args.device, "amp": amp,
                "tokens_fixed": args.tokens if fixed["done"] else None}

    # --tokens-for-minutes: the schedule's total is fixed from the speed of steps timing_first..timing_last,
    # all inside the warm-up (whose learning rate does not depend on the total), so the run is
    # the one `--tokens <fixed>` would give.
    fixed = {"done": args.tokens_for_minutes is None, "t0": None}
    timing_first, timing_last = 5, 25
    if not fixed["done"] and args.warmup_tokens < (timing_last + 1) * tokens_per_step:
        sys.exit(f"error: --tokens-for-minutes times steps {timing_first}-{timing_last}, which must lie "
                 f"inside the warm-up: raise --warmup-tokens above {(timing_last + 1) * tokens_per_step:,}")

    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.__setitem__("signal", s))

    decay_start_step = math.ceil(args.tokens * (1 - args.decay_fraction) / tokens_per_step)
    if not fixed["done"]:
        total_steps = decay_start_step = 10**9  # placeholders until the timing steps have run
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    t_session = time.time()
    t_ckpt = time.time()
    session_tokens = 0
    model.train()
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=total_steps if fixed["done"] else None, completed=step, loss=float("nan"), tps=0.0)
        while step < total_steps:
            if step == decay_start_step and not (args.ckpt_dir / "stable.pt").exists():
                save_ckpt(args.ckpt_dir / "stable.pt", state_dict())
            t0 = time.time()
            x = batch_at(step, data, args.batch, args.repeat_share).to(args.device)
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
            if not fixed["done"] and step == timing_first:
                fixed["t0"] = time.time()
            elif not fixed["done"] and step == timing_last:
                per_step = (time.time() - fixed["t0"]) / (timing_last - timing_first)
                # 5% kept back for the held-out monitor, checkpoints and slower steps later on.
                steps = int(0.95 * 60 * args.tokens_for_minutes / per_step)
                args.tokens = float(max(steps, timing_last + 1) * tokens_per_step)
                if args.tokens * (1 - args.decay_fraction) <= args.warmup_tokens:
                    sys.exit(f"error: --tokens-for-minutes {args.tokens_for_minutes} fits only "
                             f"{args.tokens:,.0f} tokens, less than the warm-up and the decay need")
                total_steps = math.ceil(args.tokens / tokens_per_step)
                decay_start_step = math.ceil(args.tokens * (1 - args.decay_fraction) / tokens_per_step)
                fixed["done"] = True
                progress.update(task, total=total_steps)
                print(f"{per_step * 1000:.1f} ms/step: schedule fixed at --tokens {args.tokens:.0f} "
                      f"({total_steps} steps; repeat the run with that --tokens)", flush=True)
            dt = time.time() - t0
            train_seconds += dt
            session_tokens += tokens_per_step
            entry = {"step": step, "tokens": step * tokens_per_step, "loss": round(loss.item(), 4),
                     "lr": lr, "grad_norm": round(float(gnorm), 3), "seconds": round(train_seconds, 1)}
            if step % args.eval_every == 0 or step == total_steps:
                entry["heldout_loss"] = round(monitor_loss(model, data["monitor"], args.device, amp), 4)
                entry["induction_nll"] = round(monitor_induction(model, data["monitor"], args.device, amp), 4)
                if args.repeat_share:
                    c_first, c_rep = monitor_code_copy(model, data["monitor"], args.device, amp)
                    entry["code_copy_first_nll"], entry["code_copy_nll"] = round(c_first, 4), round(c_rep, 4)
            log.append(entry)
            tps = session_tokens / (time.time() - t_session)
            progress.update(task, completed=step, loss=loss.item(), tps=tps)
            if not progress.console.is_terminal and (step % 25 == 0 or "heldout_loss" in entry):
                print(f"step {step}/{total_steps} tokens {step * tokens_per_step:,} loss {loss.item():.3f} "
                      f"lr {lr:.2e} {tps:,.0f} tok/s"
                      + (f" held-out loss {entry['heldout_loss']} induction repeat NLL {entry['induction_nll']}"
                         if "heldout_loss" in entry else "")
                      + (f" code copy NLL {entry['code_copy_first_nll']} -> {entry['code_copy_nll']}"
                         if "code_copy_nll" in entry else ""), flush=True)
            out_of_time = args.max_minutes is not None and time.time() - t_session > 60 * args.max_minutes
            if stop["signal"] or out_of_time or time.time() - t_ckpt > 60 * args.ckpt_minutes:
                save_ckpt(last, state_dict())
                t_ckpt = time.time()
                if stop["signal"] or out_of_time:
                    why = f"signal {stop['signal']}" if stop["signal"] else f"--max-minutes {args.max_minutes}"
                    print(f"stopped ({why}) at step {step}; checkpoint {last}; run again to resume", flush=True)
                    if args.write_model_on_stop:
                        write_model(model, args, data, log, n_params, train_seconds, amp,
                                    stopped_early=f"{why} at step {step} of {total_steps}")
                    return
    save_ckpt(last, state_dict())
    write_model(model, args, data, log, n_params, train_seconds, amp)


def thin_log(log: list[dict]) -> list[dict]:
    """The report keeps every 10th step and every held-out measurement (a GPU run logs thousands)."""
    return [e for e in log if e["step"] % 10 == 0 or "heldout_loss" in e or e is log[-1]]


def write_model(model, args, data, log, n_params, train_seconds, amp, stopped_early=None) -> None:
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
        "device_name": (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"),
        "stopped_early": stopped_early, "tokens_total": args.tokens,
        "context": CONTEXT, "batch": args.batch, "tokens_per_step": args.batch * CONTEXT,
        "sampling": sampling_id(args.repeat_share), "steps": log[-1]["step"], "tokens_seen": log[-1]["tokens"], "peak_lr": args.lr,
        "warmup_tokens": args.warmup_tokens, "decay_fraction": args.decay_fraction,
        "parameters": n_params, "train_seconds": round(train_seconds, 1),
        **({"init_from": str(args.init_from)} if args.init_from else {}),
        **({"repeat_share": args.repeat_share, "repeat_span": list(REPEAT_SPAN), "repeat_max_gap": REPEAT_MAX_GAP}
           if args.repeat_share else {}),
        "corpus": data["meta"], "log": thin_log(log),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}: {report['tokens_seen']:,} tokens in {train_seconds / 3600:.2f} h of training; "
          f"evaluate with models/eval_reference.py", flush=True)


if __name__ == "__main__":
    main()
