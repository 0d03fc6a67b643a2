"""Peer benchmark: optc's ONNX Runtime artifacts against onnxruntime-genai on the same model, the
same ONNX Runtime, the same prompts and threads, in one run.

    python3 -m venv .venv-genai
    .venv-genai/bin/pip install torch==2.13.0 transformers==5.23.0 onnx onnx-ir onnxscript \
        onnxruntime==1.32.0 onnxruntime-genai==0.18.0
    .venv/bin/python scripts/peer_bench.py --hf models/pycoder-v2 --out docs/bench/peer_pycoder-v2.md

onnxruntime-genai is a benchmark-only dependency: its model builder (`-p fp32|int4 -e cpu`) makes
the peer models offline from the same HF directory, in its own venv (`--genai-python`). optc's
artifacts are compiled here from `optc export` of that directory: fp32 on the fused path
(GroupQueryAttention, cache written in place), fp32 on the generic path, and weight_quant int8 and
int4 (block 32; int4 also with the LM head kept in float, and calibrated with AWQ + clip) on the fused path.

Every engine runs in its own process, all loaded at once and each idle until asked. Measured: time
to first token (prefill of a prompt, logits out) and decode ms/token after C tokens of context
(greedy, 32 tokens). The engines take turns run by run (one prefill or one 32-token decode run
each, the first engine changing from turn to turn), --repeats runs per figure in each of --rounds
rounds, so that the load of a shared machine, which moves over seconds, hits every engine alike;
each figure is the median of all its runs, with their range. `--turns block` has each engine do a
figure's runs in a row instead (after one uncounted run), as an app alone on an idle machine would:
its weights stay in the CPU's caches, which run-by-run turns evict. Perplexity is teacher-forced
over held-out windows (models/data/heldout.jsonl) in one prefill per window, the same windows for
every engine. Timings on a shared machine move; compare engines within one run.

`--perplexity-only` times nothing: it compiles the weight-quantisation variants (round-to-nearest,
AWQ and AWQ with its clip search, int4 at block 32 and 128 with and without the LM head in float,
int8; `QUALITY_VARIANTS`),
builds genai's fp32 and int4 models (unless --no-genai), and gives each one's perplexity on the
same held-out windows, one engine after the other:

    .venv/bin/python scripts/peer_bench.py --hf models/pycoder-v2 --perplexity-only \
        --out docs/bench/weight_quant_awq_pycoder-v2.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


# ---------------------------------------------------------------------------- workers
def _serve(prefill, decode_step, reset, perplexity, job: dict) -> None:
    """Answer the driver's measurement requests, one per stdin line, until EOF: `ttft N` (ms to
    prefill the first N stream tokens), `decode C` (ms/token over the decode steps after C
    tokens), `perplexity`. Every engine's worker stays loaded while the driver asks each in turn,
    so the load of a shared machine, which moves over seconds, hits every engine alike."""
    ids = job["ids"]
    print("READY", flush=True)
    for line in sys.stdin:
        what, _, arg = line.strip().partition(" ")
        if what == "ttft":
            reset()
            t = time.perf_counter()
            prefill(ids[:int(arg)])
            value = (time.perf_counter() - t) * 1e3
        elif what == "decode":
            reset()
            tok = prefill(ids[:int(arg)])
            t = time.perf_counter()
            for _ in range(job["decode_tokens"]):
                tok = decode_step(tok)
            value = (time.perf_counter() - t) * 1e3 / job["decode_tokens"]
        elif what == "perplexity":
            value = perplexity()
        else:
            raise SystemExit(f"unknown request {line!r}")
        print(f"RESULT {value!r}", flush=True)


def optc_worker(artifact: str, job: dict) -> dict:
    import numpy as np

    import optc.runtime

    m = optc.runtime.load(artifact)

    def prefill(ids):
        return int(np.argmax(m.prefill(ids)))

    def decode_step(tok):
        return int(np.argmax(m.decode(tok)))

    def perplexity() -> float:
        nll, count = 0.0, 0
        for window in job["windows"]:
            m.reset()
            logits = m.prefill(window, all_logits=True).astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
            count += len(window) - 1
        return float(np.exp(nll / count))

    _serve(prefill, decode_step, m.reset, perplexity, job)


def genai_worker(model_dir: str, job: dict) -> dict:
    import numpy as np
    import onnxruntime as ort
    import onnxruntime_genai as og

    model = og.Model(model_dir)
    state = {}

    def reset():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max(job["contexts"] + job["prompt_lengths"]) + job["decode_tokens"] + 8,
                                  do_sample=False)
        state["g"] = og.Generator(model, params)

    def prefill(ids):
        g = state["g"]
        g.append_tokens(np.asarray(ids, np.int32))  # runs the prompt; logits of its last token
        # picks the first new token from the prompt's logits: no model run (optc's prefill() is
        # followed by an argmax alike), so that every timed decode step below is one model run
        g.generate_next_token()
        return None

    def decode_step(_tok):
        state["g"].generate_next_token()  # runs the last picked token, then picks the next (greedy)
        return None

    def perplexity() -> float:  # the builder's graph run directly by ONNX Runtime, one prefill per window
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.log_severity_level = 3
        s = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        kv_heads = {i.name: i.shape[1] for i in s.get_inputs() if i.name.startswith("past_key_values.")}
        cfg = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
        head_dim = cfg["head_size"]
        nll, count = 0.0, 0
        for window in job["windows"]:
            n = len(window)
            feeds = {"input_ids": np.asarray(window, np.int64).reshape(1, n),
                     "attention_mask": np.ones((1, n), np.int64)}
            for name, heads in kv_heads.items():
                feeds[name] = np.zeros((1, heads, 0, head_dim), np.float32)
            logits = s.run(["logits"], feeds)[0][0].astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll -= logp[np.arange(n - 1), window[1:]].sum()
            count += n - 1
        return float(np.exp(nll / count))

    _serve(prefill, decode_step, reset, perplexity, job)


# ---------------------------------------------------------------------------- driver
def _held_out_ids(tokenizer_path: Path, bos, length: int, windows: int) -> tuple[list[int], list[list[int]]]:
    """One long token stream for the timings, and `windows` windows for perplexity."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    docs = [json.loads(line)["text"] for line in (ROOT / "models" / "data" / "heldout.jsonl").read_text().splitlines()
            if line.strip()]
    stream = []
    for d in docs:
        stream += ([bos] if bos is not None else []) + tok.encode(d).ids
    wins = [stream[i * length:(i + 1) * length] for i in range(windows)]
    if len(wins[-1]) < length:
        raise SystemExit(f"held-out text has fewer than {windows} windows of {length} tokens")
    return stream, wins


