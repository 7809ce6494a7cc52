"""Importance-weighted per-group scale search, in the spirit of llama.cpp's imatrix quantizers.

Each group's error is weighted per element: c_ij = E[x_j²] (the input's second moment, the Hessian's
diagonal; 1 without calibration) times, with ``magnitude``, sqrt(σ_i² + w_ij²) where σ_i² is row i's mean
square — llama.cpp's weighting of its imatrix for Q4_0/Q4_1/Q5. The candidates are the ranges the MSE clip
search tries (min-max shrunk by ratios from 1 down to ``min_ratio``) and, symmetric, the two that put the
group's largest magnitude exactly on qmin or on qmax (min-max puts it half a step past qmax). For each, the
weights are rounded on the candidate's grid, the scale (and, asymmetric, scale and offset jointly) is refit
in closed form by weighted least squares on those integers, an asymmetric offset is rounded to an integer
zero point in [qmin, qmax] (what MatMulNBits stores) and the scale refit for it, and the weights are rounded
again on the refit grid. The group keeps the candidate with the smallest weighted error Σ c (w - ŵ)².

Rounding to nearest is the best integer for each element at fixed qparams, and the refit is the best scale
for fixed integers, so each step only lowers a candidate's error: the result is never worse than min-max
(ratio 1) or than any clip ratio on the grid, under the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from edgeforge.errors import ConfigError
from edgeforge.quantize.rtn import check_ratio_grid
from edgeforge.quantize.scheme import MIN_SCALE, WeightScheme, compute_qparams, quantize_values

class ScaleSearch(str, Enum):
    """Where a recipe's group scales come from."""

    RANGE = "range"  # the algorithm's own: min-max (rtn), MSE-clipped (mse, gptq, awq)
    IMPORTANCE = "importance"  # importance_qparams


@dataclass(frozen=True)
class ScaleSettings:
    """A recipe's ``[scales]``. search: "range" (the algorithm's own ranges) or "importance"
    (:func:`importance_qparams`, weighted by calibration's E[x²] where the algorithm measures it); magnitude:
    the importance search also weights each element by sqrt(row mean square + w²)."""

    search: str = ScaleSearch.RANGE.value
    magnitude: bool = True

    def __post_init__(self):
        known = [member.value for member in ScaleSearch]
        if self.search not in known:
            raise ConfigError(f"recipe key 'scales.search' must be one of {', '.join(known)}, got {self.search!r}")
        if not isinstance(self.magnitude, bool):
            raise ConfigError("recipe key 'scales.magnitude' must be true or false")

    @property
    def importance(self) -> bool:
        return ScaleSearch(self.search) is ScaleSearch.IMPORTANCE


def element_weights(weight: torch.Tensor, importance: torch.Tensor | None, *, magnitude: bool) -> torch.Tensor:
    """The search's per-element error weights [out, in]: ``importance`` [in] (ones when None) times, with
    ``magnitude``, sqrt(row mean square + w²)."""
    weight = weight.float()
    columns = torch.ones(weight.shape[1]) if importance is None else importance.float()
    if columns.shape != (weight.shape[1],) or not bool((columns >= 0).all()):
        raise ValueError(f"importance must be {weight.shape[1]} non-negative values, got shape {tuple(columns.shape)}")
    if not magnitude:
        return columns.expand_as(weight)
    sigma2 = weight.pow(2).mean(dim=1, keepdim=True)
    return columns * torch.sqrt(sigma2 + weight.pow(2))


def weighted_group_error(weight: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                         zero_point: torch.Tensor | None, weights: torch.Tensor) -> torch.Tensor:
    """Σ weights · (w - (q - z)·s)² per group: [out, groups] for qparams [out, groups]."""
    out_features, n_groups = scale.shape
    shape = (out_features, n_groups, -1)
    levels = qdata.reshape(shape).float()
    if zero_point is not None:
        levels = levels - zero_point[..., None].float()
    residual = weight.float().reshape(shape) - levels * scale[..., None]
    return (weights.reshape(shape) * residual.pow(2)).sum(dim=-1)


