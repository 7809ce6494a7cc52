"""The BERT sentence encoder as an ONNX graph that returns the pooled, L2-normalised embedding.

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

from edgeforge.export.onnx_graph import FLOAT_MIN, GraphBuilder, embedding, linear, numpy

POOLING_MIN_COUNT = 1e-9  # BertEncoder's clamp of the token count
NORMALIZE_EPS = 1e-12  # F.normalize's default


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