def _wq(bits: int, block: int, method: str = "rtn", head: bool = True) -> list[dict]:
    opts = {"name": "weight_quant", "bits": bits, "block_size": block}
    if method != "rtn":  # "awq" or "awq+clip"
        opts["method"] = "awq"
        opts["clip"] = method == "awq+clip"
    if not head:
        opts["skip"] = ["lm_head"]
    return [opts]


# --perplexity-only: weight-only quantisation, round-to-nearest against AWQ (calibrated on
# models/data/calibration.jsonl, the pass's default: 16 documents x 256 tokens, not the held-out text)
QUALITY_VARIANTS = {
    "optc fp32": ([], {}),
    "optc int8 rtn b32": (_wq(8, 32), {}),
    "optc int4 rtn b32": (_wq(4, 32), {}),
    "optc int4 awq b32": (_wq(4, 32, "awq"), {}),
    "optc int4 rtn b32, LM head fp32": (_wq(4, 32, head=False), {}),
    "optc int4 awq b32, LM head fp32": (_wq(4, 32, "awq", head=False), {}),
    "optc int4 rtn b128": (_wq(4, 128), {}),
    "optc int4 awq b128": (_wq(4, 128, "awq"), {}),
    "optc int4 rtn b128, LM head fp32": (_wq(4, 128, head=False), {}),
    "optc int4 awq b128, LM head fp32": (_wq(4, 128, "awq", head=False), {}),
    "optc int4 awq+clip b32": (_wq(4, 32, "awq+clip"), {}),
    "optc int4 awq+clip b32, LM head fp32": (_wq(4, 32, "awq+clip", head=False), {}),
    "optc int4 awq+clip b128": (_wq(4, 128, "awq+clip"), {}),
    "optc int4 awq+clip b128, LM head fp32": (_wq(4, 128, "awq+clip", head=False), {}),
}