def importance_qparams(weight: torch.Tensor, scheme: WeightScheme, *, importance: torch.Tensor | None = None,
                       magnitude: bool = True, grid: int = 20,
                       min_ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Searched scale [out, groups] (float32) and, asymmetric, int8 zero point of ``weight`` [out, in].

    importance: E[x²] per input column (None: every column alike). grid, min_ratio: the clip ratios tried,
    as :func:`edgeforge.quantize.rtn.mse_clip_search` tries them (then, symmetric, the two edge ranges).
    """
    check_ratio_grid(grid, min_ratio, "scale search")
    weight = weight.float()
    best_scale, best_zero = compute_qparams(weight, scheme)  # validates the group size
    out_features, n_groups = best_scale.shape
    values = weight.reshape(out_features, n_groups, -1)
    weights = element_weights(weight, importance, magnitude=magnitude).reshape(values.shape)
    best_error = torch.full((out_features, n_groups), float("inf"))
    ratios = [1.0 - (1.0 - min_ratio) * step / max(grid - 1, 1) for step in range(grid)]
    if scheme.symmetric:  # the symmetric scale is absmax / half: these map absmax onto -qmin or qmax
        half = (scheme.qmax - scheme.qmin) / 2
        ratios += [half / -scheme.qmin, half / scheme.qmax]
    for ratio in ratios:
        scale, zero = compute_qparams(weight, scheme, ratio)
        levels = quantize_values(values, scale[..., None], None if zero is None else zero[..., None],
                                 qmin=scheme.qmin, qmax=scheme.qmax).float()
        options = [_refit_scale(values, weights, levels, scale, zero)]
        if zero is not None:
            options.append(_refit_scale(values, weights, levels, scale, _joint_zero_point(values, weights, levels,
                                                                                          zero, scheme)))
        for option_scale, option_zero in options:
            qdata = quantize_values(values, option_scale[..., None],
                                    None if option_zero is None else option_zero[..., None],
                                    qmin=scheme.qmin, qmax=scheme.qmax)
            error = weighted_group_error(values, qdata, option_scale, option_zero, weights)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, option_scale, best_scale)
            if option_zero is not None:
                best_zero = torch.where(better, option_zero, best_zero)
    return best_scale, best_zero


def _refit_scale(values, weights, levels, scale, zero):
    """Weighted least-squares scale for fixed integers ``levels`` and zero point; the candidate's scale where
    the fit is degenerate (all-zero weights or levels) or not positive."""
    offsets = levels if zero is None else levels - zero[..., None].float()
    numerator = (weights * values * offsets).sum(dim=-1)
    denominator = (weights * offsets.pow(2)).sum(dim=-1)
    fitted = numerator / denominator
    usable = (denominator > 0) & torch.isfinite(fitted) & (fitted >= MIN_SCALE)
    return torch.where(usable, fitted, scale), zero


def _joint_zero_point(values, weights, levels, zero, scheme: WeightScheme):
    """Zero point from the joint weighted least-squares fit w ≈ s·q + b (b = -z·s), rounded into [qmin, qmax];
    the candidate's own where the 2x2 system is singular."""
    total, level_sum = weights.sum(dim=-1), (weights * levels).sum(dim=-1)
    level_square = (weights * levels.pow(2)).sum(dim=-1)
    value_sum, cross = (weights * values).sum(dim=-1), (weights * values * levels).sum(dim=-1)
    determinant = total * level_square - level_sum.pow(2)
    scale = (total * cross - value_sum * level_sum) / determinant
    offset = (level_square * value_sum - level_sum * cross) / determinant
    fitted = torch.round(-offset / scale)
    usable = (determinant > 0) & torch.isfinite(fitted) & (scale > 0)
    return torch.where(usable, fitted.nan_to_num(0.0), zero.float()).clamp(scheme.qmin, scheme.qmax).to(torch.int8)

