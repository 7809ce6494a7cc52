"""The ONNX graphs of the architectures, written from the eager modules with :mod:`.layers`.

The Llama decoder (:func:`build_decoder`) takes past key/value inputs: onnxruntime-genai's decoder layout.

    inputs   input_ids [batch, sequence_length] int64
             attention_mask [batch, total_sequence_length] int64 (1 = real token; left padding allowed)
             position_ids [batch, sequence_length] int64
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence_length, head_dim] float32
    outputs  logits [batch, sequence_length, vocab] float32
             present.{i}.key / .value [batch, kv_heads, total_sequence_length, head_dim] float32

Two attention lowerings, chosen by the target:

- fused (CPU provider): onnxruntime's ``com.microsoft::GroupQueryAttention`` takes q/k/v packed from one
  MatMulNBits (rotating q and k itself when the head size is a multiple of 16), writes the new keys and
  values into the cache and attends in one kernel, with our additive mask as its ``attention_bias`` (so
  left-padded batches stay exact) and ``seqlens_k`` = total length - 1 for every row. Given growing
  past tensors (our session) present = concat(past, new); under genai (``past_present_share_buffer``)
  past and present are one max-length buffer updated in place. Norms are
  ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm). Its limit: a batch larger than 1 cannot
  prefill more than one token on top of a cache (a single-sequence decoder never does).
- plain ops (MatMul, Softmax; present = concat(past, new)) for execution providers that consume QDQ
  graphs and know no contrib ops (NPUs). Grouped-query attention reads kv head h // groups for query
  head h (the eager model's repeat_interleave) through a broadcasting MatMul over
  [batch, kv_heads, groups, seq, head_dim].

The BERT sentence encoder (:func:`build_encoder`) returns the pooled, L2-normalised embedding.

    inputs   input_ids, attention_mask, token_type_ids [batch, sequence_length] int64
    output   sentence_embedding [batch, dim] float32

The graph runs the whole sentence-transformers pipeline of ``BertEncoder.forward``: embeddings ->
post-norm encoder layers -> mean over the attention mask -> L2 normalisation. Linears may be float or
edgeforge ``QuantizedLinear`` modules (with or without bias), embeddings float or ``QuantizedEmbedding``.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto
from torch import nn

from edgeforge.export.onnx.layers import (FLOAT_MIN, GraphBuilder, embedding, linear, linears_on_one_input, numpy,
                                          stacked_linear)

PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"
GQA_ROTARY_HEAD_MULTIPLE = 16  # GroupQueryAttention's CPU kernel rotates only head sizes that are multiples of 16
POOLING_MIN_COUNT = 1e-9  # BertEncoder's clamp of the token count
NORMALIZE_EPS = 1e-12  # F.normalize's default


def build_decoder(model, *, max_seq_len: int, fused_attention: bool = False) -> GraphBuilder:
    """The graph of ``model`` (edgeforge.models.llama.Transformer, fp32 or with quantized modules);
    ``fused_attention``: GroupQueryAttention (onnxruntime's CPU provider) instead of plain ops."""
    config = model.config
    g = GraphBuilder("edgeforge_llama")
    kv_shape = ["batch_size", config.n_kv_heads, "past_sequence_length", config.head_dim]
    input_ids = g.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    attention_mask = g.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    position_ids = g.add_input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    pasts = [(g.add_input(PAST_KEY.format(i), TensorProto.FLOAT, kv_shape),
              g.add_input(PAST_VALUE.format(i), TensorProto.FLOAT, kv_shape)) for i in range(config.n_layers)]

    rotary = None  # GroupQueryAttention rotates q and k itself where its kernel takes the head size
    if fused_attention and config.head_dim % GQA_ROTARY_HEAD_MULTIPLE == 0:
        half = config.head_dim // 2  # rotate-half tables repeat their first half
        rotary = (g.initializer("rope_cos_cache", numpy(model.rope_cos[:max_seq_len, :half].float())),
                  g.initializer("rope_sin_cache", numpy(model.rope_sin[:max_seq_len, :half].float())), position_ids)
        cos = sin = None
    else:
        cos, sin = _rope(g, model, position_ids, max_seq_len, head_axis=2 if fused_attention else 1)
    mask = _attention_bias(g, input_ids, attention_mask)
    if fused_attention:
        lengths = _gqa_lengths(g, attention_mask)
        mask = g.op("Squeeze", [mask, g.constant([2])], name="attention_bias")  # [batch, 1, seq, total]
    x = embedding(g, input_ids, model.tok_embeddings, "tok_embeddings")
    present_shape = ["batch_size", config.n_kv_heads, "total_sequence_length", config.head_dim]
    branch = None  # the last block's FFN output, added to x by the next norm
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}"
        h, x = _add_and_norm(g, x, branch, layer.attention_norm, f"{prefix}.attention_norm", fused=fused_attention)
        if fused_attention:
            attended, key, value = _fused_attention(g, h, layer.attention, (cos, sin), rotary, mask, pasts[i],
                                                    lengths, f"{prefix}.attention")
        else:
            attended, key, value = _attention(g, h, layer.attention, cos, sin, mask, pasts[i], f"{prefix}.attention")
        g.add_output(key, PRESENT_KEY.format(i), TensorProto.FLOAT, present_shape)
        g.add_output(value, PRESENT_VALUE.format(i), TensorProto.FLOAT, present_shape)
        h, x = _add_and_norm(g, x, attended, layer.ffn_norm, f"{prefix}.ffn_norm", fused=fused_attention)
        branch = _feed_forward(g, h, layer.feed_forward, f"{prefix}.feed_forward")
    h, _ = _add_and_norm(g, x, branch, model.norm, "norm", fused=fused_attention)
    logits = linear(g, h, model.output, "output")
    g.add_output(logits, "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", config.vocab_size])
    g.outputs.insert(0, g.outputs.pop())  # logits first, then present.{i}.key/value
    return g


