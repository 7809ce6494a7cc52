"""Fold per-input-channel scales s into a model without changing what it computes.

AWQ and SmoothQuant both rewrite ``W x`` as ``(W · diag(s)) (x / s)``: the linear's columns are
multiplied by s, and the division of x by s is folded into the op that produces x, so nothing is
added at run time. In a Llama block the producer is:

- the RMSNorm before wq/wk/wv (``attention_norm``) and before w1/w3 (``ffn_norm``): its weight is
  divided by s (:func:`fold_scales_into_norm`);
- w3 before w2: w2's input is ``silu(w1 x) * (w3 x)``, linear in w3's output rows, so dividing w3's
  rows by s divides w2's input by s (:func:`fold_scales_into_linear`);
- wv before wo, only without grouped-query attention (each wv row feeds exactly one wo column).

Where no op can absorb 1/s exactly (a post-norm encoder's LayerNorm also feeds the residual), the linears
keep it as an explicit multiply on their input (:func:`fold_group_scales`, ``Absorb.MULTIPLIER``).

Both functions return new tensors in the inputs' dtype and leave their arguments untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgeforge.errors import UnsupportedError
from edgeforge.models.architecture import Absorb, Group


def fold_scales_into_norm(norm_weight: torch.Tensor, linear_weights: Sequence[torch.Tensor],
                          scales: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return (norm_weight / s, [W · diag(s) for each W [out, in]]) for linears reading the norm's output."""
    if norm_weight.shape != scales.shape:
        raise ValueError(f"norm weight of shape {tuple(norm_weight.shape)} does not fit {scales.numel()} scales")
    return (norm_weight.float() / scales).to(norm_weight.dtype), _scale_columns(linear_weights, scales)


def fold_scales_into_linear(previous_weight: torch.Tensor, linear_weights: Sequence[torch.Tensor],
                            scales: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return (diag(1/s) · previous_weight, [W · diag(s) ...]): previous's output rows are the linears' inputs."""
    if previous_weight.shape[0] != scales.numel():
        raise UnsupportedError(
            f"cannot fold {scales.numel()} input scales into a linear with {previous_weight.shape[0]} output rows "
            "(grouped-query attention shares value heads, so wv cannot absorb wo's scales)")
    folded = (previous_weight.float() / scales[:, None]).to(previous_weight.dtype)
    return folded, _scale_columns(linear_weights, scales)


def fold_group_scales(block: torch.nn.Module, group: Group, weights: Sequence[torch.Tensor],
                      scales: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Fold ``scales`` between ``group``'s producer in ``block`` and its linears (``weights``), as the group's
    ``absorb`` says: the producer is rewritten in place; returns the linears' new weights and the multiplier
    1/s they must apply to their input (None where the producer absorbed it)."""
    if group.absorb is Absorb.MULTIPLIER:
        return _scale_columns(weights, scales), 1 / scales
    producer = block.get_submodule(group.producer)
    fold = fold_scales_into_norm if group.absorb is Absorb.NORM else fold_scales_into_linear
    new_producer, new_weights = fold(producer.weight, weights, scales)
    producer.weight = torch.nn.Parameter(new_producer, requires_grad=False)
    return new_weights, None


def _scale_columns(linear_weights: Sequence[torch.Tensor], scales: torch.Tensor) -> list[torch.Tensor]:
    for weight in linear_weights:
        if weight.shape[-1] != scales.numel():
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {scales.numel()} input scales")
    return [(weight.float() * scales).to(weight.dtype) for weight in linear_weights]
