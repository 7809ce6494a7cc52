"""RoPE weight layouts: Meta, llama2.c and GGUF store q/k rows as interleaved pairs (2i, 2i+1);
the model core uses rotate-half (i, i + head_dim/2), as Hugging Face does."""

from __future__ import annotations

import torch


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q or k projection [n_heads * head_dim, in] to rotate-half order."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_rotate_half` (what converters to Meta/GGUF layout apply)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)
