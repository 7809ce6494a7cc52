"""Activation fake-quantization: what XNNPACK computes on a quantized linear's input, in float.

Both kinds are asymmetric int8 in [-128, 127] with the arithmetic of :mod:`edgeforge.quantize.scheme`.
Dynamic quantization takes one scale and zero point per token (the last dimension), computed at run
time from the token's own min/max; it matches torchao's ``_apply_int8_act_asym_per_token_quant_dequant``
(the activation half of ``Int8DynamicActivationIntxWeightConfig``, ExecuTorch's 8da4w/8da8w) bit for
bit. Static quantization uses one scale and zero point per tensor, calibrated ahead of time.
"""

from __future__ import annotations

import torch

from edgeforge.quantize.scheme import (
    dequantize_values,
    qparams_from_range,
    quantize_values,
)

INT8_MIN, INT8_MAX = -128, 127


def quantize_activations_per_token(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `x` [..., in] to asymmetric int8 with per-token qparams."""
    scale, zero_point = qparams_from_range(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True),
                                           qmin=INT8_MIN, qmax=INT8_MAX, symmetric=False)
    return _fake_quantize(x, scale, zero_point)


def static_activation_qparams(min_val: float | torch.Tensor,
                              max_val: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scale and int8 zero point for a calibrated activation range [min_val, max_val]."""
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    return qparams_from_range(min_val, max_val, qmin=INT8_MIN, qmax=INT8_MAX, symmetric=False)


def quantize_activations_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `x` with fixed (calibrated) per-tensor int8 qparams; values outside clamp."""
    return _fake_quantize(x, scale, zero_point)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    qdata = quantize_values(x, scale, zero_point, qmin=INT8_MIN, qmax=INT8_MAX)
    return dequantize_values(qdata, scale, zero_point).to(x.dtype)
