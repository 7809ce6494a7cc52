"""Activation fake-quantization: what the target runtime computes on a quantized linear's input, in float.

Dynamic int8 activations (8da4w, 8da8w) are quantized at run time, and each runtime does it its own way;
the eager model follows the one named by its :class:`ActivationNumerics`, so that a quantized linear
computes what the runtime computes, up to float32 summation order:

- ``xnnpack``: XNNPACK's dynamically quantized fully-connected (qd8), what ExecuTorch's 8da4w/8da8w run.
  Asymmetric int8 per token (row), from ``xnn_qd8_asymmetric_quantization_params``
  (src/xnnpack/quantization.h): ``[rmin, rmax] = [min(x, 0), max(x, 0)]``; the quantization multiplier
  ``m = 255 / (rmax - rmin)`` (1 for an all-zero row); the zero point ``qmin - rmin·m`` or ``qmax - rmax·m``
  (the one the row's range leans to), clamped to int8 and rounded half to even (``lrintf``);
  ``q = clamp(round(x·m) + z)`` (the f32-qs8 convert kernel); dequantized with ``1 / m``. XNNPACK's
  blockwise (qb4w) kernels also hold group-wise weight scales in bf16, see
  :func:`edgeforge.quantize.modules.runtime_weight_scale`.
- ``mlas-int8-block``: onnxruntime's MatMulNBits with accuracy_level 4 (MLAS SQNBitGemm CompInt8,
  ``QuantizeARow_CompInt8_avx2``/``_avx512``, 4- and 8-bit weights alike). Symmetric int8 per block of
  :func:`mlas_activation_block` inputs along K: ``scale = amax / 127``, ``q = round(x · (127 / amax))``
  (half to even; 0 for an all-zero block); the last block of a K that it does not divide spans only the
  remaining inputs.

Static int8 activations (w8a8-static) use one calibrated scale and zero point per tensor, with the
arithmetic of :mod:`edgeforge.quantize.scheme`, whichever the runtime.
"""

from __future__ import annotations

from enum import Enum

import torch

from edgeforge.quantize.scheme import (
    ActivationScheme,
    WeightScheme,
    WeightStorage,
    dequantize_values,
    member_named,
    qparams_from_range,
    quantize_values,
)

INT8_MIN, INT8_MAX = -128, 127
MLAS_BLOCK_SIZES = (16, 32, 64, 128, 256)  # block sizes onnxruntime's CPU MatMulNBits kernel accepts
MLAS_PER_CHANNEL_BLOCK = 32  # per-channel layers: the span MLAS quantizes activations over (see mlas_activation_block)


class ActivationNumerics(str, Enum):
    """Whose run-time arithmetic a linear's dynamic int8 activations follow: the target runtime's."""

    XNNPACK = "xnnpack"  # ExecuTorch XNNPACK qd8: asymmetric per token, bf16 group-wise weight scales
    MLAS_INT8_BLOCK = "mlas-int8-block"  # onnxruntime MatMulNBits accuracy_level 4: symmetric per K block

    @classmethod
    def from_name(cls, name: str) -> ActivationNumerics:
        return member_named(cls, "activation numerics", name)

    @property
    def group_scale_dtype(self) -> torch.dtype:
        """The dtype this runtime holds group-wise weight scales in: ExecuTorch's XNNPACK serializer narrows
        them to bf16 (round to nearest even; per-channel scales stay float32), MatMulNBits keeps float32."""
        return torch.bfloat16 if self is ActivationNumerics.XNNPACK else torch.float32

    def weight_storage(self, scheme: WeightScheme, in_features: int, activations: ActivationScheme) -> WeightStorage:
        """How this runtime's artifact holds a ``scheme`` weight ``in_features`` wide whose inputs are
        ``activations``: ExecuTorch's XNNPACK as the scheme says with bf16 group-wise scales; MatMulNBits with
        float32 scales, zero points packed at the weight's bit width, per-channel weights in blocks of
        :func:`matmul_nbits_block`; static int8 layers (Q/DQ) as the checkpoint does."""
        grouped = scheme.group_size is not None and scheme.group_size < in_features
        if self is ActivationNumerics.XNNPACK:
            return WeightStorage(self.group_scale_dtype if grouped else torch.float32)
        if activations is ActivationScheme.STATIC_INT8:
            return WeightStorage()
        block = None if grouped else matmul_nbits_block(in_features, scheme,
                                                          dynamic=activations is ActivationScheme.DYNAMIC_INT8)
        return WeightStorage(zero_point_bits=scheme.bits, block_size=block)

    def stored_bytes(self, scheme: WeightScheme, shape: tuple[int, int], activations: ActivationScheme) -> int:
        """Bytes this runtime's artifact takes for a ``scheme`` weight of ``shape`` [out, in]."""
        return scheme.stored_bytes(*shape, self.weight_storage(scheme, shape[1], activations))


