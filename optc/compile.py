"""`optc compile`: load -> canonicalise -> passes -> backend -> verify -> artifact."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from optc import __version__
from optc.artifact import check_output_dir, publish, staging_dir, write_manifest
from optc.backends import get_backend
from optc.canonical import MODEL_KIND_ENCODER, EncoderInfo, canonicalize, canonicalize_any, model_kind
from optc.config import PipelineConfig, VerifyBudget, load_config
from optc.data import DATA_DIR, read_texts
from optc.errors import OptcError, VerificationError
from optc.ir import copy_model, embedding_table, load_model
from optc.passes.base import PassContext
from optc.pipeline import run_pipeline
from optc.registry import default_registry
from optc.runtime.artifact import artifact_id, sha256_file
from optc.runtime.manifest import ATTENTION_MASK, INPUT_IDS, POSITION_IDS

VERIFY_PROMPTS = 8
VERIFY_LENGTH = 256


def side_config(model_path: Path) -> dict:
    """bos/eos/context from the config.json that `optc export` (and optimum) put beside the ONNX."""
    out: dict = {}
    for name in ("config.json", "generation_config.json"):
        p = model_path.parent / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except ValueError:
                raise OptcError(f"{p}: invalid JSON") from None
            for key in ("bos_token_id", "eos_token_id"):
                if isinstance(data.get(key), int):
                    out[key] = data[key]
            if isinstance(data.get("max_position_embeddings"), int):
                out["context"] = data["max_position_embeddings"]
    return out


def _check_tokenizer(tok_path: Path) -> None:
    """The tokenizer the artifact will ship: a file the tokenizers library reads."""
    if not tok_path.is_file():
        raise OptcError(f"{tok_path}: tokenizer not found (export puts tokenizer.json beside the model; "
                        f"or pass --tokenizer)")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises its own Exception type
        raise OptcError(f"{tok_path}: not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from None


def check_token_inputs(model, model_path: Path) -> None:
    """The runtime feeds one sequence of any length: the token inputs need a batch axis of 1 (or
    a symbolic one) and a symbolic sequence axis. Refused here, not as a backend's shape error."""
    for value in model.graph.inputs:
        if value.name not in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS) or value.shape is None:
            continue
        dims = list(value.shape)
        if len(dims) != 2:
            raise OptcError(f"{model_path}: input {value.name!r} has {len(dims)} axes; a decoder's token "
                            f"inputs are [batch, sequence]")
        if isinstance(dims[0], int) and dims[0] != 1:
            raise OptcError(f"{model_path}: input {value.name!r} has a fixed batch of {dims[0]:,}; optc runs "
                            f"one sequence (batch 1 or a symbolic batch axis)")
        if isinstance(dims[1], int):
            raise OptcError(f"{model_path}: input {value.name!r} has a fixed sequence length of {dims[1]:,}; "
                            f"export with a dynamic sequence axis (the runtime feeds any number of tokens)")


