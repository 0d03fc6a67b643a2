"""Peer benchmark: optc's ONNX Runtime artifacts against onnxruntime-genai (the same ONNX Runtime) and
llama.cpp on the same model, the same prompts (token ids) and threads, in one run.

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

llama.cpp is the third peer (optional, benchmark-only, its own venv; `--no-llamacpp` leaves it out,
and without the venv the run goes on without it, saying so). llama-cpp-python builds llama.cpp from
source (CPU only; about 10 minutes on 2 cores); its sdist carries llama.cpp's HF -> GGUF converter,
which is unpacked beside it (`--llamacpp-python`, `--llamacpp-convert`):

    python3 -m venv .venv-llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-llamacpp/bin/pip install llama-cpp-python==0.3.36 \
        torch==2.13.0 transformers==5.23.0 sentencepiece
    .venv-llamacpp/bin/pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C .venv-llamacpp --strip-components=2 \
        llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
        llama_cpp_python-0.3.36/vendor/llama.cpp/conversion llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py

The converter makes an F32 GGUF of the HF directory, and llama.cpp's own quantiser (what
`llama-quantize` runs, `llama_model_quantize`) makes Q8_0, Q4_0 and Q4_K_M from it, all in the run's
temporary directory. The converter names a BPE tokenizer's pre-tokenizer by a hash of its token ids
over a fixed text and refuses one it does not know (a custom vocabulary always hashes anew); where
tokenizer.json's pre-tokenizer is exactly GPT-2's (ByteLevel with its regex, no prefix space, no
normaliser), the unknown hash is answered "gpt-2", as llama.cpp's convert_hf_to_gguf_update.py would
list it, and the build checks that llama.cpp's tokenizer then gives tokenizer.json's ids. The
workers are fed token ids either way. Each GGUF runs twice (LLAMACPP_CONFIGS): with llama.cpp's
defaults on CPU, flash attention (its `auto` turns it on there; llama-cpp-python's own default is
off) and an F16 KV cache, and with the unfused attention over an F32 KV cache (", no FA, F32 KV"),
which decodes faster at long contexts here and prefills slower. Threads 2, and one batch and ubatch
hold the longest prompt (a prefill is one graph run); a prefill is one `llama_decode` of the prompt's
ids with the last token's logits out, a decode step one `llama_decode` of one token, and perplexity a
second context with every position's logits (`logits_all`).

`--perplexity-only` times nothing: it compiles the weight-quantisation variants (round-to-nearest,
AWQ and AWQ with its clip search, int4 at block 32 and 128 with and without the LM head in float,
int8; `QUALITY_VARIANTS`),
builds genai's fp32 and int4 models (unless --no-genai) and llama.cpp's GGUFs (unless --no-llamacpp),
and gives each one's perplexity on the same held-out windows, one engine after the other:

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


def _window_nll(logits, window) -> float:
    """Summed negative log-likelihood of each next token of `window` under its row of `logits`
    [len(window), vocab] (the same arithmetic for every engine)."""
    import numpy as np

    x = np.asarray(logits, np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(window) - 1), window[1:]].sum())


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
            nll += _window_nll(m.prefill(window, all_logits=True), window)
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
            nll += _window_nll(s.run(["logits"], feeds)[0][0], window)
            count += n - 1
        return float(np.exp(nll / count))

    _serve(prefill, decode_step, reset, perplexity, job)


def llamacpp_worker(spec: str, job: dict) -> dict:
    """spec: JSON {"gguf": path, "flash_attn": bool, "kv": "f16"|"f32" (the KV cache's type)}."""
    import numpy as np
    import llama_cpp

    spec = json.loads(spec)
    gguf = spec["gguf"]
    kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[spec["kv"]]
    opts = dict(n_threads=THREADS, n_threads_batch=THREADS, flash_attn=spec["flash_attn"], type_k=kv, type_v=kv,
                verbose=False)
    n_ctx = max(job["contexts"] + job["prompt_lengths"]) + job["decode_tokens"] + 8
    # one batch (and one ubatch: one graph run) holds the longest prompt; logits of the last token only
    llm = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, **opts)
    n_vocab = llm.n_vocab()

    def last_token() -> int:  # greedy: the argmax of the last evaluated token's logits
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    def reset():
        llm.reset()
        llm._ctx.kv_cache_clear()

    def prefill(ids):
        llm.eval(ids)  # the prompt's token ids, one llama_decode
        return last_token()

    def decode_step(tok):
        llm.eval([tok])  # one llama_decode of one token
        return last_token()

    def perplexity() -> float:  # every position's logits: a second context with logits_all
        w = max(len(window) for window in job["windows"])
        lp = llama_cpp.Llama(gguf, n_ctx=w + 8, n_batch=w, n_ubatch=w, logits_all=True, **opts)
        nll, count = 0.0, 0
        for window in job["windows"]:
            n = len(window)
            lp.reset()
            lp._ctx.kv_cache_clear()
            lp.eval(window)
            nll += _window_nll(lp.scores[:n], window)
            count += n - 1
        return float(np.exp(nll / count))

    _serve(prefill, decode_step, reset, perplexity, job)


LLAMACPP_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}  # llama.h's LLAMA_FTYPE_MOSTLY_*
# how each GGUF runs: llama.cpp's defaults on CPU (flash attention, `auto` there; F16 KV cache), and
# the unfused attention over an F32 cache (decodes faster at long contexts here, prefills slower)
LLAMACPP_CONFIGS = {"": {"flash_attn": True, "kv": "f16"}, ", no FA, F32 KV": {"flash_attn": False, "kv": "f32"}}