def _compile_optc(hf: Path, work: Path, log, variants: dict | None = None) -> dict[str, Path]:
    from optc.compile import compile_model
    from optc.config import parse_config
    from optc.export import export_decoder
    from optc.registry import default_registry

    onnx_path = export_decoder(hf, work / "export" / "model.onnx", log=lambda *_: None)
    variants = variants or {
        "optc fp32 (GQA in place)": ([], {}),
        "optc fp32 (generic graph)": ([], {"fused_attention": False}),
        "optc int8 weights b32": ([{"name": "weight_quant", "bits": 8, "block_size": 32}], {}),
        "optc int4 weights b32": ([{"name": "weight_quant", "bits": 4, "block_size": 32}], {}),
        # the LM head (tied to the embedding) kept in float: less perplexity lost, one float MatMul
        "optc int4 weights b32, LM head fp32": ([{"name": "weight_quant", "bits": 4, "block_size": 32,
                                                  "skip": ["lm_head"]}], {}),
        # calibrated int4 (AWQ scaling + clip search): what meets the int4 perplexity goal
        "optc int4 awq+clip b32": (_wq(4, 32, "awq+clip"), {}),
    }
    out = {}
    for name, (passes, options) in variants.items():
        log(f"compiling {name}")
        art = work / name.replace(" ", "_").replace("(", "").replace(")", "")
        compile_model(onnx_path, art, config=parse_config({"passes": passes}, default_registry()),
                      verify=False, backend_options=options, log=lambda *_: None)
        out[name] = art
    return out


