"""SmoothQuant scales (Xiao et al. 2023, arXiv:2211.10438): move activation outliers into the weights.

``s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)`` over all linears that read the same input; after
folding s (:mod:`edgeforge.quantize.fold`) the activations' per-channel ranges shrink where they were
large, so int8 activation quantization (w8a8) loses less.

Why our own: torchao's SmoothQuant is a prototype (``torchao.prototype.smoothquant``) whose observer
works one linear at a time and keeps 1/s as a run-time multiply on the activation; here one s is
shared by the linears a norm feeds and folded into that norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgeforge.errors import ConfigError

MIN_SMOOTHING_SCALE = 1e-5  # the reference's floor, so a near-silent channel cannot blow up 1/s


def smoothquant_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], *,
                       alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel scales s [in] from calibrated max|x| per channel [in] and the weights [out, in].

    Channels with no activation or no weight at all keep s = 1.
    """
    if not 0 <= alpha <= 1:
        raise ConfigError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    act_absmax = act_absmax.float()
    weight_absmax = torch.cat([weight.float() for weight in weights]).abs().amax(dim=0)
    if weight_absmax.shape != act_absmax.shape:
        shapes = [tuple(weight.shape) for weight in weights]
        raise ValueError(f"{act_absmax.numel()} activation ranges do not fit weights {shapes}")
    scales = (act_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)).clamp(min=MIN_SMOOTHING_SCALE)
    return torch.where((act_absmax > 0) & (weight_absmax > 0), scales, 1.0)
