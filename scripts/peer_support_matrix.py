"""The peer-export support matrix: which decoder families, exported by which tool, optc compiles, and
what each pass does there. Measured, not declared: every cell is a real export of a tiny
random-initialised model followed by a real `optc compile`.

    .venv/bin/python scripts/peer_support_matrix.py --optimum-python .venv-optimum/bin/python \
        [--families llama-gqa,gpt2] [--out docs/peer_exports.md]

optimum-onnx pins transformers < 4.58, so its exports run in their own venv (how to make it:
tests/peer_exports/make_fixtures.py); this script calls that interpreter on itself with
`--export`. The torch-dynamo columns use optc's own venv (transformers 5) on the same checkpoint.

A cell says what `optc compile` did: "exact" (identity: 100% top-1 against ONNX Runtime on the
unmodified export, max |Δlogit| shown; "fp32" for an fp16 export computed in float32: its
|Δlogit| is fp16 rounding), "ok" (a lossy pass compiled; its verification figures), or
"refused: <the one-line error>". Anything else (a traceback, exit 3) is a bug and says "CRASH".
Random weights: these cells test graph handling, never accuracy.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "models" / "pycoder-5m" / "tokenizer.json"

# Tiny configs (transformers config class, kwargs). vocab 4096 = pycoder-5m's tokenizer, which
# verification uses. init x10 so that a wrong graph shows in whole logit units.
_LLAMA_LIKE = dict(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
                   pad_token_id=0, initializer_range=0.2)
FAMILIES = {
    "llama-gqa": ("LlamaConfig", {**_LLAMA_LIKE, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama-mha": ("LlamaConfig", {**_LLAMA_LIKE, "num_key_value_heads": 4}),
    "mistral": ("MistralConfig", {**_LLAMA_LIKE, "num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {**_LLAMA_LIKE, "num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "num_key_value_heads": 2, "head_dim": 8}),
    "phi3": ("Phi3Config", {**_LLAMA_LIKE, "num_key_value_heads": 2}),
    "gemma": ("GemmaConfig", {**_LLAMA_LIKE, "num_key_value_heads": 2, "head_dim": 8}),
    "gpt2": ("GPT2Config", dict(vocab_size=4096, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                bos_token_id=0, eos_token_id=0, initializer_range=0.2)),
    "gptj": ("GPTJConfig", dict(vocab_size=4096, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=512,
                                bos_token_id=0, eos_token_id=0, initializer_range=0.2)),
    "gpt-neox": ("GPTNeoXConfig", dict(vocab_size=4096, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                       max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
                                       initializer_range=0.2)),
}
EXPORTERS = {  # name -> (runs in, options)
    "optimum": ("optimum", {}),
    "optimum fp16": ("optimum", {"dtype": "fp16"}),
    "optimum opset 14": ("optimum", {"opset": 14}),
    "dynamo opset 18": ("optc", {"opset": 18}),
    "optc export": ("optc", {}),
}
PASSES = {
    "identity": [],
    "int8 KV": [{"name": "kv_cache_compression", "bits": 8}],
    "sink_window": [{"name": "sparse_attention", "mode": "sink_window", "sinks": 4, "window": 60}],
}


def make_checkpoint(family: str, out: Path) -> None:
    """(optimum venv) Save the tiny random model of `family` as a Hugging Face checkpoint."""
    import torch
    import transformers

    config_class, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # optimum exports beside the model
        shutil.copy(TOKENIZER.parent / f, out / f)


def optimum_export(checkpoint: Path, out: Path, options: dict) -> None:
    """(optimum venv) What `optimum-cli export onnx --task text-generation-with-past` does."""
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint), output=str(out), task="text-generation-with-past", do_validation=False,
                **options)


def dynamo_export(checkpoint: Path, out: Path, options: dict) -> None:
    """(optc venv) `optc export`, or torch dynamo at another opset on any family (the export
    module's architecture check lifted, to see what the exporter itself emits)."""
    import optc.export as export

    if "opset" in options:
        export.OPSET = options["opset"]
        arch = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
        export.SUPPORTED_ARCHS = export.SUPPORTED_ARCHS | {arch}
    export.export_decoder(checkpoint, out / "model.onnx", log=lambda *_: None)


def compile_cell(model: Path, passes: list, work: Path) -> str:
    cfg = work / "passes.yaml"
    cfg.write_text(json.dumps({"passes": passes}))  # JSON is YAML
    out = work / "artifact"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "optc"), "compile", str(model), "-c", str(cfg), "-o",
                           str(out), "--tokenizer", str(TOKENIZER), "--verify-length", "64"],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        v = manifest["verification"]
        if not passes:
            if "float16_upcast_to_float32" in manifest["model"]["rewrites"]:  # fp16 rounding, not exactness
                return f"fp32 (Δ {v['max_abs_logit_diff']:.1e}, top-1 {v['top1_agreement']:.1%})"
            exact = v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] <= 1e-4
            return f"{'exact' if exact else 'DIFFERS'} (Δ {v['max_abs_logit_diff']:.1e})"
        return f"ok (top-1 {v['top1_agreement']:.0%})"
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode == 2 and last.startswith("error: ") and "Traceback" not in proc.stderr:
        return "refused: " + last[len("error: "):]
    return f"CRASH (exit {proc.returncode}): {last}"


