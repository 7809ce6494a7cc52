"""Round-to-nearest weight quantization (the min-max baseline) and MSE-optimal clipping of its range.

``mse_clip_search`` follows the grid search of the GPTQ reference code (``Quantizer.find_params``
with ``mse=True``: shrink each group's range by a ratio, keep the ratio with the smallest
``sum |w - dq|^norm``), optionally weighting each input column by its activations' second moment,
which turns the measure into the expected output error under a diagonal approximation of the Hessian.
"""

from __future__ import annotations

import torch

from edgeforge.errors import ConfigError
from edgeforge.quantize.scheme import (
    QuantizedWeight,
    WeightScheme,
    compute_qparams,
    dequantize,
    quantize,
)


def rtn_quantize(weight: torch.Tensor, scheme: WeightScheme, *,
                 clip_ratio: float | torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize `weight` [out, in] by rounding to the nearest level of its (optionally clipped) min-max grid."""
    scale, zero_point = compute_qparams(weight, scheme, clip_ratio)
    return QuantizedWeight(quantize(weight, scale, zero_point, scheme), scale, zero_point)


def fake_quantize_weight(weight: torch.Tensor, scheme: WeightScheme, *,
                         clip_ratio: float | torch.Tensor | None = None) -> torch.Tensor:
    """RTN quantize-dequantize: the float32 weight a quantized kernel effectively multiplies by."""
    return dequantize(*rtn_quantize(weight, scheme, clip_ratio=clip_ratio))


def check_ratio_grid(grid: int, min_ratio: float, what: str) -> None:
    """Refuse a ratio grid that is not a positive integer count down to a ratio in (0, 1]."""
    if type(grid) is not int or grid < 1:
        raise ConfigError(f"{what} grid must be a positive integer, got {grid!r}")
    if not 0 < min_ratio <= 1:
        raise ConfigError(f"{what} min_ratio must lie in (0, 1], got {min_ratio}")


def mse_clip_search(weight: torch.Tensor, scheme: WeightScheme, *,
                    input_second_moment: torch.Tensor | None = None,
                    grid: int = 50, min_ratio: float = 0.5, norm: float = 2.4) -> torch.Tensor:
    """Per-group clip ratios [out, groups] in [min_ratio, 1] minimising the weight reconstruction error.

    The candidates are `grid` evenly spaced ratios from 1.0 (plain min-max) down to `min_ratio`;
    a group keeps 1.0 unless a smaller ratio is strictly better. `input_second_moment` [in]
    (mean x² per input channel, the Hessian's diagonal) weights each column's error.
    """
    check_ratio_grid(grid, min_ratio, "clip search")
    weight = weight.float()
    scale, _ = compute_qparams(weight, scheme)  # validates the group size
    out_features, n_groups = scale.shape
    column_weights = torch.ones(weight.shape[1]) if input_second_moment is None else input_second_moment.float()

    best_ratio = torch.ones(out_features, n_groups)
    best_error = torch.full((out_features, n_groups), float("inf"))
    for step in range(grid):
        ratio = 1.0 - (1.0 - min_ratio) * step / max(grid - 1, 1)
        residual = (weight - fake_quantize_weight(weight, scheme, clip_ratio=ratio)).abs().pow(norm)
        error = (residual * column_weights).reshape(out_features, n_groups, -1).sum(dim=-1)
        improved = error < best_error
        best_error = torch.where(improved, error, best_error)
        best_ratio = torch.where(improved, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio
