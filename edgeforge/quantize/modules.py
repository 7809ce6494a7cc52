"""Eager quantized modules: integer weights + scales as buffers, the arithmetic the target runtime runs, in float.

Their buffers are exactly what the quantized checkpoint stores (unpacked), and what export reads. A
QuantizedLinear's ``numerics`` (:class:`~edgeforge.quantize.activations.ActivationNumerics`) says whose
run-time arithmetic it follows; the integers and scales do not depend on it, so export re-sets it to the
target's (:func:`set_activation_numerics`) before checking an artifact against the eager model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.quantize.activations import (
    DEFAULT_NUMERICS,
    ActivationNumerics,
    quantize_activations_dynamic,
    quantize_activations_static,
)
from edgeforge.quantize.scheme import ActivationScheme, QuantizedWeight, WeightScheme, dequantize


class QuantizedLinear(nn.Module):
    """y = act_q(x · m) @ dequant(qdata, runtime scale, zero_point)ᵀ, activations as the scheme says, rounded
    as ``numerics``' runtime rounds them (:func:`runtime_weight_scale` for the scales).

    ``input_multiplier`` m [in] (optional) is SmoothQuant's 1/s where no preceding op could absorb it:
    the weight was multiplied by s before rounding, so x·m has its outlier channels tamed before quantizing.
    """

    def __init__(self, weight: QuantizedWeight, scheme: WeightScheme, activations: ActivationScheme,
                 input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                 input_multiplier: torch.Tensor | None = None, *, numerics: ActivationNumerics = DEFAULT_NUMERICS):
        super().__init__()
        self.scheme, self.activations, self.numerics = scheme, activations, numerics
        self.out_features, self.in_features = weight.qdata.shape
        self.register_buffer("qdata", weight.qdata)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("zero_point", weight.zero_point)
        self.register_buffer("bias", bias)
        self.register_buffer("input_multiplier", input_multiplier)
        if activations is ActivationScheme.STATIC_INT8:
            self.register_buffer("input_scale", input_qparams[0])
            self.register_buffer("input_zero_point", input_qparams[1])

    @property
    def group_size(self) -> int | None:
        """Input columns per scale; None for one scale per output channel."""
        groups = self.scale.shape[1]
        return self.in_features // groups if groups > 1 else None

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the runtime multiplies by: the integers with the scales as it holds them."""
        return dequantize(self.qdata, runtime_weight_scale(self.scale, self.numerics), self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_multiplier is not None:
            x = x * self.input_multiplier
        if self.activations is ActivationScheme.DYNAMIC_INT8:
            x = quantize_activations_dynamic(x, self.numerics, group_size=self.group_size)
        elif self.activations is ActivationScheme.STATIC_INT8:
            x = quantize_activations_static(x, self.input_scale, self.input_zero_point)
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        group = self.scheme.group_size or "channel"
        return (f"{self.in_features}->{self.out_features}, int{self.scheme.bits} group {group}, "
                f"act {self.activations.value}, numerics {self.numerics.value}")


def runtime_weight_scale(scale: torch.Tensor, numerics: ActivationNumerics) -> torch.Tensor:
    """The float32 weight scales [out, groups] the runtime computes with: group-wise ones as ``numerics``
    holds them (XNNPACK: bf16), per-channel ones float32."""
    if scale.shape[1] > 1:
        return scale.to(numerics.group_scale_dtype).float()
    return scale


def set_activation_numerics(model: nn.Module, numerics: ActivationNumerics) -> nn.Module:
    """Make every QuantizedLinear in ``model`` compute as ``numerics``' runtime does (in place); returns ``model``.

    The integers and scales stay as they are: only the run-time rounding of activations and scales changes."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.numerics = numerics
    return model


class QuantizedEmbedding(nn.Module):
    """Weight-only quantized token embedding: rows are dequantized only for the looked-up ids."""

    def __init__(self, weight: QuantizedWeight, scheme: WeightScheme):
        super().__init__()
        self.scheme = scheme
        self.register_buffer("qdata", weight.qdata)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("zero_point", weight.zero_point)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        zero = None if self.zero_point is None else self.zero_point[flat]
        rows = dequantize(self.qdata[flat], self.scale[flat], zero)
        return rows.reshape(*ids.shape, -1)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. "layers.0.attention.wq")."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