def compile_model(model_path, out, *, config: PipelineConfig | None = None, config_path=None,
                  backend: str = "onnxruntime", target: str = "cpu", force: bool = False, dump_ir=None,
                  eval_text=None, tokenizer=None, verify: bool = True, verify_length: int = VERIFY_LENGTH,
                  backend_options: dict | None = None, log=print) -> dict:
    model_path, out = Path(model_path), Path(out)
    registry = default_registry()
    if config is None:
        config = load_config(config_path, registry) if config_path else PipelineConfig()
    protected = {"the input model": model_path, "the current directory": Path.cwd()}
    for what, path in (("the config", config_path), ("the tokenizer", tokenizer), ("the evaluation text", eval_text)):
        if path is not None:
            protected[what] = Path(path)
    check_output_dir(out, force, protected)
    if target == "npu" and backend != "onnxruntime":
        raise OptcError(f"--target npu compiles with its own backend (static NPU/CPU partitions through ONNX Runtime): "
                        f"drop --backend {backend}")
    backend_mod = get_backend("npu" if target == "npu" else backend)
    if verify and verify_length < 64:
        raise OptcError(f"--verify-length {verify_length}: at least 64 tokens")

    log(f"loading {model_path}")
    model = load_model(model_path)
    check_token_inputs(model, model_path)
    if model_kind(model) == MODEL_KIND_ENCODER and "encoder" not in getattr(backend_mod, "MODEL_KINDS", ("decoder",)):
        raise OptcError(ENCODER_REFUSALS.get("npu" if target == "npu" else backend,
                                             f"--backend {backend}: lowers decoders only"))
    info = canonicalize_any(model)  # a decoder in canonical form, or a BERT-style encoder
    tok_path = Path(tokenizer) if tokenizer else model_path.parent / "tokenizer.json"
    _check_tokenizer(tok_path)
    if isinstance(info, EncoderInfo):
        return compile_encoder(model, info, model_path, out, config=config, registry=registry, backend=backend,
                               backend_mod=backend_mod, target=target, force=force, dump_ir=dump_ir,
                               eval_text=eval_text, tok_path=tok_path, verify=verify,
                               backend_options=backend_options, log=log)
    texts = read_texts(eval_text) if verify else []
    side = side_config(model_path)
    if info.context is None and "context" in side:
        info.context = side["context"]
    rewrites = ", ".join(f"{k}×{v}" for k, v in info.rewrites.items()) or "none needed"
    log(f"canonical decoder: {info.n_layers} layers, {info.num_heads} heads / {info.kv_heads} KV heads, "
        f"head dim {info.head_dim}, vocab {info.vocab_size} (rewrites: {rewrites})")

    budget, budget_source = effective_budget(config, registry)
    if budget_source != "config":
        log(f"accuracy budget: perplexity increase ≤ {budget.max_perplexity_increase:+.1%} ({budget_source})")
    context = PassContext(target=target, decoder=info, tokenizer=tok_path, bos_token_id=side.get("bos_token_id"),
                          log=log)
    log(f"pipeline: {len(config.passes)} pass(es)" + ("" if config.passes else " (identity)"))
    records = run_pipeline(model, config, registry, context, dump_dir=Path(dump_ir) if dump_ir else None, log=log)

    # A CUDA artifact from the TVM backend cannot run here (compiling needs no GPU): its graph is
    # verified on the CPU through ONNX Runtime instead, and expected logits go into the artifact
    # for scripts/gpu_check.sh to hold the GPU to.
    runs_here = not (backend == "tvm" and target == "gpu")
    if not runs_here and not texts:
        texts = read_texts(eval_text)
    cpu_twin_graph = None if runs_here else copy_model(model)  # the backend rewrites its copy
    embedding = embedding_table(model, INPUT_IDS)  # named before the backend rewrites the graph
    with staging_dir(out) as staging:
        kv_cache = kv_cache_section(context)
        backend_section = backend_mod.compile(model, info, staging, target, kv_cache=kv_cache,
                                              prefill=context.runtime.prefill(),
                                              options=backend_options, log=log)
        shutil.copyfile(tok_path, staging / "tokenizer.json")
        manifest = {
            "optc_version": __version__,
            "source": {"file": model_path.name, "sha256": sha256_file(model_path)},
            "model": {"kind": "decoder", **info.summary(), "bos_token_id": side.get("bos_token_id"),
                      "eos_token_id": side.get("eos_token_id"), "embedding": embedding},
            "target": target,
            "backend": backend_section,
            "passes": config.to_dict()["passes"],
            "kv_cache": kv_cache,
            "verify_budget": {**budget.model_dump(), "source": budget_source},
            "tokenizer": "tokenizer.json",
        }
        if context.runtime.layer_routing is not None:  # which layers decode may skip (layer_routing)
            manifest["layer_routing"] = context.runtime.layer_routing.to_dict()
        if context.reports:  # per-layer statistics passes report (outlier_split's outlier channels)
            manifest["pass_reports"] = context.reports
        write_manifest(staging, manifest, staging=True)  # the runtime needs it to verify the staged artifact
        # A lossy pass may act on cached tokens only (KV compression, eviction) or on prefill
        # only (block-sparse prefill): lossy pipelines are verified both ways — prefill of the
        # whole prompt but its last 16 tokens, and prefill 32 then decode the rest — and the
        # worse of the two is what the budget sees.
        lossy = any(registry.get(p.name).lossy for p in config.passes)
        modes = (16, verify_length - 32) if lossy else (16,)
        if not runs_here:
            with tempfile.TemporaryDirectory(prefix="optc-cpu-twin-") as tmp:
                twin = _write_cpu_twin(cpu_twin_graph, info, Path(tmp), manifest, tok_path)
                if verify:
                    log("verifying the rewritten graph on this machine's CPU with ONNX Runtime "
                        "(the CUDA artifact needs a GPU: scripts/gpu_check.sh checks it there)")
                    manifest["verification"] = _verify(twin, model_path, info, texts, budget, modes, verify_length,
                                                       log)
                manifest["gpu_check"] = write_expected_logits(twin, staging, texts, log)
        elif verify and target == "npu":
            # the HTP simulator takes about a second a decode step: the budget is checked on the same
            # partition files through ONNX Runtime's CPU EP (same QDQ arithmetic); the backend has
            # loaded every NPU partition on the NPU provider already, and scripts/npu_bench.py
            # measures the simulator's own accuracy
            from optc.runtime.executors.npu import npu_partitions_on_cpu

            log("verifying the NPU artifact's partitions through ONNX Runtime's CPU EP (the HTP simulator is too "
                "slow for 8 × 256 tokens; scripts/npu_bench.py measures it)")
            with npu_partitions_on_cpu():
                manifest["verification"] = _verify(staging, model_path, info, texts, budget, modes, verify_length,
                                                   log)
        elif verify:
            manifest["verification"] = _verify(staging, model_path, info, texts, budget, modes, verify_length, log)
        return _publish(staging, out, force, manifest, records, log)



