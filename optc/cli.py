"""The `optc` command line. Bad input: one line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console

from optc.errors import OptcError, PastContextWarning

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def log(msg: str) -> None:
    console.print(msg)
    console.file.flush()  # progress of long work (tuning) shows up in piped logs as it happens


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="optc")
def cli():
    """optc: compile transformer LMs for edge hardware through configurable rewrite passes.

    \b
    Typical flow:
      optc export --hf models/pycoder-5m -o build/model.onnx
      optc compile build/model.onnx --config passes.yaml -o build/artifact
      optc run build/artifact --prompt "def f(" --max-new-tokens 64
      optc bench build/artifact

    \b
    Encoders (BERT-style, e.g. all-MiniLM-L6-v2):
      optc export --hf MINILM_DIR -o build/minilm/model.onnx
      optc compile build/minilm/model.onnx -c configs/encoder_token_dropping.yaml -o build/minilm-art
      optc embed build/minilm-art "a sentence" "another one"
    """


@cli.command()
@click.option("--hf", "hf_dir", required=True, type=click.Path(path_type=Path),
              help="local Hugging Face checkpoint directory (decoders: Llama, Mistral, Qwen2/3, Phi3, Gemma, "
                   "GPT-NeoX, GPT-2; encoders: BERT)")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="ONNX file to write")
def export(hf_dir, output):
    """Export a local HF checkpoint to ONNX (opset 23).

    Decoders (Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma, GPT-NeoX, GPT-2) get the optimum /
    transformers.js KV-cache layout;
    BERT encoders (e.g. all-MiniLM-L6-v2) get input_ids, attention_mask, token_type_ids ->
    last_hidden_state.
    """
    from optc.export import ENCODER_ARCHS, export_decoder, export_encoder, hf_architectures

    if hf_architectures(hf_dir) & ENCODER_ARCHS:
        export_encoder(hf_dir, output, log=log)
    else:
        export_decoder(hf_dir, output, log=log)


def npu_options(f):
    """Options of --target npu (compile and inspect)."""
    opts = [
        click.option("--chunk", type=click.IntRange(min=2), default=None,
                     help="NPU: prefill tokens per static step (default 64; the last chunk is padded)"),
        click.option("--max-cache", type=click.IntRange(min=2), default=None,
                     help="NPU: cache slots of the static graphs (default: the model's context)"),
        click.option("--max-length", type=click.IntRange(min=2), default=None,
                     help="NPU, encoders: tokens per text of the static graph (default 128, or the model's "
                          "max_length where shorter; shorter texts are padded, longer ones truncated)"),
        click.option("--profile", default=None,
                     help="NPU: device profile, a name in profiles/ or a YAML file (default qualcomm_htp_v73)"),
        click.option("--allow-cpu-fallback", is_flag=True, default=None,
                     help="NPU: build and run without an NPU execution provider, NPU partitions on the CPU "
                          "(never done silently: the runtime names the provider of each partition)"),
        click.option("--context-cache", is_flag=True, default=None,
                     help="NPU: also store QNN's compiled context of each NPU partition (ORT EPContext), loaded "
                          "without compiling (QNN writes a different file each build: not byte-identical)"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


NPU_OPTIONS = ("chunk", "max_cache", "max_length", "profile", "allow_cpu_fallback", "context_cache")


def _npu_options(target, given: dict) -> dict:
    options = {k: given.pop(k) for k in NPU_OPTIONS if given.get(k) is not None}
    if options and target != "npu":
        raise OptcError(f"--{next(iter(options)).replace('_', '-')}: only for --target npu")
    return options


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["cpu", "npu"]), default=None,
              help="npu: also print how the graph (after the config's passes) splits into NPU and CPU partitions")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path),
              help="--target npu: the pass configuration to run first (e.g. outlier_split)")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="--target npu: tokenizer.json for the passes' calibration (default: beside MODEL)")
@npu_options
def inspect(model, target, config_path, tokenizer, **npu_opts):
    """Print the decoder (or encoder) structure the canonicaliser finds in MODEL."""
    from optc.canonical import analyze_encoder, canonicalize, model_kind
    from optc.compile import side_config
    from optc.ir import load_model

    npu_opts = _npu_options(target, npu_opts)
    for flag, given in (("--config", config_path), ("--tokenizer", tokenizer)):
        if given is not None and target != "npu":
            raise OptcError(f"{flag}: only with --target npu (inspect prints the graph as exported otherwise)")
    loaded = load_model(model)
    if model_kind(loaded) == "encoder":  # a BERT-style encoder: what optc compile will record
        enc = analyze_encoder(loaded)
        rows = [("kind", "encoder"), ("layers", enc.n_layers), ("attention heads", enc.num_heads),
                ("hidden size", enc.hidden_size), ("vocab", enc.vocab_size), ("context", enc.context or "not recorded"),
                ("attention", f"{enc.n_layers} × Softmax(Add(scaled Q·Kᵀ, mask))"), ("norm", enc.norm),
                ("MLP", enc.mlp), ("inputs → output", f"{', '.join(enc.inputs)} → {enc.output}")]
        for k, v in rows:
            console.print(f"{k:>20}  {v}")
        if target == "npu":
            _inspect_npu_encoder(model, loaded, enc, config_path, tokenizer, npu_opts)
        return
    info = canonicalize(loaded)
    side_ctx = side_config(model).get("context")
    rows = [("layers", info.n_layers), ("attention heads", info.num_heads), ("KV heads", info.kv_heads),
            ("head dim", info.head_dim), ("hidden size", info.hidden_size), ("vocab", info.vocab_size),
            ("context", info.context or (f"{side_ctx} (config.json)" if side_ctx else "not recorded")),
            ("attention", f"{info.n_layers} × ONNX Attention (opset 23)"), ("rotary", info.rotary),
            ("norm", info.norm), ("MLP", info.mlp),
            ("KV inputs/outputs", f"past_key_values.0..{info.n_layers - 1}.key/value → present.*"),
            ("canonical rewrites", ", ".join(f"{k}×{v}" for k, v in info.rewrites.items()) or "none")]
    for k, v in rows:
        console.print(f"{k:>20}  {v}")
    if target == "npu":
        _inspect_npu(model, loaded, info, config_path, tokenizer, npu_opts, side_ctx)


def _inspect_npu_encoder(model_path, model, enc, config_path, tokenizer, npu_opts) -> None:
    """An encoder's static graph (`--max-length` tokens per text) after the config's passes, as
    `optc compile --target npu` partitions it."""
    from optc.backends.npu.backend import ENCODER_BATCH, encoder_options, encoder_plan, report_lines
    from optc.backends.npu.estimate import estimate_step
    from optc.compile import encoder_side_config, run_config_passes

    tok_path = Path(tokenizer) if tokenizer else Path(model_path).parent / "tokenizer.json"
    side = encoder_side_config(Path(model_path), tok_path, enc)
    encoder_options(npu_opts, side["max_length"])  # (bad options: one line before the passes run)
    run_config_passes(model, None, model_path, config_path, tokenizer=tokenizer, log=lambda *_: None)
    opts, profile, static, plan = encoder_plan(model, enc, npu_opts, side["max_length"])
    console.print(f"\nNPU partition for profile {profile.name} ({profile.description}); encoder graph "
                  f"{ENCODER_BATCH} text × {opts['max_length']} tokens (shorter texts padded, longer truncated)",
                  markup=False)
    for line in report_lines(static, plan, "encoder"):
        console.print(line, markup=False)
    e = estimate_step(static, plan, profile)
    console.print(f"roofline ESTIMATE on {profile.name}, the CPU partitions not included: NPU partitions "
                  f"{e['npu_seconds'] * 1e3:.3f} ms ({e['npu_int8_ops'] / 1e9:.2f} G int8 ops, "
                  f"{e['npu_weight_bytes']:,} B of weights), handovers {e['handover_seconds'] * 1e3:.3f} ms "
                  f"({e['transfers']} transfers) per text", markup=False)


def _inspect_npu(model_path, model, info, config_path, tokenizer, npu_opts, side_ctx) -> None:
    from optc.backends.npu.backend import plans, report_lines
    from optc.compile import run_config_passes

    if info.context is None and side_ctx:
        info.context = side_ctx
    run_config_passes(model, info, model_path, config_path, tokenizer=tokenizer, log=lambda *_: None)
    opts, profile, step_plans = plans(model, info, npu_opts)
    console.print(f"\nNPU partition for profile {profile.name} ({profile.description}); prefill chunk "
                  f"{opts['chunk']} tokens, cache {opts['max_cache']} slots", markup=False)
    for step, (static, plan, _) in step_plans.items():
        for line in report_lines(static, plan, step):
            console.print(line, markup=False)
    from optc.backends.npu.estimate import estimate_step

    basis = ", ".join(f"{k.split('.')[-1]} {f.value:g} ({f.label()})" for k, f in profile.figures().items()
                      if k in ("compute.int8_tops", "compute.efficiency", "memory.bandwidth_gb_s",
                               "memory.transfer_latency_us"))
    console.print(f"roofline ESTIMATE on {profile.name} ({basis}); the CPU partitions are not included:", markup=False)
    for step, (static, plan, _) in step_plans.items():
        e = estimate_step(static, plan, profile)
        console.print(f"  {step} step: NPU partitions {e['npu_seconds'] * 1e3:.3f} ms ({e['npu_int8_ops'] / 1e9:.2f} "
                      f"G int8 ops, {e['npu_weight_bytes']:,} B of weights), handovers "
                      f"{e['handover_seconds'] * 1e3:.3f} ms ({e['transfers']} transfers)", markup=False)


@cli.command()
def passes():
    """List every pass with its options, defaults and contract (what it ensures and excludes)."""
    from optc.registry import default_registry

    def facts(xs) -> str:
        return ", ".join(sorted(xs))

    for entry in default_registry():
        console.print(f"[bold]{entry.name}[/]{'  (lossy)' if entry.lossy else ''}  {entry.summary}")
        for name, field in entry.options_model.model_fields.items():
            if field.exclude:
                continue
            ann = field.annotation
            ann = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            ann = ann.replace("optc.passes.kv_cache.evict.", "")
            default = "required" if field.is_required() else repr(field.default)
            console.print(f"    {name}: {ann} = {default}  {field.description or ''}", markup=False)
        if entry.pass_class is not None:  # the contract with default options (some depend on options)
            c = entry.pass_class.contract(entry.options_model.model_construct())
            if c.requires:
                console.print(f"    requires: {facts(c.requires)}", markup=False)
            if c.ensures:
                console.print(f"    ensures: {facts(c.ensures)}", markup=False)
            if c.conflicts:
                console.print(f"    not with a pass that ensures: {facts(c.conflicts)}", markup=False)
            if c.precedes:
                console.print(f"    before a pass that ensures: {facts(c.precedes)}", markup=False)


@cli.group()
def config():
    """Pass configuration files."""


@config.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def config_show(file):
    """Validate FILE and print it back in normal form (all defaults filled in)."""
    from optc.config import load_config
    from optc.registry import default_registry

    click.echo(load_config(file, default_registry()).to_yaml(), nl=False)


def _sizes(ctx, param, value):
    if value is None:
        return None
    try:
        sizes = sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated token counts, e.g. 32,128,512") from None
    if not sizes or sizes[0] < 1:
        raise click.BadParameter(f"{value!r}: positive token counts")
    return sizes


def tvm_options(f):
    """Options of the TVM backend (compile and tune)."""
    opts = [
        click.option("--tune-trials", type=click.IntRange(min=0), default=None,
                     help="TVM: tuning budget; it buys the heaviest tasks, 32 trials each, and those the "
                          "database has already cost nothing (default 1000; 0 = use the database only)"),
        click.option("--tune-time-limit", type=click.FloatRange(min=1), default=None,
                     help="TVM: stop tuning after this many seconds (default 600)"),
        click.option("--tuning-cache", type=click.Path(path_type=Path), default=None,
                     help="TVM: tuning database root (default $OPTC_TUNING_CACHE or ~/.cache/optc/tvm-tuning)"),
        click.option("--prefill-sizes", callback=_sizes, default=None,
                     help="TVM: prompt lengths compiled for an empty cache (default 32,128,512)"),
        click.option("--cache-sizes", callback=_sizes, default=None,
                     help="TVM: cache capacities compiled for decode/continuation (default 128,...,2048)"),
        click.option("--cuda-arch", default=None,
                     help="TVM, --target gpu: the GPU architecture the fatbin is compiled for (default sm_90)"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


ORT_OPTIONS = {"fused_attention"}


def _backend_options(backend, **given):
    options = {k: v for k, v in given.items() if v is not None}
    wrong = sorted(k for k in options if (k in ORT_OPTIONS) != (backend == "onnxruntime"))
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise OptcError(f"{flags}: only for --backend {'onnxruntime' if wrong[0] in ORT_OPTIONS else 'tvm'}")
    return options


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path),
              help="pass configuration (YAML); default: identity pipeline")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="artifact directory")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime or tvm")
@click.option("--target", type=click.Choice(["cpu", "gpu", "npu"]), default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="replace an existing output directory")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="write the IR after each pass into DIR")
@click.option("--eval-text", type=click.Path(path_type=Path),
              help="held-out text for verification: decoders .jsonl with 'text' or .txt (default "
                   "models/data/heldout.jsonl); encoders .jsonl with 'query' and 'document' (default "
                   "models/data/encoder_pairs.jsonl)")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: beside MODEL)")
@click.option("--verify-length", default=256, show_default=True,
              help="tokens per verification prompt (longer prompts exercise prefill-side passes such as block_sparse)")
@click.option("--fused-attention/--no-fused-attention", default=None,
              help="onnxruntime: lower attention to ONNX Runtime's GroupQueryAttention with the cache written in "
                   "place, where the cache allows it (default: on; the compile log says which path ran)")
@tvm_options
@npu_options
def compile(model, config_path, output, backend, target, force, dump_ir, eval_text, tokenizer, verify_length,
            fused_attention, **tvm_opts):
    """Compile MODEL (ONNX) through the configured passes into an artifact, verifying accuracy.

    MODEL is a decoder (KV-cache layout; verified on held-out perplexity and top-1 agreement) or a
    BERT-style encoder (e.g. `optc export` of all-MiniLM-L6-v2; verified on pooled-embedding cosine
    and retrieval agreement; passes that need a decoder are refused before any runs; backend
    onnxruntime only). The kind is detected from the graph and recorded in the manifest."""
    from optc.compile import compile_model

    npu = _npu_options(target, tvm_opts)
    if target == "npu":  # its own backend: the onnxruntime/tvm flags do not apply
        given = sorted(k for k, v in {"fused_attention": fused_attention, **tvm_opts}.items() if v is not None)
        if given:
            raise OptcError(f"--{given[0].replace('_', '-')}: not for --target npu")
        options = npu
    else:
        options = _backend_options(backend, fused_attention=fused_attention, **tvm_opts)
    compile_model(model, output, config_path=config_path, backend=backend, target=target, force=force,
                  dump_ir=dump_ir, eval_text=eval_text, tokenizer=tokenizer, verify_length=verify_length,
                  backend_options=options, log=log)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path),
              help="pass configuration (YAML); default: identity pipeline")
@click.option("--target", type=click.Choice(["cpu", "gpu", "npu"]), default="cpu", show_default=True)
@tvm_options
def tune(model, config_path, target, **tvm_opts):
    """Pre-tune MODEL for the TVM backend: fill the tuning database, build nothing.

    A later `optc compile --backend tvm` of the same model and config (or of another model with
    the same workloads) then runs no new trials."""
    from optc.compile import tune_model

    tune_model(model, config_path=config_path, target=target, backend_options=_backend_options("tvm", **tvm_opts),
               log=log)


@cli.command()
@click.argument("key", type=click.Path(path_type=Path))
def keygen(key):
    """Write a new Ed25519 signing key to KEY (mode 0600) and its public key to KEY.pub."""
    from optc.runtime.signing import generate_key

    pub = generate_key(key)
    console.print(f"wrote {key} (private: keep it secret) and {pub} (give this to whoever loads your artifacts)")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), help="the Ed25519 private key (optc keygen)")
def sign(artifact, key):
    """Sign ARTIFACT's manifest (and so every file it lists) with KEY: writes manifest.sig."""
    from optc.runtime.artifact import artifact_id
    from optc.runtime.signing import sign as sign_artifact

    signer = sign_artifact(artifact, key)
    console.print(f"signed {artifact} ({artifact_id(artifact)}) with key {signer}; load it with "
                  f"trusted_keys=[<{key}.pub>] or optc run --trusted-key {key}.pub")


