"""The Llama decoder as an ONNX graph with past key/value inputs: onnxruntime-genai's decoder layout.

    inputs   input_ids [batch, sequence_length] int64
             attention_mask [batch, total_sequence_length] int64 (1 = real token; left padding allowed)
             position_ids [batch, sequence_length] int64
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence_length, head_dim] float32
    outputs  logits [batch, sequence_length, vocab] float32
             present.{i}.key / .value [batch, kv_heads, total_sequence_length, head_dim] float32

present = concat(past, new) along the sequence: genai's ``past_present_share_buffer: false`` mode, which
any execution provider runs with plain ONNX ops. Attention is written out (MatMul, Softmax) rather than
a contrib attention op, so the same graph serves the CPU provider and QDQ-consuming NPU providers.
Grouped-query attention reads kv head h // groups for query head h (the eager model's repeat_interleave)
through a broadcasting MatMul over [batch, kv_heads, groups, seq, head_dim], with no copy of K/V.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgeforge.export.onnx_graph import FLOAT_MIN, GraphBuilder, embedding, linear, numpy

PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"


def build_decoder(model, *, max_seq_len: int) -> GraphBuilder:
    """The graph of ``model`` (edgeforge.models.llama.Transformer, fp32 or with quantized modules)."""
    config = model.config
    g = GraphBuilder("edgeforge_llama")
    kv_shape = ["batch_size", config.n_kv_heads, "past_sequence_length", config.head_dim]
    input_ids = g.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    attention_mask = g.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    position_ids = g.add_input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    pasts = [(g.add_input(PAST_KEY.format(i), TensorProto.FLOAT, kv_shape),
              g.add_input(PAST_VALUE.format(i), TensorProto.FLOAT, kv_shape)) for i in range(config.n_layers)]

    cos, sin = _rope(g, model, position_ids, max_seq_len)
    mask = _attention_bias(g, input_ids, attention_mask, pasts[0][0])
    x = embedding(g, input_ids, model.tok_embeddings, "tok_embeddings")
    present_shape = ["batch_size", config.n_kv_heads, "total_sequence_length", config.head_dim]
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}"
        h = rms_norm(g, x, layer.attention_norm, f"{prefix}.attention_norm")
        attended, key, value = _attention(g, h, layer.attention, cos, sin, mask, pasts[i], f"{prefix}.attention")
        g.add_output(key, PRESENT_KEY.format(i), TensorProto.FLOAT, present_shape)
        g.add_output(value, PRESENT_VALUE.format(i), TensorProto.FLOAT, present_shape)
        x = g.op("Add", [x, attended], name=prefix)
        h = rms_norm(g, x, layer.ffn_norm, f"{prefix}.ffn_norm")
        x = g.op("Add", [x, _feed_forward(g, h, layer.feed_forward, f"{prefix}.feed_forward")], name=prefix)
    logits = linear(g, rms_norm(g, x, model.norm, "norm"), model.output, "output")
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


def _rope(g: GraphBuilder, model, position_ids: str, max_seq_len: int) -> tuple[str, str]:
    """cos, sin [batch, 1, seq, head_dim] for the positions: rows of the model's own tables."""
    tables = []
    for table, label in ((model.rope_cos, "rope_cos"), (model.rope_sin, "rope_sin")):
        rows = g.op("Gather", [g.initializer(label, numpy(table[:max_seq_len].float())), position_ids], name=label)
        tables.append(g.op("Unsqueeze", [rows, g.constant([1])], name=label))
    return tables[0], tables[1]


def _apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """Rotate-half RoPE on x [batch, heads, seq, head_dim]: x·cos + concat(-x2, x1)·sin."""
    first, second = g.op("Split", [x, g.constant([half, half])], name=name, outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [second], name=name), first], name=name, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], name=name), g.op("Mul", [rotated, sin], name=name)], name=name)


def _attention_bias(g: GraphBuilder, input_ids: str, attention_mask: str, past_key: str) -> str:
    """Additive mask [batch, 1, 1, seq, total]: 0 where query i (at past + i) may read key j
    (j <= past + i and attention_mask[j] = 1), float32's lowest value elsewhere."""
    name = "attention_bias"
    past = g.op("Shape", [past_key], name=name, start=2, end=3)  # [1]
    seq = g.op("Shape", [input_ids], name=name, start=1, end=2)
    total = g.op("Add", [past, seq], name=name)
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


def _feed_forward(g: GraphBuilder, x: str, feed_forward, name: str) -> str:
    """w2(silu(w1 x) * w3 x)."""
    gate = linear(g, x, feed_forward.w1, f"{name}.w1")
    gate = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{name}.silu")], name=f"{name}.silu")
    up = linear(g, x, feed_forward.w3, f"{name}.w3")
    return linear(g, g.op("Mul", [gate, up], name=name), feed_forward.w2, f"{name}.w2")
