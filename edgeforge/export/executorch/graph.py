"""The decoder's export variant: the same tensors as the eager model, ExecuTorch's custom ops, XNNPACK-friendly
shapes; and the ExportedProgram of a source (decoder or encoder) that the lowering takes.

    eager model ──swap──▶ export variant ──torch.export──▶ ExportedProgram
    (Transformer,         (ExecuTorch's KV-cache + SDPA ops,   (non-strict; dynamic
     BertEncoder)          XNNPACK-shaped norm and RoPE,        sequence length)
                           quantized layers: :mod:`.layers`)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.export.executorch.layers import to_lowerable
from edgeforge.models.architecture import DECODER, ENCODER, family_choice

ENCODER_MAX_BATCH = 16  # largest batch the encoder graph takes: memory is planned for it (MiniLM: 162 MiB)


class KVCache(nn.Module):
    """Static cache [1, max_seq_len, kv_heads, head_dim]: the layout ``llama.update_cache`` and
    ``llama.custom_sdpa`` read (sequence on dim 1, unlike the core's [B, H, S, D])."""

    def __init__(self, n_kv_heads: int, max_seq_len: int, head_dim: int):
        super().__init__()
        shape = (1, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """W [D, D] with ``F.linear(x, W) == cat(-x2, x1)``: the core's rotate-half as a linear, which XNNPACK
    runs inside the partition (exact: each output is one input times ±1)."""
    half = head_dim // 2
    rotation = torch.zeros(head_dim, head_dim)
    rotation[torch.arange(half), torch.arange(half) + half] = -1.0
    rotation[torch.arange(half) + half, torch.arange(half)] = 1.0
    return rotation


class SdpaAttention(nn.Module):
    """The core Attention's projections around ExecuTorch's ``update_cache`` + ``custom_sdpa`` ops.

    ``start_pos`` is an int: the first position of this call. Attention is causal over the cache up
    to each query's position, which is the core's mask when positions continue from the cache.
    Reshapes keep one dynamic dimension (``-1``) so XNNPACK can take them.
    """

    def __init__(self, attention: nn.Module, max_seq_len: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        self.kv_cache = KVCache(self.n_kv_heads, max_seq_len, self.head_dim)
        self.register_buffer("rotation", rotate_half_matrix(self.head_dim), persistent=False)

    def forward(self, x, cos, sin, start_pos, mask=None):
        # x: [1, S, dim]; cos, sin: [S, head_dim]; mask: unused (causal from start_pos)
        head_dim = self.head_dim
        q = self.wq(x).view(1, -1, self.n_heads, head_dim)  # [1, S, H, D]
        k = self.wk(x).view(1, -1, self.n_kv_heads, head_dim)
        v = self.wv(x).view(1, -1, self.n_kv_heads, head_dim)
        cos, sin = cos.view(1, -1, 1, head_dim), sin.view(1, -1, 1, head_dim)
        q = q * cos + F.linear(q, self.rotation) * sin
        k = k * cos + F.linear(k, self.rotation) * sin
        torch.ops.llama.update_cache(k, self.kv_cache.k_cache, start_pos)
        torch.ops.llama.update_cache(v, self.kv_cache.v_cache, start_pos)
        y = torch.ops.llama.custom_sdpa(q, self.kv_cache.k_cache, self.kv_cache.v_cache, start_pos, None, 0.0, True)
        return self.wo(y.view(1, -1, self.n_heads * head_dim))


class XnnpackRMSNorm(nn.Module):
    """The core RMSNorm with its mean taken over a 4-D view: XNNPACK delegates only that form of mean."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        dim = x.shape[-1]
        mean_square = x.view(1, -1, dim, 1).pow(2).mean((2, 3), keepdim=True).view(1, -1, 1)
        return x * torch.rsqrt(mean_square + self.eps) * self.weight


class ExportDecoder(nn.Module):
    """``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]`` over the core's modules, with
    attention and norms swapped for their export variants in ``core`` (pass a :func:`structural_copy`)."""

    def __init__(self, core: nn.Module, max_seq_len: int):
        super().__init__()
        for layer in core.layers:
            layer.attention = SdpaAttention(layer.attention, max_seq_len)
            layer.attention_norm, layer.ffn_norm = XnnpackRMSNorm(layer.attention_norm), XnnpackRMSNorm(layer.ffn_norm)
        core.norm = XnnpackRMSNorm(core.norm)
        rope_cos, rope_sin = core._buffers.pop("rope_cos"), core._buffers.pop("rope_sin")  # tables for the cache only
        self.register_buffer("rope_cos", rope_cos[:max_seq_len].clone(), persistent=False)
        self.register_buffer("rope_sin", rope_sin[:max_seq_len].clone(), persistent=False)
        self.core, self.max_seq_len = core, max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start_pos = input_pos[0].item()  # the custom ops take the first position as an int
        torch._check(start_pos >= 0)
        torch._check(start_pos + tokens.shape[1] <= self.max_seq_len)
        x = self.core.tok_embeddings(tokens)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        for layer in self.core.layers:
            x = layer(x, cos, sin, start_pos)  # TransformerBlock hands start_pos on to SdpaAttention
        return self.core.output(self.core.norm(x))


def structural_copy(module: nn.Module) -> nn.Module:
    """New module objects over the same parameter and buffer tensors, so swaps leave the original alone."""
    clone = copy.copy(module)
    clone._modules = {name: structural_copy(child) for name, child in module._modules.items()}
    clone._parameters, clone._buffers = dict(module._parameters), dict(module._buffers)
    return clone


def export_program(source, *, max_seq_len: int, backend: str = "xnnpack"):
    """The ExportedProgram of ``source``'s export variant, chosen by its architecture's family (dynamic sequence
    length; for encoders dynamic batch too). Non-strict: the module is our own code, so Dynamo's bytecode
    tracing and guards (most of a strict export's time) would check nothing, and the graph is the same."""
    variant = family_choice(source.architecture, {DECODER: _decoder_variant, ENCODER: _encoder_variant},
                            "ExecuTorch export")
    model = to_lowerable(structural_copy(source.model), decomposed=backend == "xnnpack")
    module, example, dynamic_shapes = variant(model, max_seq_len=max_seq_len, backend=backend)
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)


def _decoder_variant(model: nn.Module, *, max_seq_len: int, backend: str):
    """(module, example inputs, dynamic shapes) of a decoder. CoreML: the core model with its static cache, one
    token per call (the delegate keeps the cache as CoreML state; the runner prefills token by token)."""
    if backend == "coreml":
        model.setup_cache(1, max_seq_len)
        return model.eval(), (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0])), None
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers torch.ops.llama)
    from torch.export import Dim

    seq_len = Dim("seq_len", min=1, max=max_seq_len)
    return (ExportDecoder(model, max_seq_len).eval(), (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)),
            ({1: seq_len}, {0: seq_len}))


def _encoder_variant(model: nn.Module, *, max_seq_len: int, backend: str):
    """(module, example inputs, dynamic shapes) of an encoder: token ids, token types and attention mask."""
    from torch.export import Dim

    batch = Dim("batch_size", min=1, max=ENCODER_MAX_BATCH)
    seq_len = Dim("sequence_length", min=1, max=max_seq_len)
    return (model.eval(), tuple(torch.ones(2, 4, dtype=torch.long) for _ in range(3)),
            tuple({0: batch, 1: seq_len} for _ in range(3)))