def _artifact_kind(artifact: Path) -> str | None:
    """model.kind of an artifact's manifest as written (for a one-line refusal; load() verifies)."""
    import json

    try:
        return (json.loads((Path(artifact) / "manifest.json").read_text()).get("model") or {}).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--expect", default=None, help="the artifact id to pin (sha256:...; optc compile prints it)")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path),
              help="an Ed25519 public key file one of which must have signed the artifact (repeatable)")
def embed(artifact, texts, batch_size, expect, trusted_keys):
    """Embed TEXTS with an encoder ARTIFACT: one JSON array (the pooled embedding) per line."""
    import json

    from optc.runtime import load

    if expect is not None and not expect.startswith("sha256:"):
        raise OptcError(f"--expect {expect!r}: an artifact id such as sha256:<64 hex digits>")
    m = load(artifact, expect=expect, trusted_keys=list(trusted_keys) or None)
    if getattr(m, "kind", None) != "encoder":
        raise OptcError(f"{artifact}: a decoder artifact generates text (optc run); optc embed takes an encoder")
    for row in m.embed(list(texts), batch_size=batch_size):
        sys.stdout.write(json.dumps([round(float(x), 6) for x in row]) + "\n")
    err_console.print(f"[dim]{len(texts)} text(s), {m.dim} dimensions, provider {m.provider}[/]")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.8, show_default=True)
