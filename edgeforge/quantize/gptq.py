"""GPTQ on the CPU, one linear at a time (Frantar et al. 2022, arXiv:2210.17323, Algorithm 1).

Quantize the columns of W one by one and spread each column's rounding error over the columns not
yet quantized, weighted by the inverse Hessian H = E[x xᵀ] of the layer's inputs, so that
‖X Wᵀ − X Ŵᵀ‖ rather than ‖W − Ŵ‖ is minimised. Updates are applied lazily per block of columns.

Why our own: torchao's GPTQ is a prototype (``torchao.prototype.gptq``) that asserts CUDA, observes
a whole model through tensor subclasses, and only targets its weight-only int4/int8 tensors, not the
8da4w layout XNNPACK runs; gpt-fast's calls ``torch.cuda.synchronize``. The block-by-block driver
needs a plain function of (weight, Hessian) that streams on a CPU.

Differences from the reference code (``gptq.py`` ``fasterquant``):
- ``static_groups=True`` (the default, and required with ``act_order``) takes every group's qparams
  from the weight before any update, so columns keep their original groups and the result packs in
  the normal layout; a clip ratio from ``mse_clip_search``, or the scales of
  :func:`~edgeforge.quantize.scale_search.importance_qparams`, then apply exactly as searched.
- Input channels never active during calibration (zero Hessian diagonal) keep their weights and are
  rounded to nearest; the reference zeroes them. Their identity Hessian row keeps the error local.
- The Hessian is damped and inverted in float64; the column sweep runs in float32.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import NamedTuple

import torch

from edgeforge.errors import ConfigError, UnsupportedError
from edgeforge.quantize.scheme import (
    QuantizedWeight,
    WeightScheme,
    check_group_size,
    compute_qparams,
    dequantize_values,
    quantize_values,
)


class HessianAccumulator:
    """Running mean of x xᵀ over the inputs of one linear (its output error's Hessian, up to 2x).

    Summed in place in float32 (``addmm_``: no per-batch temporaries), as the reference GPTQ does; for
    an 8192-wide input a float64 sum and its per-batch copies would add over 1 GiB to the peak.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.sample_count = 0
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32)

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of inputs [..., in_features]; every leading position counts as one sample."""
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(inputs.shape)}")
        rows = inputs.reshape(-1, self.in_features).float()
        self._sum.addmm_(rows.T, rows)
        self.sample_count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """Mean of x xᵀ over everything added, float32 [in, in]."""
        if not self.sample_count:
            raise ConfigError("GPTQ needs calibration inputs, but none reached this layer")
        return self._sum / self.sample_count


class DriftAccumulator:
    """Running mean of (x_fp − x) xᵀ over one linear's inputs x in the partly quantized model and x_fp, the same
    positions' inputs in the fp32 model: how far upstream quantization moved the input, as the layer sees it."""

    def __init__(self, in_features: int):
        self.sample_count = 0
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32)

    def add(self, inputs: torch.Tensor, fp32_inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        drift = fp32_inputs.reshape(rows.shape).float() - rows
        self._sum.addmm_(drift.T, rows)
        self.sample_count += rows.shape[0]

    def drift(self) -> torch.Tensor:
        """Mean of (x_fp − x) xᵀ, float32 [in, in]."""
        return self._sum / self.sample_count


def fp32_alignment(hessian: torch.Tensor, drift: torch.Tensor, *, damp: float) -> torch.Tensor:
    """M [in, in] such that W + W M is the float weight whose outputs on the quantized model's inputs x come
    closest to the fp32 model's W x_fp (least squares: W E[x_fp xᵀ] H⁻¹ = W (I + D H⁻¹), D = E[(x_fp − x) xᵀ]),
    with H damped as GPTQ damps it. GPTQ rounding that weight against H then minimises ‖W X_fp − Ŵ X‖ rather
    than ‖W X − Ŵ X‖: it also undoes what the layers before it got wrong (the "asymmetric calibration" of
    GPTQv2, Li et al. 2025, arXiv:2504.02692, here in its closed form)."""
    hessian = _damp_(hessian.double().clone(), damp)
    return torch.linalg.solve(hessian, drift.double().T).T.float()


def _damp_(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``hessian`` with dead inputs given a unit diagonal, then ``damp`` x the mean diagonal added (in place)."""
    diagonal = hessian.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal.add_(damp * diagonal.mean())
    return hessian


class InverseHessian(NamedTuple):
    """What GPTQ needs from a Hessian, prepared once and shared by every linear (and row chunk) reading
    the same input: the upper Cholesky factor of the damped, act-ordered H⁻¹ and that column order."""

    factor: torch.Tensor
    order: torch.Tensor
    damp: float
    act_order: bool


def prepare_hessian(hessian: torch.Tensor, *, damp: float = 0.01, act_order: bool = True) -> InverseHessian:
    """Damp, order and invert ``hessian`` [in, in] for :func:`gptq_quantize` (the costly O(in³) part)."""
    factor, order = _ordered_inverse_hessian(hessian, damp=damp, act_order=act_order)
    return InverseHessian(factor, order, damp, act_order)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | InverseHessian, scheme: WeightScheme, *,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = True,
                  static_groups: bool = True, clip_ratio: float | torch.Tensor | None = None,
                  qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> QuantizedWeight:
    """Quantize `weight` [out, in] with GPTQ against `hessian` [in, in]; same layout as RTN's result.

    damp: added to the Hessian's diagonal, as a fraction of its mean.
    block_size: columns per lazy batch update (speed only; with dynamic groups it is rounded to a
        multiple of the group size so a group's columns are current when its qparams are taken).
    act_order: quantize columns in order of decreasing Hessian diagonal (most active inputs first).
    static_groups: take group qparams from the weight up front (True) or, as the paper does, from
        the error-updated columns when the sweep reaches each group (False; not with act_order).
    clip_ratio: shrinks each group's range before its scale is taken (float or [out, groups]).
    qparams: the static groups' scale [out, groups] and zero point, chosen by the caller (a scale search)
        instead of the (clipped) min-max ones.
    """
    weight = weight.float()
    out_features, in_features = weight.shape
    group_size = check_group_size(in_features, scheme, f"weight of shape {out_features}x{in_features}")
    dynamic_groups = not static_groups and scheme.group_size is not None
    _check_options(damp=damp, block_size=block_size, act_order=act_order, dynamic_groups=dynamic_groups)
    size = tuple(hessian.factor.shape if isinstance(hessian, InverseHessian) else hessian.shape)
    if size != (in_features, in_features):
        raise ValueError(f"Hessian of shape {size} does not fit a weight of shape {tuple(weight.shape)}")

    n_groups = in_features // group_size
    ratios = None if clip_ratio is None else torch.ones(out_features, n_groups) * clip_ratio
    if qparams is not None and (dynamic_groups or clip_ratio is not None):
        raise ValueError("GPTQ takes given qparams with static groups and no clip ratio")
    if qparams is not None:
        scale, zero_point = qparams
    elif dynamic_groups:
        block_size = max(block_size // group_size, 1) * group_size
        scale = torch.empty(out_features, n_groups)
        zero_point = None if scheme.symmetric else torch.empty(out_features, n_groups, dtype=torch.int8)
    else:
        scale, zero_point = compute_qparams(weight, scheme, ratios)

    if not isinstance(hessian, InverseHessian):
        hessian = prepare_hessian(hessian, damp=damp, act_order=act_order)
    elif (hessian.damp, hessian.act_order) != (damp, act_order):
        raise ValueError(f"Hessian prepared with damp={hessian.damp}, act_order={hessian.act_order}, "
                         f"used with damp={damp}, act_order={act_order}")
    hessian_inverse, order = hessian.factor, hessian.order
    # Work on the transpose: each weight column is then a contiguous row, which the per-column sweep
    # reads and updates ~in_features times (several times faster on CPU than strided column access).
    columns = weight[:, order].T.contiguous()  # [in, out], updated in place by the sweep
    qdata = torch.empty(in_features, out_features, dtype=torch.int8)
    with _one_thread():
        _sweep(columns, hessian_inverse, qdata, scale, zero_point, ratios, order.tolist(), scheme=scheme,
               dynamic_groups=dynamic_groups, group_size=group_size, block_size=block_size)
    return QuantizedWeight(qdata[torch.argsort(order)].T.contiguous(), scale, zero_point)


@contextmanager
def _one_thread():
    """The sweep is thousands of small vector ops: intra-op threads only add barrier waits (and, on a
    busy machine, make it 100x slower), so it runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sweep(columns, hessian_inverse, qdata, scale, zero_point, ratios, original_index: list[int], *,
           scheme: WeightScheme, dynamic_groups: bool, group_size: int, block_size: int) -> None:
    """GPTQ's column sweep over the transposed, act-ordered weight ``columns`` [in, out]: writes ``qdata``
    [in, out] (and with dynamic groups ``scale``/``zero_point`` [out, groups]) in place."""
    column_scheme = dataclasses.replace(scheme, group_size=None)
    scale_t = scale.T  # views: rows are groups, so a column's qparams are contiguous-ish reads
    zero_t = None if zero_point is None else zero_point.T
    for start in range(0, columns.shape[0], block_size):
        end = min(start + block_size, columns.shape[0])
        block = columns[start:end]
        block_inverse = hessian_inverse[start:end, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            group = original_index[start + i] // group_size
            if dynamic_groups and (start + i) % group_size == 0:
                group_ratio = None if ratios is None else ratios[:, group:group + 1]
                group_scale, group_zero = compute_qparams(block[i:i + group_size].T, column_scheme, group_ratio)
                scale[:, group] = group_scale[:, 0]
                if zero_point is not None:
                    zero_point[:, group] = group_zero[:, 0]
            column_zero = None if zero_t is None else zero_t[group]
            column_q = quantize_values(block[i], scale_t[group], column_zero, qmin=scheme.qmin, qmax=scheme.qmax)
            qdata[start + i] = column_q
            error = (block[i] - dequantize_values(column_q, scale_t[group], column_zero)) / block_inverse[i, i]
            block[i:] -= block_inverse[i, i:][:, None] * error[None, :]
            errors[i] = error
        columns[end:] -= hessian_inverse[start:end, end:].T @ errors


def _check_options(*, damp: float, block_size: int, act_order: bool, dynamic_groups: bool) -> None:
    if not damp >= 0:
        raise ConfigError(f"GPTQ damp must be non-negative, got {damp}")
    if type(block_size) is not int or block_size <= 0:
        raise ConfigError(f"GPTQ block size must be a positive integer, got {block_size!r}")
    if act_order and dynamic_groups:
        raise ConfigError("GPTQ act_order needs static groups: dynamic groups would follow the permuted "
                          "column order and not pack in the normal layout")


def _ordered_inverse_hessian(hessian: torch.Tensor, *, damp: float,
                             act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Damp H, order its columns, and return (U, order), U the float32 upper Cholesky factor of H⁻¹.

    Row i of U, scaled by 1/U[i, i], is the inverse-Hessian row GPTQ needs once the columns before
    i are fixed (the paper's Cholesky reformulation). Dead inputs get a unit diagonal first.
    """
    size = hessian.shape[0]
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else torch.arange(size)
    # One float32 working copy (the caller's Hessian is shared by every linear reading the same input;
    # float32 as in the reference implementation, the damping keeps it well conditioned), and each
    # intermediate dropped as soon as the next exists: for an 8192-wide input each is 256 MiB.
    hessian = _damp_(hessian.float()[order[:, None], order[None, :]], damp)
    factor, info = torch.linalg.cholesky_ex(hessian)
    del hessian
    if not info:
        inverse = torch.cholesky_inverse(factor)
        del factor
        factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
    if info:
        raise UnsupportedError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); raise damp")
    return factor, order