def _publish(staging: Path, out: Path, force: bool, manifest: dict, records, log) -> dict:
    """The manifest with every file's hash, then the staging directory moved into place."""
    full = write_manifest(staging, manifest)
    publish(staging, out, force)
    total = sum(r.seconds for r in records)
    log(f"wrote {out} ({len(full['files'])} files; passes took {total:.2f}s)")
    log(f"artifact id {artifact_id(out)} (pin it: optc.runtime.load(path, expect=ID))")
    return full

GPU_CHECK_FILE = "expected_logits.safetensors"
GPU_CHECK_PREFILL, GPU_CHECK_DECODE = 64, 32
GPU_CHECK_TOLERANCE = 1e-3  # max |Δlogit| the GPU may differ from ONNX Runtime on the CPU


def _write_cpu_twin(graph, info, root: Path, manifest: dict, tok_path: Path) -> Path:
    """The same rewritten graph as an ONNX Runtime CPU artifact (the GPU artifact's stand-in here)."""
    from optc.backends import onnxruntime as ort_backend

    section = ort_backend.compile(graph, info, root, "cpu", log=lambda _msg: None)
    shutil.copyfile(tok_path, root / "tokenizer.json")
    write_manifest(root, {**{k: v for k, v in manifest.items() if k != "files"}, "target": "cpu",
                          "backend": section}, staging=True)
    return root


def write_expected_logits(reference_artifact: Path, staging: Path, texts, log) -> dict:
    """Logits the GPU artifact must reproduce: one held-out prompt, prefill then decode, run by
    `reference_artifact` (ONNX Runtime, same graph). Written beside the artifact's library."""
    from safetensors.numpy import save_file

    from optc.runtime.model import load_unpublished
    from optc.verify import artifact_logits, token_windows

    reference = load_unpublished(reference_artifact)
    n = GPU_CHECK_PREFILL + GPU_CHECK_DECODE
    ids = token_windows(reference.tokenizer, texts, reference.config.get("bos_token_id"), count=1, length=n)[0]
    logits = artifact_logits(reference, ids, GPU_CHECK_DECODE).astype(np.float32)
    save_file({"input_ids": ids.astype(np.int64), "logits": np.ascontiguousarray(logits)},
              str(staging / GPU_CHECK_FILE))
    log(f"wrote {GPU_CHECK_FILE}: {n} tokens of expected logits ({GPU_CHECK_PREFILL} prefilled, "
        f"{GPU_CHECK_DECODE} decoded) from ONNX Runtime on the CPU, for scripts/gpu_check.sh")
    return {"file": GPU_CHECK_FILE, "prefill_tokens": GPU_CHECK_PREFILL, "decode_tokens": GPU_CHECK_DECODE,
            "max_abs_logit_diff": GPU_CHECK_TOLERANCE, "reference": "onnxruntime (CPU), same rewritten graph"}


def kv_cache_section(context: PassContext) -> dict:
    """The manifest's kv_cache section: what the passes asked of the runtime's cache."""
    return context.runtime.kv_cache.to_dict()


def run_config_passes(model, info, model_path, config_path=None, tokenizer=None, log=print) -> None:
    """The compile's pass pipeline on `model` (optc inspect --target npu shows the result's partition)."""
    registry = default_registry()
    config = load_config(config_path, registry) if config_path else PipelineConfig()
    side = side_config(Path(model_path))
    tok_path = Path(tokenizer) if tokenizer else Path(model_path).parent / "tokenizer.json"
    if config.passes:
        _check_tokenizer(tok_path)
    context = PassContext(target="npu", decoder=info, tokenizer=tok_path, bos_token_id=side.get("bos_token_id"),
                          log=log)
    run_pipeline(model, config, registry, context, log=log)