@click.option("--top-k", default=40, show_default=True)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--expect", default=None, help="the artifact id to pin (sha256:...; optc compile prints it)")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path),
              help="an Ed25519 public key file one of which must have signed the artifact (repeatable)")
def run(artifact, prompt, max_new_tokens, temperature, top_k, top_p, seed, expect, trusted_keys):
    """Stream a generation from ARTIFACT."""
    from optc.runtime import load

    if expect is not None and not expect.startswith("sha256:"):
        raise OptcError(f"--expect {expect!r}: an artifact id such as sha256:<64 hex digits>")
    m = load(artifact, expect=expect, trusted_keys=list(trusted_keys) or None)
    if getattr(m, "kind", None) == "encoder":
        raise OptcError(f"{artifact}: an encoder artifact embeds text, it does not generate: optc embed {artifact} "
                        f"TEXT..., or optc.runtime.load(path).embed([...])")
    sys.stdout.write(prompt)
    for piece in m.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stream=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
    s = m.last_stats
    tps = s["new_tokens"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
    err_console.print(f"\n[dim]{s['new_tokens']} tokens, {tps:.1f} tokens/s, provider {m.provider}[/]")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--original", type=click.Path(path_type=Path), help="original ONNX model to compare against")
@click.option("--baseline", type=click.Path(path_type=Path),
              help="another artifact to compare against (e.g. the same config compiled for the other backend)")
@click.option("--hf", "hf_dir", type=click.Path(path_type=Path), help="HF checkpoint for the PyTorch eager column")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the results as JSON")
@click.option("--plot", type=click.Path(path_type=Path), help="write a PNG plot")
@click.option("--prompt-lengths", default="128,512,1024", show_default=True)
@click.option("--decode-tokens", default=32, show_default=True)
@click.option("--decode-contexts", default="128,2048", show_default=True,
              help="tokens already in context when decode speed is measured")
def bench(artifact, original, baseline, hf_dir, json_path, plot, prompt_lengths, decode_tokens, decode_contexts):
    """Benchmark ARTIFACT: TTFT, decode tokens/s, KV bytes, peak RSS (vs the original model)."""
    from optc.bench import run_bench

    if _artifact_kind(artifact) == "encoder":
        raise OptcError(f"{artifact}: optc bench measures decoders (TTFT, decode); for an encoder's speed and "
                        f"accuracy see scripts/token_dropping_bench.py and scripts/outlier_split_bench.py")

    def ints(text, option):
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or min(values) <= 0:
            raise OptcError(f"{option}: expected comma-separated positive integers, got {text!r}")
        return values

    run_bench(artifact, original=original, baseline=baseline, hf_dir=hf_dir, json_path=json_path, plot_path=plot,
              prompt_lengths=ints(prompt_lengths, "--prompt-lengths"), decode_tokens=decode_tokens,
              decode_contexts=ints(decode_contexts, "--decode-contexts"), log=log)


_default_showwarning = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """optc's own warnings print as one `warning: ...` line, not Python's file:line form."""
    if issubclass(category, PastContextWarning):
        err_console.print(f"warning: {message}", markup=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main(argv=None) -> None:
    shown_before, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        cli.main(args=argv, prog_name="optc", standalone_mode=False)
    except OptcError as e:
        err_console.print(f"error: {e}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # an optc bug, not bad input: still one line unless debugging
        if os.environ.get("OPTC_DEBUG"):
            raise
        err_console.print(f"internal error: {type(e).__name__}: {e} (set OPTC_DEBUG=1 for a traceback)",
                          markup=False, soft_wrap=True)
        sys.exit(3)
    finally:
        warnings.showwarning = shown_before  # in-process callers (tests, scripts) get theirs back


if __name__ == "__main__":
    main()