def rms_norm(g: GraphBuilder, x: str, norm, name: str) -> str:
    """x / sqrt(mean(x²) + eps) * weight, in the op pattern onnxruntime fuses to SimplifiedLayerNormalization."""
    squared = g.op("Pow", [x, g.constant(np.float32(2.0), np.float32)], name=name)
    mean = g.op("ReduceMean", [squared, g.constant([-1])], name=name, keepdims=1)
    root = g.op("Sqrt", [g.op("Add", [mean, g.constant(np.float32(norm.eps), np.float32)], name=name)], name=name)
    normed = g.op("Div", [x, root], name=name)
    return g.op("Mul", [normed, g.initializer(f"{name}.weight", numpy(norm.weight.float()))], name=name)


def _add_and_norm(g: GraphBuilder, x: str, branch: str | None, norm, name: str, *, fused: bool) -> tuple[str, str]:
    """(rms_norm(x + branch), x + branch); fused: onnxruntime's SkipSimplifiedLayerNormalization, one kernel."""
    if branch is None:
        return rms_norm(g, x, norm, name), x
    if not fused:
        x = g.op("Add", [x, branch], name=name)
        return rms_norm(g, x, norm, name), x
    weight = g.initializer(f"{name}.weight", numpy(norm.weight.float()))
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [branch, x, weight], name=name, outputs=4,
                               domain="com.microsoft", epsilon=float(norm.eps))
    return normed, total


def _rope(g: GraphBuilder, model, position_ids: str, max_seq_len: int, *, head_axis: int) -> tuple[str, str]:
    """cos, sin for the positions, rows of the model's own tables, with a heads axis of 1 at ``head_axis``:
    [batch, 1, seq, head_dim] (heads-first layout) or [batch, seq, 1, head_dim] (sequence-first)."""
    tables = []
    for table, label in ((model.rope_cos, "rope_cos"), (model.rope_sin, "rope_sin")):
        rows = g.op("Gather", [g.initializer(label, numpy(table[:max_seq_len].float())), position_ids], name=label)
        tables.append(g.op("Unsqueeze", [rows, g.constant([head_axis])], name=label))
    return tables[0], tables[1]


def _apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """Rotate-half RoPE on x [batch, heads, seq, head_dim]: x·cos + concat(-x2, x1)·sin."""
    first, second = g.op("Split", [x, g.constant([half, half])], name=name, outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [second], name=name), first], name=name, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], name=name), g.op("Mul", [rotated, sin], name=name)], name=name)


