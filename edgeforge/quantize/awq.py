"""AWQ scale search (Lin et al. 2023, arXiv:2306.00978): protect the weight columns that meet large activations.

For linears that read the same input x, search per-input-channel scales ``s = mean|x|^alpha``
(normalised so that max(s)·min(s) = 1) over a grid of alpha, keeping the s whose
``(x / s) · Q(W · diag(s))ᵀ`` is closest to ``x · Wᵀ``. Fold the result into the model with
:mod:`edgeforge.quantize.fold`, then quantize the scaled weights (RTN or GPTQ).

Why our own: torchao's AWQ is a prototype (``torchao.prototype.awq``) that searches one linear at a
time (q, k and v could get different scales although one norm feeds them all), keeps every
calibration input on the observer, and applies 1/s as a run-time multiply instead of folding it.
Here the error is measured on the linears' outputs (the AWQ reference measures the whole attention
or MLP module), which keeps the search a function of tensors the block driver already holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from edgeforge.errors import ConfigError
from edgeforge.quantize.rtn import fake_quantize_weight
from edgeforge.quantize.scheme import WeightScheme

MIN_RAW_SCALE = 1e-4  # the reference's floor on mean|x|^alpha before normalising


def awq_search_scales(weights: Sequence[torch.Tensor], activations: torch.Tensor, scheme: WeightScheme, *,
                      grid: int = 20,
                      quantize_inputs: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-input-channel scales s [in] for `weights` (each [out, in]) reading `activations` [..., in].

    alpha runs over 0, 1/grid, ..., (grid - 1)/grid; alpha = 0 is s = 1 (plain RTN), and another
    alpha wins only when its mean squared output error is strictly lower, so the result is never
    worse than s = 1 on these activations. Channels whose activations are all zero keep s = 1.
    ``quantize_inputs``: how the runtime rounds the scaled inputs x / s (dynamic int8 activations), so
    the search weighs the activation rounding that s changes too.
    """
    if type(grid) is not int or grid < 1:
        raise ConfigError(f"AWQ grid must be a positive integer, got {grid!r}")
    in_features = activations.shape[-1]
    if any(weight.shape[-1] != in_features for weight in weights):
        raise ValueError(f"weights {[tuple(w.shape) for w in weights]} do not all read inputs of width {in_features}")
    inputs = activations.reshape(-1, in_features).float()
    stacked = torch.cat([weight.float() for weight in weights])  # rows are quantized independently
    reference = inputs @ stacked.T
    mean_abs = inputs.abs().mean(dim=0)
    dead = mean_abs == 0

    best_scales, best_error = torch.ones(in_features), float("inf")
    for step in range(grid):
        scales = mean_abs.pow(step / grid).clamp(min=MIN_RAW_SCALE)
        scales = torch.where(dead, 1.0, scales / (scales.max() * scales.min()).sqrt())
        quantized = fake_quantize_weight(stacked * scales, scheme)
        scaled_inputs = inputs / scales
        if quantize_inputs is not None:
            scaled_inputs = quantize_inputs(scaled_inputs)
        error = (reference - scaled_inputs @ quantized.T).pow(2).mean().item()
        if error < best_error:
            best_scales, best_error = scales, error
    return best_scales