def tune_model(model_path, *, config_path=None, target: str = "cpu", backend_options: dict | None = None,
               log=print) -> dict:
    """`optc tune`: the compile's front half (canonicalise, passes), then TVM tuning only."""
    from optc.backends.tvm import pipeline as tvm_backend

    if (backend_options or {}).get("tune_trials") == 0:
        raise OptcError("--tune-trials 0: optc tune has nothing to do without trials")
    registry = default_registry()
    config = load_config(config_path, registry) if config_path else PipelineConfig()
    log(f"loading {model_path}")
    model = load_model(Path(model_path))
    check_token_inputs(model, Path(model_path))
    info = canonicalize(model)
    context = PassContext(target=target, decoder=info)
    run_pipeline(model, config, registry, context, log=log)
    stats = tvm_backend.tune(model, info, target, kv_cache=kv_cache_section(context),
                             prefill=context.runtime.prefill(), options=backend_options, log=log)
    log(f"tuning database: {stats['database_key']} ({stats['tasks']} tasks: {stats['from_database']} known, "
        f"{stats['new_tasks']} new, {stats['trials']} trials in {stats['seconds']:.0f}s)")
    return stats


def effective_budget(config: PipelineConfig, registry) -> tuple[VerifyBudget, str]:
    """The config's `verify:` budget; where it sets no perplexity budget, the sum of what the
    pipeline's lossy passes declare (so a lossy compile is never unbudgeted)."""
    if config.verify.max_perplexity_increase is not None:
        return config.verify, "config"
    declared = [registry.get(p.name).declared_perplexity_budget(p.options) for p in config.passes]
    declared = [d for d in declared if d is not None]
    if not declared:
        return config.verify, "config"
    total = round(sum(declared), 6)
    return config.verify.model_copy(update={"max_perplexity_increase": total}), "declared by passes"


def _verify(staging: Path, model_path: Path, info, texts, budget: VerifyBudget, modes: tuple[int, ...],
            length: int, log) -> dict:
    from optc.runtime.model import load_unpublished
    from optc.verify import (CONTINUATION_TOKENS, ReferenceModel, check_budget, compare, compare_continuation,
                             token_windows)

    artifact = load_unpublished(staging)
    windows = token_windows(artifact.tokenizer, texts, artifact.config.get("bos_token_id"),
                            count=VERIFY_PROMPTS, length=length)
    reference = ReferenceModel(model_path, info)
    reports = []
    if artifact.pruned_from_layer is not None:  # a prompt-dropping pipeline: judged on the continuation
        log(f"verifying on {len(windows)} held-out prompts × {length - CONTINUATION_TOKENS} tokens: perplexity of "
            f"the {CONTINUATION_TOKENS} tokens after each prompt, teacher-forced (provider {artifact.provider})")
        modes = ()
        reports.append(compare_continuation(artifact, reference, windows))
    for decode_tokens in modes:
        log(f"verifying on {len(windows)} held-out prompts × {length} tokens, the last {decode_tokens} "
            f"decoded one by one (provider {artifact.provider})")
        reports.append(compare(artifact, reference, windows, decode_tokens=decode_tokens))
    report = worst_case(reports)
    report["provider"] = artifact.provider
    log(format_report(report))
    failures = check_budget(report, budget)
    if failures:
        raise VerificationError("accuracy budget exceeded: " + "; ".join(failures) + " (artifact not written)")
    return report


def worst_case(reports: list[dict]) -> dict:
    """One report holding, per metric, the worst value over the verification modes (and each mode)."""
    if len(reports) == 1:
        return dict(reports[0])
    worst_ppl = max(reports, key=lambda r: r["perplexity_increase"])
    out = dict(worst_ppl)
    out["top1_agreement"] = min(r["top1_agreement"] for r in reports)
    out["max_abs_logit_diff"] = max(r["max_abs_logit_diff"] for r in reports)
    out["decode_tokens_per_prompt"] = [r["decode_tokens_per_prompt"] for r in reports]
    out["modes"] = reports
    return out