def _attention_bias(g: GraphBuilder, input_ids: str, attention_mask: str) -> str:
    """Additive mask [batch, 1, 1, seq, total]: 0 where query i (at past + i) may read key j
    (j <= past + i and attention_mask[j] = 1), float32's lowest value elsewhere."""
    name = "attention_bias"
    # lengths from the mask, not the cache: a cache shared with present (genai's past_present_share_buffer)
    # is allocated at its maximum length
    total = g.op("Shape", [attention_mask], name=name, start=1, end=2)  # [1]
    seq = g.op("Shape", [input_ids], name=name, start=1, end=2)
    past = g.op("Sub", [total, seq], name=name)
    zero, one = g.constant(0), g.constant(1)
    total = g.op("Squeeze", [total], name=name)
    key_positions = g.op("Range", [zero, total, one], name=name)  # [total]
    query_positions = g.op("Range", [g.op("Squeeze", [past], name=name), total, one], name=name)  # [seq]
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_positions, g.constant([0])], name=name),
                                  g.op("Unsqueeze", [query_positions, g.constant([1])], name=name)], name=name)
    padding = g.op("Cast", [attention_mask], name=name, to=TensorProto.BOOL)
    padding = g.op("Unsqueeze", [padding, g.constant([1, 2, 3])], name=name)  # [batch, 1, 1, 1, total]
    allowed = g.op("And", [causal, padding], name=name)  # [batch, 1, 1, seq, total]
    return g.op("Where", [allowed, g.constant(np.float32(0.0), np.float32),
                          g.constant(np.float32(FLOAT_MIN), np.float32)], name=name)