def llamacpp_build(converter: str, hf: str, out: str) -> None:
    """(Run in the llama.cpp venv.) F32 GGUF by llama.cpp's converter, LLAMACPP_TYPES from it by
    llama.cpp's quantiser; prints one line per file: `GGUF <type> <path>`."""
    import ctypes
    import logging

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_json = json.loads((Path(hf) / "tokenizer.json").read_text())
    pre = tok_json.get("pre_tokenizer") or {}
    gpt2_pre = (tok_json.get("normalizer") is None and pre.get("type") == "ByteLevel"
                and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))

    sys.path.insert(0, str(Path(converter).resolve().parent))
    import convert_hf_to_gguf  # puts its gguf-py first on sys.path
    from conversion import base

    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        logging.disable(logging.WARNING)  # its banner for an unknown hash (answered below, or re-raised)
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if not gpt2_pre:
                raise
            print("llama.cpp's converter does not know this vocabulary's pre-tokenizer hash; tokenizer.json's "
                  "pre-tokenizer is GPT-2's (ByteLevel, its regex, no prefix space, no normaliser): gpt-2",
                  file=sys.stderr)
            return "gpt-2"
        finally:
            logging.disable(logging.NOTSET)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    f32 = out_dir / "model-F32.gguf"
    sys.argv = [converter, hf, "--outtype", "f32", "--outfile", str(f32)]
    convert_hf_to_gguf.main()
    print(f"GGUF F32 {f32}", flush=True)

    import llama_cpp

    # the GGUF's vocabulary: llama.cpp's tokenizer must give tokenizer.json's ids (the workers are fed ids)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(hf) / "tokenizer.json"))
    vocab = llama_cpp.Llama(str(f32), vocab_only=True, verbose=False)
    docs = [json.loads(line)["text"] for line in (ROOT / "models" / "data" / "heldout.jsonl").read_text().splitlines()
            if line.strip()]
    bad = [i for i, d in enumerate(docs) if vocab.tokenize(d.encode(), add_bos=False, special=False) != tok.encode(d).ids]
    print(f"llama.cpp's tokenizer gives tokenizer.json's ids on {len(docs) - len(bad)}/{len(docs)} held-out documents"
          + (f" (not on {bad})" if bad else ""), file=sys.stderr, flush=True)
    del vocab

    for name, ftype in LLAMACPP_TYPES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = THREADS
        dst = out_dir / f"model-{name}.gguf"
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama_model_quantize {name} failed")
        print(f"GGUF {name} {dst}", flush=True)


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