# Without a target, quantized models compute what the most common one runs: ExecuTorch's XNNPACK.
DEFAULT_NUMERICS = ActivationNumerics.XNNPACK


def quantize_activations_xnnpack(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `x` [..., in] to int8 as XNNPACK's qd8 convert does: per token, asymmetric."""
    x = x.float()
    rmin, rmax = torch.aminmax(x, dim=-1, keepdim=True)
    rmin, rmax = rmin.clamp(max=0), rmax.clamp(min=0)
    multiplier = torch.where(rmin == rmax, 1.0, (INT8_MAX - INT8_MIN) / (rmax - rmin))
    descaled_min, descaled_max = rmin * multiplier, rmax * multiplier
    leans_to_min = (INT8_MIN + descaled_min) + (INT8_MAX + descaled_max) > 0
    zero_point = torch.where(leans_to_min, INT8_MIN - descaled_min, INT8_MAX - descaled_max)
    zero_point = torch.round(zero_point.clamp(INT8_MIN, INT8_MAX))
    qdata = x * multiplier  # then in place, the same operations in the same order: a calibration pass's
    qdata.round_().add_(zero_point).clamp_(INT8_MIN, INT8_MAX)  # largest temporaries, so not one per step
    return qdata.sub_(zero_point).mul_(1.0 / multiplier)


def mlas_activation_block(in_features: int, group_size: int | None) -> int:
    """The span along K over which MLAS quantizes a MatMulNBits layer's activations: its block size, which
    is the weight's group size, or for per-channel weights MLAS_PER_CHANNEL_BLOCK (long spans lose
    accuracy on inputs with outlier channels: all-MiniLM-L6-v2 int8, cosine to fp32 0.9992 at 32, 0.9982
    at 128), the smallest block for layers narrower than that."""
    if group_size is not None and group_size < in_features:
        return group_size
    return MLAS_PER_CHANNEL_BLOCK if in_features >= MLAS_PER_CHANNEL_BLOCK else MLAS_BLOCK_SIZES[0]


def matmul_nbits_block(in_features: int, scheme: WeightScheme, *, dynamic: bool) -> int:
    """MatMulNBits' block_size for a per-channel weight (any block holds it: the row scale is repeated in each):
    with int8 activations (``dynamic``, accuracy_level 4) :func:`mlas_activation_block`, the span over which
    onnxruntime also quantizes the activations; with float ones the size the CPU kernel takes that stores the
    row in the fewest bytes, padding and repeated scales included, the larger on a tie."""
    if dynamic:
        return mlas_activation_block(in_features, None)
    return min(MLAS_BLOCK_SIZES, key=lambda size: (
        scheme.stored_bytes(1, in_features, WeightStorage(zero_point_bits=scheme.bits, block_size=size)), -size))


def quantize_activations_mlas(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quantize-dequantize `x` [..., in] as MLAS CompInt8 does: symmetric int8 per block of `block_size`."""
    x = x.float()
    in_features = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, -in_features % block_size))  # zeros leave a block's amax alone
    blocks = padded.reshape(*x.shape[:-1], -1, block_size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse_scale = torch.where(amax != 0, INT8_MAX / amax, 0.0)
    dequantized = torch.round(blocks * inverse_scale) * (amax / INT8_MAX)
    return dequantized.reshape(padded.shape)[..., :in_features]


def quantize_activations_dynamic(x: torch.Tensor, numerics: ActivationNumerics, *,
                                 group_size: int | None) -> torch.Tensor:
    """Quantize-dequantize a linear's input `x` [..., in] as the runtime of `numerics` does at run time;
    `group_size` is the linear's weight group size (None: per channel)."""
    if numerics is ActivationNumerics.MLAS_INT8_BLOCK:
        return quantize_activations_mlas(x, mlas_activation_block(x.shape[-1], group_size)).to(x.dtype)
    return quantize_activations_xnnpack(x).to(x.dtype)


def static_activation_qparams(min_val: float | torch.Tensor,
                              max_val: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scale and int8 zero point for a calibrated activation range [min_val, max_val]."""
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    return qparams_from_range(min_val, max_val, qmin=INT8_MIN, qmax=INT8_MAX, symmetric=False)


def quantize_activations_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `x` with fixed (calibrated) per-tensor int8 qparams; values outside clamp."""
    qdata = quantize_values(x, scale, zero_point, qmin=INT8_MIN, qmax=INT8_MAX)
    return dequantize_values(qdata, scale, zero_point).to(x.dtype)