def _attention(g: GraphBuilder, x: str, attention, cos: str, sin: str, mask: str, past: tuple[str, str],
               name: str) -> tuple[str, str, str]:
    """Return (output [batch, seq, dim], present key, present value)."""
    heads, kv_heads, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    groups = heads // kv_heads

    def project(module, n_heads: int, label: str) -> str:
        y = linear(g, x, module, f"{name}.{label}")
        y = g.op("Reshape", [y, g.constant([0, 0, n_heads, head_dim])], name=f"{name}.{label}")
        return g.op("Transpose", [y], name=f"{name}.{label}", perm=[0, 2, 1, 3])  # [batch, heads, seq, head_dim]

    q = _apply_rope(g, project(attention.wq, heads, "wq"), cos, sin, head_dim // 2, f"{name}.q_rope")
    k = _apply_rope(g, project(attention.wk, kv_heads, "wk"), cos, sin, head_dim // 2, f"{name}.k_rope")
    v = project(attention.wv, kv_heads, "wv")
    key = g.op("Concat", [past[0], k], name=f"{name}.present_key", axis=2)
    value = g.op("Concat", [past[1], v], name=f"{name}.present_value", axis=2)

    q = g.op("Mul", [q, g.constant(np.float32(head_dim ** -0.5), np.float32)], name=name)
    q = g.op("Reshape", [q, g.constant([0, kv_heads, groups, -1, head_dim])], name=name)  # head h = kv*groups + g
    k5 = g.op("Unsqueeze", [key, g.constant([2])], name=name)  # [batch, kv_heads, 1, total, head_dim]
    v5 = g.op("Unsqueeze", [value, g.constant([2])], name=name)
    scores = g.op("MatMul", [q, g.op("Transpose", [k5], name=name, perm=[0, 1, 2, 4, 3])], name=name)
    probs = g.op("Softmax", [g.op("Add", [scores, mask], name=name)], name=name, axis=-1)
    y = g.op("MatMul", [probs, v5], name=name)  # [batch, kv_heads, groups, seq, head_dim]
    y = g.op("Reshape", [y, g.constant([0, heads, -1, head_dim])], name=name)
    y = g.op("Transpose", [y], name=name, perm=[0, 2, 1, 3])
    y = g.op("Reshape", [y, g.constant([0, 0, heads * head_dim])], name=name)
    return linear(g, y, attention.wo, f"{name}.wo"), key, value


def _gqa_lengths(g: GraphBuilder, attention_mask: str) -> tuple[str, str]:
    """GroupQueryAttention's (seqlens_k [batch] int32, total_sequence_length int32 scalar). Every row's keys
    fill the whole total length (padding is masked by the bias, not cut by the lengths)."""
    name = "gqa_lengths"
    total = g.op("Shape", [attention_mask], name=name, start=1, end=2)  # [1]
    batch = g.op("Shape", [attention_mask], name=name, start=0, end=1)
    last = g.op("Expand", [g.op("Sub", [total, g.constant([1])], name=name), batch], name=name)
    return (g.op("Cast", [last], name=name, to=TensorProto.INT32),
            g.op("Cast", [g.op("Squeeze", [total], name=name)], name=name, to=TensorProto.INT32))


def _fused_attention(g: GraphBuilder, x: str, attention, tables: tuple[str, str], rotary: tuple[str, str, str] | None,
                     mask: str, past: tuple[str, str], lengths: tuple[str, str], name: str) -> tuple[str, str, str]:
    """Return (output [batch, seq, dim], present key, present value) through GroupQueryAttention. ``rotary``
    (cos cache, sin cache, position_ids): the op rotates q and k; otherwise they are rotated here with the
    cos/sin ``tables`` [batch, seq, 1, head_dim]."""
    heads, kv_heads, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim

    def rotated(y: str, n_heads: int, label: str) -> str:
        y = g.op("Reshape", [y, g.constant([0, 0, n_heads, head_dim])], name=f"{name}.{label}")  # [b, s, h, d]
        y = _apply_rope(g, y, *tables, head_dim // 2, f"{name}.{label}_rope")
        return g.op("Reshape", [y, g.constant([0, 0, n_heads * head_dim])], name=f"{name}.{label}")

    projections = [attention.wq, attention.wk, attention.wv]
    packed = stacked_linear(g, x, projections, f"{name}.wqkv") if rotary is not None else None
    if packed is not None:  # the op reads q, k and v from one packed [batch, seq, (heads + 2 kv_heads) * head_dim]
        q, k, v = packed, "", ""
    else:
        q, k, v = linears_on_one_input(g, x, projections, f"{name}.wqkv")
        if rotary is None:
            q, k = rotated(q, heads, "q"), rotated(k, kv_heads, "k")
    seqlens_k, total = lengths
    y, key, value = g.op("GroupQueryAttention", [q, k, v, past[0], past[1], seqlens_k, total,
                                                 *(rotary or ("", "", "")), mask],
                         name=name, outputs=3, domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                         scale=head_dim ** -0.5, do_rotary=int(rotary is not None), rotary_interleaved=0)
    return linear(g, y, attention.wo, f"{name}.wo"), key, value


def _feed_forward(g: GraphBuilder, x: str, feed_forward, name: str) -> str:
    """w2(silu(w1 x) * w3 x)."""
    gate, up = linears_on_one_input(g, x, [feed_forward.w1, feed_forward.w3], f"{name}.w13")
    gate = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{name}.silu")], name=f"{name}.silu")
    return linear(g, g.op("Mul", [gate, up], name=name), feed_forward.w2, f"{name}.w2")


def build_encoder(model, *, max_seq_len: int) -> GraphBuilder:
    """The graph of ``model`` (edgeforge.models.encoder.BertEncoder)."""
    config = model.config
    g = GraphBuilder("edgeforge_bert")
    axes = ["batch_size", "sequence_length"]
    input_ids = g.add_input("input_ids", TensorProto.INT64, axes)
    attention_mask = g.add_input("attention_mask", TensorProto.INT64, axes)
    token_type_ids = g.add_input("token_type_ids", TensorProto.INT64, axes)

    x = _embeddings(g, model.embeddings, input_ids, token_type_ids)
    allowed = g.op("Cast", [attention_mask], name="attention_bias", to=TensorProto.BOOL)
    allowed = g.op("Unsqueeze", [allowed, g.constant([1, 2])], name="attention_bias")  # [batch, 1, 1, seq]
    bias = g.op("Where", [allowed, g.constant(np.float32(0.0), np.float32), g.constant(np.float32(FLOAT_MIN),
                                                                                        np.float32)],
                name="attention_bias")
    for i, layer in enumerate(model.encoder["layer"]):
        prefix = f"encoder.layer.{i}"
        h = _self_attention(g, x, layer.attention.self, bias, f"{prefix}.attention.self")
        h = _add_norm(g, h, x, layer.attention.output, f"{prefix}.attention.output")
        inner = _gelu(g, linear(g, h, layer.intermediate.dense, f"{prefix}.intermediate.dense"), f"{prefix}.gelu")
        x = _add_norm(g, inner, h, layer.output, f"{prefix}.output")
    g.add_output(_pool(g, x, attention_mask), "sentence_embedding", TensorProto.FLOAT, ["batch_size", config.dim])
    return g


def _embeddings(g: GraphBuilder, embeddings, input_ids: str, token_type_ids: str) -> str:
    name = "embeddings"
    seq = g.op("Shape", [input_ids], name=name, start=1, end=2)  # [1]
    x = g.op("Add", [embedding(g, input_ids, embeddings.word_embeddings, f"{name}.word_embeddings"),
                     _positions(g, seq, embeddings.position_embeddings, f"{name}.position_embeddings")],
             name=name)
    x = g.op("Add", [x, embedding(g, token_type_ids, embeddings.token_type_embeddings,
                                  f"{name}.token_type_embeddings")], name=name)
    return _layer_norm(g, x, embeddings.LayerNorm, f"{name}.LayerNorm")


def _positions(g: GraphBuilder, seq: str, table, name: str) -> str:
    """Rows 0..seq-1 of the position embedding. A float table is sliced (onnxruntime 1.31 rewrites
    Gather(table, Range) into a Slice it then fails to run); a quantized one goes through Gather."""
    if type(table) is nn.Embedding:
        weight = g.initializer(f"{name}.weight", numpy(table.weight.float()))
        return g.op("Slice", [weight, g.constant([0]), seq, g.constant([0])], name=name)
    positions = g.op("Range", [g.constant(0), g.op("Squeeze", [seq], name=name), g.constant(1)], name=name)
    return embedding(g, positions, table, name)


def _layer_norm(g: GraphBuilder, x: str, norm, name: str) -> str:
    return g.op("LayerNormalization", [x, g.initializer(f"{name}.weight", numpy(norm.weight.float())),
                                       g.initializer(f"{name}.bias", numpy(norm.bias.float()))],
                name=name, axis=-1, epsilon=float(norm.eps))


def _self_attention(g: GraphBuilder, x: str, attention, bias: str, name: str) -> str:
    heads, head_dim = attention.n_heads, attention.head_dim

    def project(module, label: str, perm: list[int]) -> str:
        y = linear(g, x, module, f"{name}.{label}")
        y = g.op("Reshape", [y, g.constant([0, 0, heads, head_dim])], name=f"{name}.{label}")
        return g.op("Transpose", [y], name=f"{name}.{label}", perm=perm)

    q = project(attention.query, "query", [0, 2, 1, 3])  # [batch, heads, seq, head_dim]
    k = project(attention.key, "key", [0, 2, 3, 1])  # [batch, heads, head_dim, seq]
    v = project(attention.value, "value", [0, 2, 1, 3])
    q = g.op("Mul", [q, g.constant(np.float32(1 / math.sqrt(head_dim)), np.float32)], name=name)
    scores = g.op("Add", [g.op("MatMul", [q, k], name=name), bias], name=name)
    y = g.op("MatMul", [g.op("Softmax", [scores], name=name, axis=-1), v], name=name)
    y = g.op("Transpose", [y], name=name, perm=[0, 2, 1, 3])
    return g.op("Reshape", [y, g.constant([0, 0, heads * head_dim])], name=name)


def _add_norm(g: GraphBuilder, h: str, residual: str, add_norm, name: str) -> str:
    """LayerNorm(dense(h) + residual)."""
    y = g.op("Add", [linear(g, h, add_norm.dense, f"{name}.dense"), residual], name=name)
    return _layer_norm(g, y, add_norm.LayerNorm, f"{name}.LayerNorm")


def _gelu(g: GraphBuilder, x: str, name: str) -> str:
    """Exact GELU, x * 0.5 * (1 + erf(x / sqrt 2)) (onnxruntime fuses the pattern to Gelu)."""
    erf = g.op("Erf", [g.op("Div", [x, g.constant(np.float32(math.sqrt(2.0)), np.float32)], name=name)], name=name)
    half = g.op("Mul", [x, g.constant(np.float32(0.5), np.float32)], name=name)
    return g.op("Mul", [half, g.op("Add", [erf, g.constant(np.float32(1.0), np.float32)], name=name)], name=name)


def _pool(g: GraphBuilder, x: str, attention_mask: str) -> str:
    """Mean over tokens with attention_mask 1, then divide by max(L2 norm, 1e-12)."""
    name = "pooling"
    weights = g.op("Unsqueeze", [g.op("Cast", [attention_mask], name=name, to=TensorProto.FLOAT), g.constant([-1])],
                   name=name)  # [batch, seq, 1]
    total = g.op("ReduceSum", [g.op("Mul", [x, weights], name=name), g.constant([1])], name=name, keepdims=0)
    count = g.op("ReduceSum", [weights, g.constant([1])], name=name, keepdims=0)
    count = g.op("Max", [count, g.constant(np.float32(POOLING_MIN_COUNT), np.float32)], name=name)
    pooled = g.op("Div", [total, count], name=name)
    squares = g.op("ReduceSum", [g.op("Mul", [pooled, pooled], name=name), g.constant([-1])], name=name, keepdims=1)
    norm = g.op("Max", [g.op("Sqrt", [squares], name=name), g.constant(np.float32(NORMALIZE_EPS), np.float32)],
                name=name)
    return g.op("Div", [pooled, norm], name=name)
