"""`optc bench`: time-to-first-token, decode speed, KV bytes and peak RSS, artifact vs originals.

Each engine runs in its own subprocess so that peak RSS is its own. Engines:
  artifact      optc.runtime on the compiled artifact (runtime-owned KV cache)
  onnxruntime   the original ONNX graph on ONNX Runtime, feeding `present` back as `past`
  pytorch       the Hugging Face checkpoint in PyTorch eager mode (when --hf is given)
Prompts are cut from the long held-out stream (models/data/stream.txt).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from optc.data import DATA_DIR
from optc.errors import OptcError

STREAM = DATA_DIR / "stream.txt"
REPEATS = 3
DECODE_CONTEXTS = (128, 2048)
PREFILL_CHUNK = 1024  # long decode contexts are built up in chunks, the same way for every engine


# ---------------------------------------------------------------------------------- engines --
class _ArtifactEngine:
    def __init__(self, path):
        from optc.runtime import load

        self.m = load(path)

    def reset(self):
        self.m.reset()

    def prefill(self, ids):
        return self.m.prefill(ids)

    def decode(self, tok):
        return self.m.decode(tok)

    def kv_bytes(self):
        return self.m.kv_bytes


class _OrtEngine:
    """The naive loop over a raw export: present tensors come back out and go in as past."""

    def __init__(self, path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.s = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.s.get_inputs() if i.name.startswith("past_key_values.")]
        self.shape = {i.name: i.shape for i in self.s.get_inputs()}
        self.out_names = [o.name for o in self.s.get_outputs()]
        self.reset()

    def reset(self):
        self.past = {n: np.zeros((1, self.shape[n][1], 0, self.shape[n][3]), np.float32) for n in self.past_names}
        self.pos = 0

    def _run(self, ids):
        n = len(ids)
        feeds = {"input_ids": np.asarray(ids, np.int64).reshape(1, n),
                 "attention_mask": np.ones((1, self.pos + n), np.int64),
                 "position_ids": np.arange(self.pos, self.pos + n, dtype=np.int64).reshape(1, n), **self.past}
        out = dict(zip(self.out_names, self.s.run(None, feeds)))
        self.past = {n_: out[n_.replace("past_key_values.", "present.")] for n_ in self.past_names}
        self.pos += n
        return out["logits"][0, -1]

    prefill = _run

    def decode(self, tok):
        return self._run([tok])

    def kv_bytes(self):
        return int(sum(v.nbytes for v in self.past.values()))


class _TorchEngine:
    def __init__(self, path):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_grad_enabled(False)
        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        self.reset()

    def reset(self):
        self.cache = None

    def _run(self, ids):
        x = self.torch.tensor([list(ids)], dtype=self.torch.long)
        out = self.m(input_ids=x, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[0, -1].numpy()

    prefill = _run

    def decode(self, tok):
        return self._run([tok])

    def kv_bytes(self):
        return int(sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers))


ENGINES = {"artifact": _ArtifactEngine, "onnxruntime": _OrtEngine, "pytorch": _TorchEngine}


def _peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not getrusage: Linux carries ru_maxrss across exec, so a
    worker started from a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(engine_name: str, path: str, ids: list[int], lengths: list[int], decode_tokens: int,
            contexts=DECODE_CONTEXTS) -> dict:
    eng = ENGINES[engine_name](path)
    result: dict = {"engine": engine_name, "ttft_ms": {}, "decode_ms_per_token": {}}
    eng.prefill(ids[:max(lengths)])  # warm-up: first-call allocations and kernel selection
    eng.decode(ids[max(lengths)])
    eng.reset()
    for n in lengths:
        times = []
        for _ in range(REPEATS):
            eng.reset()
            t0 = time.perf_counter()
            logits = eng.prefill(ids[:n])
            int(np.argmax(logits))
            times.append(time.perf_counter() - t0)
        result["ttft_ms"][str(n)] = round(statistics.median(times) * 1000, 2)
    for ctx in contexts:
        eng.reset()
        for start in range(0, ctx, PREFILL_CHUNK):
            eng.prefill(ids[start:min(ctx, start + PREFILL_CHUNK)])
        eng.decode(ids[ctx])  # untimed: the first step at this cache size may set up a shape (TVM buckets)
        t0 = time.perf_counter()
        for t in ids[ctx + 1:ctx + 1 + decode_tokens]:
            eng.decode(t)
        per_token = (time.perf_counter() - t0) / decode_tokens
        result["decode_ms_per_token"][str(ctx)] = round(per_token * 1000, 3)
        if ctx == contexts[0]:
            result["decode_tokens_per_s"] = round(1.0 / per_token, 1)
            result["kv_bytes"] = eng.kv_bytes()
            result["kv_tokens"] = ctx + 1 + decode_tokens
    result["peak_rss_mb"] = round(_peak_rss_bytes() / 2**20, 1)
    return result


# ---------------------------------------------------------------------------------- driver --
def _run_worker(engine: str, path: Path, ids_file: Path, lengths, decode_tokens, contexts, log) -> dict:
    log(f"  measuring {engine} ({path})")
    cmd = [sys.executable, "-m", "optc.bench", engine, str(path), str(ids_file), ",".join(map(str, lengths)),
           str(decode_tokens), ",".join(map(str, contexts))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise OptcError(f"bench: the {engine} engine failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(artifact, *, original=None, baseline=None, hf_dir=None, json_path=None, plot_path=None,
              prompt_lengths=(128, 512, 1024), decode_tokens=32, decode_contexts=DECODE_CONTEXTS, log=print) -> dict:
    from optc.runtime import load

    artifact = Path(artifact)
    m = load(artifact)  # verifies the artifact once; its tokenizer tokenises for every engine
    manifest = m.manifest
    runs = [("artifact", artifact)]
    if baseline:  # another artifact, e.g. the same graph compiled for ONNX Runtime
        runs.append(("artifact", Path(baseline)))
    if original:
        runs.append(("onnxruntime", Path(original)))
    if hf_dir:
        runs.append(("pytorch", Path(hf_dir)))
    log(f"benchmarking {artifact} (prompts {list(prompt_lengths)}, {decode_tokens} decode tokens, "
        f"median of {REPEATS})")
    ids = m.encode(STREAM.read_text(encoding="utf-8"))
    contexts = list(decode_contexts)
    need = max(list(prompt_lengths) + contexts) + decode_tokens + 1
    if len(ids) < need:
        raise OptcError(f"{STREAM}: {len(ids)} tokens, the benchmark needs {need}")
    del m
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids[:need]))
        results = [_run_worker(name, path, ids_file, list(prompt_lengths), decode_tokens, contexts, log)
                   for name, path in runs]
    for (name, path), r in zip(runs, results):
        if name == "artifact":  # label artifacts by backend: a TVM and an ONNX Runtime build may be compared
            backend = json.loads((path / "manifest.json").read_text())["backend"]
            fused = ", GQA in place" if backend.get("kv_in_place") else ""
            r["engine"] = f"artifact ({backend['name']}{fused})"
    report = {"artifact": str(artifact), "passes": [p["name"] for p in manifest["passes"]],
              "prompt_lengths": list(prompt_lengths), "decode_tokens": decode_tokens, "decode_contexts": contexts,
              "results": results}
    log(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {json_path}")
    if plot_path:
        plot(report, Path(plot_path))
        log(f"wrote {plot_path}")
    return report


def format_table(report: dict) -> str:
    lengths = report["prompt_lengths"]
    contexts = report["decode_contexts"]
    head = ["engine"] + [f"TTFT@{n} ms" for n in lengths] + [f"decode ms/tok @{c}" for c in contexts] + [
        "decode tok/s", "KV bytes", "peak RSS MB"]
    rows = []
    for r in report["results"]:
        rows.append([r["engine"]] + [f"{r['ttft_ms'][str(n)]:.1f}" for n in lengths]
                    + [f"{r['decode_ms_per_token'][str(c)]:.2f}" for c in contexts]
                    + [f"{r['decode_tokens_per_s']:.0f}", f"{r['kv_bytes']:,}", f"{r['peak_rss_mb']:.0f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    lengths, contexts = report["prompt_lengths"], report["decode_contexts"]
    width = 0.8 / max(1, len(report["results"]))
    for k, r in enumerate(report["results"]):
        xs = np.arange(len(lengths)) + k * width
        a1.bar(xs, [r["ttft_ms"][str(n)] for n in lengths], width, label=r["engine"])
        xs2 = np.arange(len(contexts)) + k * width
        a2.bar(xs2, [r["decode_ms_per_token"][str(c)] for c in contexts], width, label=r["engine"])
    a1.set_xticks(np.arange(len(lengths)) + width * (len(report["results"]) - 1) / 2, [str(n) for n in lengths])
    a1.set_xlabel("prompt tokens")
    a1.set_ylabel("time to first token (ms)")
    a2.set_xticks(np.arange(len(contexts)) + width * (len(report["results"]) - 1) / 2, [str(c) for c in contexts])
    a2.set_xlabel("tokens in context")
    a2.set_ylabel("decode ms / token")
    for a in (a1, a2):
        a.legend()
        a.grid(axis="y", alpha=0.3)
    fig.suptitle(f"optc bench: {Path(report['artifact']).name} (passes: {', '.join(report['passes']) or 'none'})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # worker: python -m optc.bench ENGINE PATH IDS_JSON LENGTHS DECODE_TOKENS CONTEXTS
    name, p, ids_path, ls, d, cs = sys.argv[1:7]
    try:
        out = measure(name, p, json.loads(Path(ids_path).read_text()), [int(x) for x in ls.split(",")], int(d),
                      [int(x) for x in cs.split(",")])
    except OptcError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(out))