def format_report(r: dict) -> str:
    rows = [
        ("perplexity (original → artifact)", f"{r['perplexity_original']:.4f} → {r['perplexity_artifact']:.4f} "
                                             f"({r['perplexity_increase']:+.3%})"),
        ("top-1 next-token agreement", f"{r['top1_agreement']:.2%}"),
        ("max |Δlogit|", f"{r['max_abs_logit_diff']:.3g}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "verification:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------- encoders
# Why a backend or target that does not lower encoders refuses one (before any pass runs)
ENCODER_REFUSALS = {
    "tvm": "--backend tvm lowers decoders only (prefill/decode shape buckets over a KV cache); it has no encoder "
           "lowering: compile encoders with --backend onnxruntime",
}
ENCODER_SIDE_DEFAULT_MAX_LENGTH = 512


def encoder_side_config(model_path: Path, tok_path: Path, info: EncoderInfo) -> dict:
    """How the runtime tokenizes and pools, from the sentence-transformers files `optc export`
    copies beside the ONNX (sentence_bert_config.json: max_seq_length; modules.json: a Normalize
    module) and the tokenizer (its padding id); otherwise the model's context, no normalisation."""
    out = {"max_length": info.context or ENCODER_SIDE_DEFAULT_MAX_LENGTH, "normalize": False, "pad_token_id": 0}
    d = model_path.parent
    for name in ("sentence_bert_config.json", "modules.json"):
        p = d / name
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text())
        except ValueError:
            raise OptcError(f"{p}: invalid JSON") from None
        if name == "modules.json" and isinstance(data, list):
            out["normalize"] = any(isinstance(m, dict) and str(m.get("type", "")).endswith(".Normalize") for m in data)
        elif isinstance(data, dict) and isinstance(data.get("max_seq_length"), int) and data["max_seq_length"] > 0:
            out["max_length"] = data["max_seq_length"]
    pooling = d / "pooling_config.json"  # what `optc export` copies from 1_Pooling/config.json
    if pooling.is_file():
        try:
            modes = {k for k, v in json.loads(pooling.read_text()).items() if k.startswith("pooling_mode_") and v}
        except (ValueError, AttributeError):
            raise OptcError(f"{pooling}: invalid JSON object") from None
        if modes != {"pooling_mode_mean_tokens"}:
            raise OptcError(f"{pooling}: the model pools by {', '.join(sorted(modes)) or 'nothing'}; optc's runtime "
                            f"mean-pools only (pooling_mode_mean_tokens)")
    if info.context is not None:
        out["max_length"] = min(out["max_length"], info.context)
    try:
        tok = json.loads(tok_path.read_text())
        pad = (tok.get("padding") or {}).get("pad_id")
        if isinstance(pad, int) and 0 <= pad < info.vocab_size:
            out["pad_token_id"] = pad
    except ValueError:
        pass  # (_check_tokenizer has read it)
    return out


def effective_encoder_budget(config: PipelineConfig, planned) -> tuple[VerifyBudget, str]:
    """An encoder's budget: the config's min_embedding_cosine / min_retrieval_agreement, or what
    the pipeline's lossy passes declare (losses add: 1 - Σ(1 - declared)). A decoder's budget key
    in the config is refused: an encoder has no logits."""
    v = config.verify
    for key in ("max_perplexity_increase", "min_top1_agreement", "max_abs_logit_diff"):
        if getattr(v, key) is not None:
            raise OptcError(f"verify.{key}: an encoder has no logits; its budget is verify.min_embedding_cosine / "
                            f"verify.min_retrieval_agreement")
    if v.min_embedding_cosine is not None or v.min_retrieval_agreement is not None:
        return v, "config"
    declared = [d for p in planned if (d := p.pass_class.declared_embedding_budget(p.options))]
    if not declared:
        return v, "config"
    update = {}
    for key in ("min_embedding_cosine", "min_retrieval_agreement"):
        losses = [1 - d[key] for d in declared if key in d]
        if losses:
            update[key] = round(max(0.0, 1 - sum(losses)), 6)
    return v.model_copy(update=update), "declared by passes"


def compile_encoder(model, info: EncoderInfo, model_path: Path, out: Path, *, config: PipelineConfig, registry,
                    backend: str, backend_mod, target: str, force: bool, dump_ir, eval_text, tok_path: Path,
                    verify: bool, backend_options: dict | None, log) -> dict:
    """`optc compile` of a BERT-style encoder: passes (decoder-only ones refused by their contract),
    the ONNX Runtime backend, verification of pooled embeddings against the original graph on
    held-out query/document pairs, and an artifact the runtime loads as an EncoderModel."""
    from optc.pipeline import plan
    from optc.verify import read_pairs

    log(f"canonical encoder: {info.n_layers} layers, {info.num_heads} heads, hidden {info.hidden_size}, "
        f"vocab {info.vocab_size}, inputs {', '.join(info.inputs)} -> {info.output}")
    budget, budget_source = effective_encoder_budget(config, plan(config, registry))
    if budget_source != "config":
        log(f"accuracy budget: pooled-embedding cosine ≥ {budget.min_embedding_cosine}, retrieval top-1 agreement "
            f"≥ {budget.min_retrieval_agreement} ({budget_source})")
    pairs = read_pairs(eval_text) if verify else []
    side = encoder_side_config(model_path, tok_path, info)
    if target == "npu":  # its options and what its static graph cannot hold, refused before any pass runs
        backend_mod.encoder_options(backend_options, side["max_length"])
        if any(p.name == "token_dropping" for p in config.passes):
            raise OptcError("--target npu: token_dropping's kept-token count and pooling weights are not built into "
                            "the static encoder graph: compile token_dropping for --target cpu")
    context = PassContext(target=target, decoder=None, tokenizer=tok_path, log=log)
    log(f"pipeline: {len(config.passes)} pass(es)" + ("" if config.passes else " (identity)"))
    records = run_pipeline(model, config, registry, context, dump_dir=Path(dump_ir) if dump_ir else None, log=log)
    embedding = embedding_table(model, INPUT_IDS)
    with staging_dir(out) as staging:
        if target == "npu":  # one static graph: every text is padded (or truncated) to its max_length
            backend_section = backend_mod.compile_encoder(model, info, staging, target, options=backend_options,
                                                          model_max_length=side["max_length"],
                                                          pooling_weights=context.runtime.pooling_weights, log=log)
            side["max_length"] = backend_section["max_length"]
        else:
            backend_section = backend_mod.compile_encoder(model, info, staging, target, options=backend_options,
                                                          log=log)
        shutil.copyfile(tok_path, staging / "tokenizer.json")
        from optc.runtime.manifest import EncoderSpec

        spec = EncoderSpec(**{k: v for k, v in info.summary().items() if k != "kind"}, **side, pooling="mean",
                           pooling_weights=context.runtime.pooling_weights, embedding=embedding)
        manifest = {
            "optc_version": __version__,
            "source": {"file": model_path.name, "sha256": sha256_file(model_path)},
            "model": spec.to_dict(),
            "target": target,
            "backend": backend_section,
            "passes": config.to_dict()["passes"],
            "verify_budget": {**budget.model_dump(), "source": budget_source},
            "tokenizer": "tokenizer.json",
        }
        if context.reports:
            manifest["pass_reports"] = context.reports
        write_manifest(staging, manifest, staging=True)
        if verify:
            manifest["verification"] = _verify_encoder(staging, model_path, pairs, budget, log)
        return _publish(staging, out, force, manifest, records, log)


def _verify_encoder(staging: Path, model_path: Path, pairs, budget: VerifyBudget, log) -> dict:
    from optc.runtime.model import load_unpublished
    from optc.verify import EncoderReference, check_encoder_budget, compare_embeddings, format_encoder_report

    artifact = load_unpublished(staging)
    log(f"verifying pooled embeddings on {len(pairs)} held-out query/document pairs against ONNX Runtime on the "
        f"original graph (provider {artifact.provider})")
    short = [t for t in (DATA_DIR / "sentences.txt").read_text(encoding="utf-8").splitlines() if t.strip()] \
        if (DATA_DIR / "sentences.txt").is_file() else None
    report = compare_embeddings(artifact, EncoderReference(model_path), pairs, short_texts=short)
    report["provider"] = artifact.provider
    log(format_encoder_report(report, budget))
    if short and budget.min_embedding_cosine is not None and report["short_cosine_mean"] < budget.min_embedding_cosine:
        why = "token dropping keeps a share of each input's tokens; " if artifact.spec.pooling_weights else ""
        log(f"[yellow]warning[/]: on short sentences the pooled-embedding cosine is {report['short_cosine_mean']:.4f}, "
            f"below the {budget.min_embedding_cosine:.4f} the held-out passages are held to ({why}verify with "
            f"--eval-text pairs like your inputs)")
    failures = check_encoder_budget(report, budget)
    if failures:
        raise VerificationError("accuracy budget exceeded: " + "; ".join(failures) + " (artifact not written)")
    return report