def _build_genai(genai_python: str, hf: Path, work: Path, log) -> dict[str, Path]:
    out = {}
    for precision in ("fp32", "int4"):
        log(f"building onnxruntime-genai {precision} (its model builder)")
        d = work / f"genai-{precision}"
        proc = subprocess.run([genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(d),
                               "-p", precision, "-e", "cpu"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"onnxruntime-genai builder failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        cfg_path = d / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"].setdefault("session_options", {}).update(
            {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1})
        cfg_path.write_text(json.dumps(cfg, indent=1))
        out[f"onnxruntime-genai {precision}"] = d
    return out


def _ask(proc: subprocess.Popen, name: str, request: str | None) -> float | None:
    """Send one request to a worker and read its answer (None: wait for it to be loaded)."""
    if request is not None:
        proc.stdin.write(request + "\n")
        proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith("READY") and request is None:
            return None
        if line.startswith("RESULT "):
            return float(line[len("RESULT "):])
    proc.wait()
    err = Path(proc.err_path).read_text().strip().splitlines()
    raise SystemExit(f"{name}: worker failed: {(err or ['?'])[-1]}")


def _stats(runs: list[float]) -> str:
    return f"{statistics.median(runs):.2f} ({min(runs):.2f}–{max(runs):.2f})"


def markdown(results: dict, job: dict) -> str:
    cols = ([f"TTFT@{n} ms" for n in job["prompt_lengths"]] + [f"decode ms/tok @{c}" for c in job["contexts"]]
            + ["perplexity"])
    lines = ["| engine | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in results.items():
        cells = [_stats(r["ttft_ms"][str(n)]) for n in job["prompt_lengths"]]
        cells += [_stats(r["decode_ms"][str(c)]) for c in job["contexts"]]
        cells.append(f"{r['perplexity']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, default=ROOT / "models" / "pycoder-v2")
    ap.add_argument("--genai-python", default=str(ROOT / ".venv-genai" / "bin" / "python"))
    ap.add_argument("--prompt-lengths", default="128,512")
    ap.add_argument("--contexts", default="128,448,1900")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; in each, every figure is measured --repeats "
                                                          "times on every engine, the engines taking turns run by "
                                                          "run; figures are medians over rounds x repeats")
    ap.add_argument("--turns", choices=("run", "block"), default="run",
                    help="run: engines take turns run by run (a shared machine's load hits all alike; each run "
                         "finds its weights evicted by the others); block: each engine does a figure's --repeats "
                         "runs in a row after one uncounted run (an app alone on an idle machine)")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens for perplexity")
    ap.add_argument("--out", type=Path, help="write the table (markdown) here and its JSON beside it")
    ap.add_argument("--perplexity-only", action="store_true",
                    help="no timings: perplexity of the weight-quantisation variants (QUALITY_VARIANTS) and genai's")
    ap.add_argument("--no-genai", action="store_true", help="--perplexity-only without building genai's models")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, target, job_file = a.worker
        job = json.loads(Path(job_file).read_text())
        (optc_worker if kind == "optc" else genai_worker)(target, job)
        return

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    cfg = json.loads((a.hf / "config.json").read_text())
    ids, windows = _held_out_ids(a.hf / "tokenizer.json", cfg.get("bos_token_id"), 512, a.windows)
    job = {"ids": ids, "windows": windows, "prompt_lengths": [int(x) for x in a.prompt_lengths.split(",")],
           "contexts": [int(x) for x in a.contexts.split(",")], "decode_tokens": a.decode_tokens,
           "repeats": a.repeats}
    if a.perplexity_only:
        return _perplexity_only(a, job, log)
    results = {}
    with tempfile.TemporaryDirectory(prefix="optc-peer-bench-") as tmp:
        work = Path(tmp)
        job_file = work / "job.json"
        job_file.write_text(json.dumps(job))
        engines = [("optc", k, v) for k, v in _compile_optc(a.hf, work, log).items()]
        engines += [("genai", k, v) for k, v in _build_genai(a.genai_python, a.hf, work, log).items()]
        workers = {}
        for i, (kind, name, path) in enumerate(engines):  # every engine loaded at once, idle until asked
            python = sys.executable if kind == "optc" else a.genai_python
            with open(work / f"worker{i}.err", "w") as err:  # (a file: a full stderr pipe would block it)
                proc = subprocess.Popen([python, __file__, "--worker", kind, str(path), str(job_file)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=1)
            proc.err_path = err.name
            workers[name] = proc
            _ask(proc, name, None)
            _ask(proc, name, f"decode {job['contexts'][0]}")  # warm-up, not counted

        results = {name: {"ttft_ms": {str(n): [] for n in job["prompt_lengths"]},
                          "decode_ms": {str(c): [] for c in job["contexts"]}} for name in workers}
        requests = [("ttft_ms", "ttft", n) for n in job["prompt_lengths"]]
        requests += [("decode_ms", "decode", c) for c in job["contexts"]]
        names = list(workers)
        for r in range(a.rounds):
            log(f"round {r + 1}/{a.rounds}")
            for key, what, arg in requests:
                if a.turns == "block":
                    # each engine does all its runs of a figure in a row (after one uncounted run),
                    # as an app that runs alone does: its weights stay in the CPU's caches
                    shift = r % len(names)
                    for name in names[shift:] + names[:shift]:
                        _ask(workers[name], name, f"{what} {arg}")
                        for rep in range(a.repeats):
                            results[name][key][str(arg)].append(_ask(workers[name], name, f"{what} {arg}"))
                    continue
                for rep in range(a.repeats):
                    # engines take turns run by run, starting with a different one each time
                    shift = (r * a.repeats + rep) % len(names)
                    for name in names[shift:] + names[:shift]:
                        results[name][key][str(arg)].append(_ask(workers[name], name, f"{what} {arg}"))
        for name, proc in workers.items():
            log(f"perplexity: {name}")
            results[name]["perplexity"] = _ask(proc, name, "perplexity")
            proc.stdin.close()
            proc.wait()
        shutil.rmtree(work / "export", ignore_errors=True)
    table = markdown(results, job)
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table)
        a.out.with_suffix(".json").write_text(json.dumps({"model": str(a.hf), "threads": THREADS,
                                                          "results": results, **{k: job[k] for k in (
                                                              "prompt_lengths", "contexts", "decode_tokens",
                                                              "repeats")}, "rounds": a.rounds, "turns": a.turns}, indent=1) + "\n")


def _perplexity_only(a, job: dict, log) -> None:
    """Each variant's held-out perplexity (no timings), one worker at a time, and the table."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="optc-peer-bench-") as tmp:
        work = Path(tmp)
        job_file = work / "job.json"
        job_file.write_text(json.dumps(job))
        engines = [("optc", k, v) for k, v in _compile_optc(a.hf, work, log, QUALITY_VARIANTS).items()]
        if not a.no_genai:
            engines += [("genai", k, v) for k, v in _build_genai(a.genai_python, a.hf, work, log).items()]
        for i, (kind, name, path) in enumerate(engines):
            python = sys.executable if kind == "optc" else a.genai_python
            with open(work / f"worker{i}.err", "w") as err:
                proc = subprocess.Popen([python, __file__, "--worker", kind, str(path), str(job_file)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=1)
            proc.err_path = err.name
            _ask(proc, name, None)
            log(f"perplexity: {name}")
            results[name] = {"perplexity": _ask(proc, name, "perplexity")}
            if kind == "optc":  # what awq chose, per activation (the compile's report)
                manifest = json.loads((path / "manifest.json").read_text())
                results[name]["passes"] = manifest["passes"]
                results[name]["pass_reports"] = manifest.get("pass_reports", {})
            proc.stdin.close()
            proc.wait()
    base = {"optc": results["optc fp32"]["perplexity"]}
    if "onnxruntime-genai fp32" in results:
        base["genai"] = results["onnxruntime-genai fp32"]["perplexity"]
    lines = ["| engine | perplexity | vs its fp32 |", "|---|---|---|"]
    for name, r in results.items():
        ref = base["genai" if name.startswith("onnxruntime-genai") else "optc"]
        lines.append(f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / ref - 1:+.2%} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table)
        a.out.with_suffix(".json").write_text(json.dumps({"model": str(a.hf), "windows": len(job["windows"]),
                                                          "window_tokens": 512, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