def _wq(bits: int, block: int, method: str = "rtn", head: bool = True, symmetric: bool = False) -> list[dict]:
    opts = {"name": "weight_quant", "bits": bits, "block_size": block}
    if symmetric:  # no zero points: the MatMulNBits form onnxruntime-genai's builder emits
        opts["symmetric"] = True
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
    "optc int4 rtn b32, symmetric": (_wq(4, 32, symmetric=True), {}),
    "optc int4 awq+clip b32, symmetric": (_wq(4, 32, "awq+clip", symmetric=True), {}),
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
        # the same, symmetric (no zero points, as genai's int4)
        "optc int4 awq+clip b32, symmetric": (_wq(4, 32, "awq+clip", symmetric=True), {}),
        # the same with the embedding table in int4 too (GatherBlockQuantized, as genai's int4)
        "optc int4 awq+clip b32, int4 embedding": ([{**_wq(4, 32, "awq+clip")[0], "embedding": True}], {}),
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


def _build_llamacpp(llamacpp_python: str, converter: str, hf: Path, work: Path, log) -> dict[str, str]:
    """Each llama.cpp engine's worker spec (its GGUF and how it runs: LLAMACPP_CONFIGS)."""
    for what, path in (("python", llamacpp_python), ("converter", converter)):
        if not Path(path).exists():
            log(f"skipping llama.cpp: no {what} at {path} (the module docstring says how to set up .venv-llamacpp)")
            return {}
    log("building llama.cpp GGUFs (its converter: F32; its quantiser: " + ", ".join(LLAMACPP_TYPES) + ")")
    proc = subprocess.run([llamacpp_python, __file__, "--llamacpp-build", converter, str(hf), str(work / "llamacpp")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp GGUF build failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    for line in proc.stderr.splitlines():
        if line.startswith(("llama.cpp's", "llama_model_quantize")):  # the pre-tokenizer, the ids, fallbacks
            log("  " + line)
    ggufs = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("GGUF ")]
    return {f"llama.cpp {t}{suffix}": json.dumps({"gguf": p, **cfg})
            for suffix, cfg in LLAMACPP_CONFIGS.items() for t, p in ggufs}


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
    ap.add_argument("--llamacpp-python", default=str(ROOT / ".venv-llamacpp" / "bin" / "python"),
                    help="python of the llama.cpp venv (llama-cpp-python); missing: llama.cpp is skipped")
    ap.add_argument("--llamacpp-convert", default=str(ROOT / ".venv-llamacpp" / "llama.cpp" / "convert_hf_to_gguf.py"),
                    help="llama.cpp's convert_hf_to_gguf.py (from llama-cpp-python's sdist, beside conversion/ "
                         "and gguf-py/)")
    ap.add_argument("--prompt-lengths", default="128,512")
    ap.add_argument("--contexts", default="128,448,1900")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; in each, every figure is measured --repeats "
                                                          "times on every engine, the engines taking turns run by "
                                                          "run; figures are medians over rounds x repeats")
    ap.add_argument("--turns", choices=("run", "block", "alone"), default="run",
                    help="run: engines take turns run by run (a shared machine's load hits all alike; each run "
                         "finds its weights evicted by the others); block: each engine does a figure's --repeats "
                         "runs in a row after one uncounted run (an app alone on an idle machine); alone: as block, "
                         "with only that engine's process alive (started and stopped per round, so no idle "
                         "engine's thread pool shares the cores)")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens for perplexity")
    ap.add_argument("--out", type=Path, help="write the table (markdown) here and its JSON beside it")
    ap.add_argument("--perplexity-only", action="store_true",
                    help="no timings: perplexity of the weight-quantisation variants (QUALITY_VARIANTS), genai's "
                         "and llama.cpp's")
    ap.add_argument("--no-genai", action="store_true", help="--perplexity-only without building genai's models")
    ap.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--only", action="append", default=[],
                    help="time only the engines whose name contains this (repeatable): fewer idle engine processes "
                         "beside the one running")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--llamacpp-build", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, target, job_file = a.worker
        job = json.loads(Path(job_file).read_text())
        {"optc": optc_worker, "genai": genai_worker, "llamacpp": llamacpp_worker}[kind](target, job)
        return
    if a.llamacpp_build:
        return llamacpp_build(*a.llamacpp_build)

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    cfg = json.loads((a.hf / "config.json").read_text())
    ids, windows = _held_out_ids(a.hf / "tokenizer.json", cfg.get("bos_token_id"), 512, a.windows)
    job = {"ids": ids, "windows": windows, "prompt_lengths": [int(x) for x in a.prompt_lengths.split(",")],
           "contexts": [int(x) for x in a.contexts.split(",")], "decode_tokens": a.decode_tokens,
           "repeats": a.repeats}
    if a.perplexity_only:
        return _perplexity_only(a, job, log)
    # genai sizes its generator (and llama.cpp its context) to the longest run plus 8: refuse here, before any
    # build, a run that would not fit the model's context rather than fail in the first worker
    needed = max(job["contexts"] + job["prompt_lengths"]) + job["decode_tokens"] + 8
    if needed > cfg.get("max_position_embeddings", needed):
        raise SystemExit(f"peer_bench: the longest run needs {needed} positions (longest prompt or context + "
                         f"--decode-tokens + 8), more than {a.hf}'s max_position_embeddings "
                         f"{cfg['max_position_embeddings']}: shorten --prompt-lengths / --contexts")
    results = {}
    with tempfile.TemporaryDirectory(prefix="optc-peer-bench-") as tmp:
        work = Path(tmp)
        job_file = work / "job.json"
        job_file.write_text(json.dumps(job))
        engines = [("optc", k, v) for k, v in _compile_optc(a.hf, work, log).items()]
        engines += [("genai", k, v) for k, v in _build_genai(a.genai_python, a.hf, work, log).items()]
        if not a.no_llamacpp:
            engines += [("llamacpp", k, v) for k, v in _build_llamacpp(a.llamacpp_python, a.llamacpp_convert, a.hf,
                                                                        work, log).items()]
        if a.only:
            engines = [e for e in engines if any(o in e[1] for o in a.only)]
            if not engines:
                raise SystemExit(f"--only {a.only}: no engine's name contains it")
        pythons = {"optc": sys.executable, "genai": a.genai_python, "llamacpp": a.llamacpp_python}

        def start(i: int, kind: str, name: str, path) -> subprocess.Popen:
            with open(work / f"worker{i}.err", "w") as err:  # (a file: a full stderr pipe would block it)
                proc = subprocess.Popen([pythons[kind], __file__, "--worker", kind, str(path), str(job_file)],
                                        text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                        bufsize=1)
            proc.err_path = err.name
            _ask(proc, name, None)
            _ask(proc, name, f"decode {job['contexts'][0]}")  # warm-up, not counted
            return proc

        results = {name: {"ttft_ms": {str(n): [] for n in job["prompt_lengths"]},
                          "decode_ms": {str(c): [] for c in job["contexts"]}} for _, name, _ in engines}
        requests = [("ttft_ms", "ttft", n) for n in job["prompt_lengths"]]
        requests += [("decode_ms", "decode", c) for c in job["contexts"]]
        if a.turns == "alone":
            for r in range(a.rounds):
                log(f"round {r + 1}/{a.rounds}")
                shift = r % len(engines)
                for i, (kind, name, path) in enumerate(engines[shift:] + engines[:shift]):
                    proc = start(i, kind, name, path)  # the only engine process alive
                    for key, what, arg in requests:
                        _ask(proc, name, f"{what} {arg}")
                        for rep in range(a.repeats):
                            results[name][key][str(arg)].append(_ask(proc, name, f"{what} {arg}"))
                    if r == a.rounds - 1:
                        log(f"perplexity: {name}")
                        results[name]["perplexity"] = _ask(proc, name, "perplexity")
                    proc.stdin.close()
                    proc.wait()
            engines = []  # (measured: no loaded workers below)
        workers = {name: start(i, kind, name, path) for i, (kind, name, path) in enumerate(engines)}
        names = list(workers)
        for r in range(a.rounds if workers else 0):
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
        if not a.no_llamacpp:
            engines += [("llamacpp", k, v) for k, v in _build_llamacpp(a.llamacpp_python, a.llamacpp_convert, a.hf,
                                                                        work, log).items()]
        pythons = {"optc": sys.executable, "genai": a.genai_python, "llamacpp": a.llamacpp_python}
        for i, (kind, name, path) in enumerate(engines):
            python = pythons[kind]
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
    if "llama.cpp F32" in results:
        base["llama.cpp"] = results["llama.cpp F32"]["perplexity"]
    lines = ["| engine | perplexity | vs its fp32 |", "|---|---|---|"]
    for name, r in results.items():
        ref = base["genai" if name.startswith("onnxruntime-genai") else
                   "llama.cpp" if name.startswith("llama.cpp") else "optc"]
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