def run(families: list[str], exporters: list[str], optimum_python: str, log) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="optc-matrix-") as tmp:
        for family in families:
            ckpt = Path(tmp) / family / "checkpoint"
            subprocess.run([optimum_python, __file__, "--checkpoint", family, str(ckpt)], check=True,
                           capture_output=True)
            for exporter in exporters:
                side, options = EXPORTERS[exporter]
                exp = Path(tmp) / family / exporter.replace(" ", "-")
                if side == "optimum":
                    proc = subprocess.run([optimum_python, __file__, "--export", str(ckpt), str(exp),
                                           json.dumps(options)], capture_output=True, text=True)
                else:
                    proc = subprocess.run([sys.executable, __file__, "--export-optc", str(ckpt), str(exp),
                                           json.dumps(options)], capture_output=True, text=True)
                row = results.setdefault(f"{family} · {exporter}", {})
                if proc.returncode != 0:
                    why = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    row.update({p: f"export failed: {why}" for p in PASSES})
                    log(f"{family} · {exporter}: export failed: {why}")
                    continue
                for name, passes in PASSES.items():
                    row[name] = compile_cell(exp / "model.onnx", passes, exp)
                    log(f"{family} · {exporter} · {name}: {row[name]}")
    return results


def _short(cell: str) -> str:
    # the attention-count error's fixed preamble says nothing the column does not
    cell = re.sub(r"found (\d+) attention ops \(standard ONNX Attention or the MatMul-Softmax-MatMul pattern\) "
                  r"for (\d+) KV-cache layers", r"\1 of \2 attention ops matched", cell)
    return cell.replace("|", "\\|")


def markdown(results: dict) -> str:
    """One row per family · exporter; a refusal shared by every pass (the canonicaliser's) is
    written once."""
    lines = ["| family · exporter | " + " | ".join(PASSES) + " |", "|---|" + "---|" * len(PASSES)]
    for key, row in results.items():
        cells = [_short(row[p]) for p in PASSES]
        if len(set(cells)) == 1 and not cells[0].startswith(("exact", "ok", "fp32")):
            cells = [cells[0]] + ["(same)"] * (len(cells) - 1)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimum-python", default=str(ROOT / ".venv-optimum" / "bin" / "python"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--exporters", default=",".join(EXPORTERS), help="comma-separated, of: " + ", ".join(EXPORTERS))
    ap.add_argument("--out", type=Path, help="write the table (markdown) here, and its JSON beside it; rows "
                                             "already in that JSON and not re-measured are kept")
    ap.add_argument("--checkpoint", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--export", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--export-optc", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.checkpoint:
        return make_checkpoint(a.checkpoint[0], Path(a.checkpoint[1]))
    if a.export:
        return optimum_export(Path(a.export[0]), Path(a.export[1]), json.loads(a.export[2]))
    if a.export_optc:
        return dynamo_export(Path(a.export_optc[0]), Path(a.export_optc[1]), json.loads(a.export_optc[2]))
    families = [f for f in a.families.split(",") if f]
    exporters = [e.strip() for e in a.exporters.split(",") if e.strip()]
    unknown = sorted(set(families) - set(FAMILIES)) + sorted(set(exporters) - set(EXPORTERS))
    if unknown:
        ap.error(f"unknown family or exporter {unknown[0]!r}")
    results = run(families, exporters, a.optimum_python, log=lambda m: print(m, flush=True))
    if a.out and a.out.with_suffix(".json").is_file():  # a partial re-run updates its rows only
        old = json.loads(a.out.with_suffix(".json").read_text())
        merged = {**old, **results}
        order = [f"{f} · {e}" for f in FAMILIES for e in EXPORTERS]
        results = {k: merged[k] for k in sorted(merged, key=lambda k: order.index(k) if k in order else len(order))}
    table = markdown(results)
    print(table)
    if a.out:
        a.out.write_text(table)
        a.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
