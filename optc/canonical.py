"""Canonicalisation: find the decoder in an exported ONNX graph and put it in optc's canonical form.

Canonical form (what every pass may assume; docs/architecture.md, "Canonical form"):
  * interface: input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value ->
    logits, present.{i}.key/.value  ([batch, kv_heads, seq, head_dim] KV tensors);
  * per layer i: present.{i}.key = Concat(past_key_values.{i}.key, new_key_i, axis=2), same for
    values, and one standard ONNX `Attention` op (opset 23) whose K/V inputs are the present
    tensors themselves (grouped-query attention native: no repeat_kv Expand/Reshape in between).

Recognised exporter patterns are rewritten into that form; anything the canonicaliser cannot
match is a `CanonicalizationError` naming what was not found.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from optc.errors import OptcError
from optc.runtime.manifest import ATTENTION_MASK, CONTEXT_METADATA_KEY, INPUT_IDS, POSITION_IDS, past_name

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


class CanonicalizationError(OptcError):
    pass


@dataclass
class LayerInfo:
    index: int
    attention: str            # node name of the layer's Attention op
    new_key: str              # value name: this step's keys (the Concat's second input)
    new_value: str


@dataclass
class DecoderInfo:
    n_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context: int | None
    rotary: str
    norm: str
    mlp: str
    rewrites: dict[str, int] = field(default_factory=dict)
    layers: list[LayerInfo] = field(default_factory=list)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("layers")
        return d


def _dims(value: ir.Value) -> list:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else None for d in value.shape]


def analyze(model: ir.Model) -> DecoderInfo:
    """Find the decoder structure; rewrite recognised patterns into canonical form (in place)."""
    from optc.canonical_patterns import (attention_rules, closest_misses_by_layer, describe_by_layer,
                                         downstream_nodes, fold_partial_rotary, read_through_repeat_kv,
                                         rewrite_decomposed_attention, rewrite_decomposed_rotary,
                                         simplify_trivial_concats, strip_noop_output_casts)
    from optc.canonical_positions import expose_position_ids
    from optc.canonical_precision import upcast_half_precision

    rewrites: dict[str, int] = {}
    if n := upcast_half_precision(model):
        rewrites["float16_upcast_to_float32"] = n
    first_key = next((v for v in model.graph.inputs if v.name == past_name(0, "key")), None)
    key_dims = _dims(first_key) if first_key is not None else []
    head_dim_hint = key_dims[3] if len(key_dims) == 4 else None  # checked properly below
    if not any(n.op_type == "Attention" and n.domain == "" for n in model.graph):
        # may replace model.graph (opset upgrade)
        rewrites.update(rewrite_decomposed_attention(model, head_dim_hint))
    if n := simplify_trivial_concats(model):
        rewrites["trivial_concat_removed"] = n
    if n := strip_noop_output_casts(model):
        rewrites["noop_output_cast_removed"] = n
    g = model.graph
    inputs = {v.name: v for v in g.inputs}
    outputs = {v.name: v for v in g.outputs}
    for required in (INPUT_IDS, ATTENTION_MASK):
        if required not in inputs:
            raise CanonicalizationError(f"graph input {required!r} not found (inputs: {', '.join(list(inputs)[:6])})")
    if "logits" not in outputs:
        raise CanonicalizationError(f"graph output 'logits' not found (outputs: {', '.join(list(outputs)[:6])})")

    past = {(int(m[1]), m[2]): v for n, v in inputs.items() if (m := _PAST.match(n))}
    present = {(int(m[1]), m[2]): v for n, v in outputs.items() if (m := _PRESENT.match(n))}
    n_layers = len({i for i, _ in past})
    if n_layers == 0:
        raise CanonicalizationError("no KV-cache inputs named past_key_values.N.key / .value: not a decoder with "
                                    "a KV cache in the optimum/transformers.js layout")
    for i in range(n_layers):
        for kind in ("key", "value"):
            if (i, kind) not in past:
                raise CanonicalizationError(f"graph input past_key_values.{i}.{kind} not found")
            if (i, kind) not in present:
                raise CanonicalizationError(f"graph output present.{i}.{kind} not found")

    kv_dims = _dims(past[(0, "key")])
    if len(kv_dims) != 4 or kv_dims[1] is None or kv_dims[3] is None:
        raise CanonicalizationError(f"past_key_values.0.key: expected static [batch, kv_heads, past, head_dim], "
                                    f"got {past[(0, 'key')].shape}")
    kv_heads, head_dim = kv_dims[1], kv_dims[3]
    ops = {n.op_type for n in g}
    rotary_miss = None
    if "RotaryEmbedding" not in ops and {"Sin", "Cos"} <= ops:
        done, rotary_miss = rewrite_decomposed_rotary(model, head_dim)  # may upgrade the opset
        rewrites.update(done)
        g = model.graph
    elif "RotaryEmbedding" in ops and "Concat" in ops:  # dynamo opset 23: partial rotary left split
        rewrites.update(fold_partial_rotary(model, head_dim))
    if POSITION_IDS not in inputs and expose_position_ids(model)[0]:  # optimum's Gemma
        rewrites["position_ids_exposed_as_input"] = 1

    attention_nodes = [n for n in g if n.op_type == "Attention" and n.domain == ""]
    if len(attention_nodes) != n_layers:
        miss = None
        if len(attention_nodes) < n_layers:  # say, per layer without one, what blocked the rules
            attention_ids = {id(n) for n in attention_nodes}
            unmatched = {}
            for i in range(n_layers):
                cache = [present[(i, kind)] for kind in ("key", "value")]
                if not attention_ids & downstream_nodes(cache):
                    unmatched[i] = cache
            miss = describe_by_layer(closest_misses_by_layer(attention_rules(head_dim), model, unmatched))
        raise CanonicalizationError(
            f"found {len(attention_nodes)} attention ops (standard ONNX Attention or the MatMul-Softmax-MatMul "
            f"pattern) for {n_layers} KV-cache layers"
            + (f"; {miss}" if miss else ""))

    layers = []
    # what each Attention's key and value inputs read: (the cache, None) through repeat_kv, else
    # (the input itself, why it is not repeat_kv)
    reads = {n: [read_through_repeat_kv(model, n.inputs[slot]) for slot in (1, 2)] for n in attention_nodes}
    for i in range(n_layers):
        new = {}
        for kind in ("key", "value"):
            pres = present[(i, kind)]
            cat = pres.producer()
            if cat is None or cat.op_type != "Concat" or cat.inputs[0] is not past[(i, kind)]:
                raise CanonicalizationError(
                    f"present.{i}.{kind} is not Concat(past_key_values.{i}.{kind}, new) "
                    f"(produced by {cat.op_type if cat else 'nothing'})")
            axis = cat.attributes["axis"].value
            if axis not in (2, -2):
                raise CanonicalizationError(f"present.{i}.{kind}: KV concat along axis {axis}, expected 2")
            new[kind] = cat.inputs[1]
        # the Attention op that reads this layer's cache, directly or through repeat_kv
        users = [n for n in attention_nodes if reads[n][0][0] is present[(i, "key")]]
        if len(users) != 1:
            near, cache_keys = downstream_nodes([present[(i, "key")]]), {present[(j, "key")] for j in range(n_layers)}
            why = next((f"; the key input of Attention node {n.name!r} is not repeat_kv of it: {reads[n][0][1]}"
                        for n in attention_nodes if id(n) in near and reads[n][0][0] not in cache_keys), "")
            raise CanonicalizationError(f"layer {i}: no single Attention op reads present.{i}.key{why}")
        attn = users[0]
        for slot, kind in ((1, "key"), (2, "value")):
            source, why = reads[attn][slot - 1]
            if source is not present[(i, kind)]:
                raise CanonicalizationError(
                    f"Attention node {attn.name!r}: its {kind} input is not the layer's present tensor "
                    f"{present[(i, kind)].name!r} (nor repeat_kv of it: {why})")
            if attn.inputs[slot] is not source:  # GQA is the Attention op's own: it reads the cache
                attn.replace_input_with(slot, source)
                rewrites["repeat_kv_removed"] = rewrites.get("repeat_kv_removed", 0) + 1
        layers.append(LayerInfo(i, attn.name, new["key"].name, new["value"].name))

    logits_dims = _dims(outputs["logits"])
    vocab = logits_dims[-1] if logits_dims else None
    hidden = None
    embed = _embedding_table(g, inputs[INPUT_IDS])
    if embed is not None:
        vocab, hidden = embed
    if not vocab:
        raise CanonicalizationError("cannot tell the vocabulary size (no static logits dim, no embedding Gather)")

    q_dims = _dims(attention_nodes[0].inputs[0])
    num_heads = q_dims[1] if len(q_dims) == 4 and q_dims[1] else None
    num_heads = num_heads or attention_nodes[0].attributes.get_int("q_num_heads", 0) or None
    if num_heads is None and hidden and hidden % head_dim == 0:
        num_heads = hidden // head_dim  # graphs without shape annotations (TorchScript exports)
    if num_heads is None:
        raise CanonicalizationError(f"Attention node {attention_nodes[0].name!r}: cannot tell the number of query heads")
    hidden = hidden or num_heads * head_dim

    ops = {n.op_type for n in g}
    rotary = ("RotaryEmbedding" if "RotaryEmbedding" in ops else "decomposed (Sin/Cos)" if {"Sin", "Cos"} <= ops
              else "none found")
    if rotary_miss and rotary != "RotaryEmbedding":
        rotary += f", not rewritten: {rotary_miss}"
    norm = ("RMSNormalization" if "RMSNormalization" in ops else "SimplifiedLayerNormalization"
            if "SimplifiedLayerNormalization" in ops else "LayerNormalization" if "LayerNormalization" in ops
            else "decomposed (Pow/ReduceMean)" if {"Pow", "ReduceMean"} <= ops else "none found")
    mlp = "SwiGLU (Sigmoid gate)" if "Sigmoid" in ops else "GELU" if "Gelu" in ops else "unknown"
    context = None
    meta = model.metadata_props.get(CONTEXT_METADATA_KEY)
    if meta and meta.isdigit():
        context = int(meta)
    return DecoderInfo(n_layers=n_layers, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                       hidden_size=hidden, vocab_size=vocab, context=context, rotary=rotary, norm=norm, mlp=mlp,
                       rewrites=rewrites, layers=layers)


def _embedding_table(g: ir.Graph, input_ids: ir.Value) -> tuple[int, int] | None:
    """(vocab, hidden) of the Gather that embeds input_ids (GPT-2 reshapes the ids first)."""
    frontier = [input_ids]
    for _ in range(3):
        nxt = []
        for value in frontier:
            for use in value.uses():
                node = use.node if hasattr(use, "node") else use[0]
                if node.op_type == "Gather":
                    dims = _dims(node.inputs[0])
                    if len(dims) == 2 and all(dims):
                        return dims[0], dims[1]
                elif node.op_type in ("Reshape", "Cast", "Unsqueeze") and node.inputs[0] is value:
                    nxt.append(node.outputs[0])
        frontier = nxt
    return None


def canonicalize(model: ir.Model) -> DecoderInfo:
    info = analyze(model)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    return info


# ---------------------------------------------------------------- encoders
MODEL_KIND_DECODER, MODEL_KIND_ENCODER = "decoder", "encoder"
ENCODER_TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, "token_type_ids")


def model_kind(model: ir.Model) -> str | None:
    """'decoder' (a KV cache or logits), 'encoder' (token inputs -> one [batch, seq, hidden]
    output, no cache), or None when the graph is neither."""
    inputs = {v.name for v in model.graph.inputs}
    outputs = list(model.graph.outputs)
    if any(_PAST.match(n) for n in inputs) or any(v.name == "logits" for v in outputs):
        return MODEL_KIND_DECODER
    if INPUT_IDS in inputs and outputs and outputs[0].shape is not None and len(outputs[0].shape) == 3:
        return MODEL_KIND_ENCODER
    return None


@dataclass
class EncoderInfo:
    """A BERT-style encoder as the canonicaliser found it (the manifest's `model` section,
    runtime/manifest.py EncoderSpec)."""

    n_layers: int
    num_heads: int
    hidden_size: int
    vocab_size: int
    context: int | None
    norm: str
    mlp: str
    inputs: list[str]
    output: str
    rewrites: dict[str, int] = field(default_factory=dict)
    kind: str = MODEL_KIND_ENCODER

    def summary(self) -> dict:
        return asdict(self)


def analyze_encoder(model: ir.Model) -> EncoderInfo:
    """Find a BERT-style encoder: token inputs (input_ids, attention_mask, optional token_type_ids)
    -> one hidden-state output [batch, seq, hidden], one attention (Softmax over Add(scaled Q·Kᵀ,
    mask)) per layer. Anything else is a CanonicalizationError naming what and where."""
    from optc.passes.base import PassConfigError
    from optc.passes.token_dropping.encoder import find_encoder_layers

    g = model.graph
    names = [v.name for v in g.inputs]
    for required in (INPUT_IDS, ATTENTION_MASK):
        if required not in names:
            raise CanonicalizationError(f"encoder: graph input {required!r} not found (inputs: {', '.join(names[:6])})")
    extra = [n for n in names if n not in ENCODER_TOKEN_INPUTS]
    if extra:
        raise CanonicalizationError(f"encoder: graph input {extra[0]!r} is not one optc feeds (an encoder takes "
                                    f"{', '.join(ENCODER_TOKEN_INPUTS)})")
    if len(g.outputs) != 1:
        raise CanonicalizationError(f"encoder: expected one output (the hidden states), found {len(g.outputs)} "
                                    f"({', '.join(v.name for v in g.outputs)[:120]})")
    out = g.outputs[0]
    dims = _dims(out)
    if len(dims) != 3 or dims[2] is None or out.dtype != ir.DataType.FLOAT:
        raise CanonicalizationError(f"encoder: output {out.name!r} is not float32 [batch, sequence, hidden] "
                                    f"(shape {out.shape}, type {out.dtype})")
    try:
        layers = find_encoder_layers(g)
    except PassConfigError as e:
        raise CanonicalizationError(f"encoder: {e}") from None
    embed = _embedding_table(g, next(v for v in g.inputs if v.name == INPUT_IDS))
    if embed is None:
        raise CanonicalizationError("encoder: no embedding Gather reads input_ids (cannot tell the vocabulary)")
    vocab, hidden = embed
    if hidden != dims[2]:
        raise CanonicalizationError(f"encoder: output {out.name!r} has {dims[2]} features, the embedding {hidden}")
    probs = _dims(layers[0].softmax.outputs[0])
    num_heads = probs[1] if len(probs) == 4 and probs[1] else None
    if num_heads is None:
        raise CanonicalizationError(f"encoder: Softmax {layers[0].softmax.name!r}: cannot tell the number of heads "
                                    f"(its output has no static [batch, heads, seq, seq] shape)")
    ops = {n.op_type for n in g}
    norm = "LayerNormalization" if "LayerNormalization" in ops else "decomposed (Pow/ReduceMean)" \
        if {"Pow", "ReduceMean"} <= ops else "none found"
    mlp = "GELU" if "Gelu" in ops else "GELU (Erf)" if "Erf" in ops else "unknown"
    meta = model.metadata_props.get(CONTEXT_METADATA_KEY)
    context = int(meta) if meta and meta.isdigit() else None
    return EncoderInfo(n_layers=len(layers), num_heads=num_heads, hidden_size=hidden, vocab_size=vocab,
                       context=context, norm=norm, mlp=mlp, inputs=names, output=out.name)


def canonicalize_any(model: ir.Model) -> DecoderInfo | EncoderInfo:
    """The compile's entry: a decoder (canonicalize) or a BERT-style encoder (analyze_encoder),
    by what the graph is; neither is one line saying what was looked for."""
    kind = model_kind(model)
    if kind == MODEL_KIND_ENCODER:
        return analyze_encoder(model)
    if kind == MODEL_KIND_DECODER:
        return canonicalize(model)
    g = model.graph
    if not any(v.name == INPUT_IDS for v in g.inputs):
        raise CanonicalizationError(f"graph input {INPUT_IDS!r} not found (inputs: "
                                    f"{', '.join(v.name for v in g.inputs)[:80]}): neither a decoder nor an encoder")
    raise CanonicalizationError(
        f"neither a decoder (no past_key_values.N.key inputs, no 'logits' output) nor an encoder (input_ids -> one "
        f"[batch, sequence, hidden] output): inputs {', '.join(v.name for v in g.inputs)[:80]}; outputs "
        f"{', '.join(f'{v.name} {list(v.shape) if v.shape is not None else []}' for v in g.outputs)[:80]}")
