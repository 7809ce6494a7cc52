"""Quantization schemes and their arithmetic: qparams, quantize/dequantize, int4 packing.

Conventions. They match torchao's ``choose_qparams_affine`` / ``quantize_affine`` /
``dequantize_affine`` bit for bit, which is what ExecuTorch's XNNPACK 8da4w/8da8w path consumes, so
scales computed here can be exported as they are:

- Integers are signed and held in int8 tensors: int4 in [-8, 7], int8 in [-128, 127].
- Symmetric: ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, i.e. absmax / 7.5 for int4 and
  absmax / 127.5 for int8, and the zero point is 0 (returned as ``None``). The full negative code
  (-8) is used; +absmax lands on qmax + 0.5 and is clamped to qmax, an error of scale / 2.
- Asymmetric: ``[min(w, 0), max(w, 0)]`` maps onto ``[qmin, qmax]``:
  ``scale = (max - min) / (qmax - qmin)``, ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``,
  an int8 tensor in the same signed domain as the values.
- ``q = clamp(round(w * (1 / scale)) + zero_point, qmin, qmax)`` (round half to even);
  ``w ≈ (q - zero_point) * scale``. Scales are float32, at least float32's smallest normal.
- Weights are [out, in]; scales and zero points are [out, in // group_size] ([out, 1] per channel).
- int4 packing is offset binary, ``q + 8`` in 0..15, two values per byte along the input dimension,
  even column in the low nibble: ONNX MatMulNBits' layout (whose default zero point is 8) and
  KleidiAI's. An asymmetric zero point ``z`` is ``z + 8`` in MatMulNBits terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, NamedTuple

import torch

from edgeforge.errors import ConfigError, UnknownNameError, UnsupportedError

MIN_SCALE = torch.finfo(torch.float32).smallest_normal  # torchao's eps for float32 inputs


class ActivationScheme(str, Enum):
    """How a linear's input is quantized at run time."""

    NONE = "none"  # weight-only
    DYNAMIC_INT8 = "dynamic_int8"  # asymmetric int8 per token, qparams computed at run time (8da4w, 8da8w)
    STATIC_INT8 = "static_int8"  # asymmetric int8 per tensor, qparams calibrated ahead of time

    @classmethod
    def from_name(cls, name: str) -> ActivationScheme:
        return member_named(cls, "activation scheme", name)


def member_named(enum: type[Enum], kind: str, name: str):
    """The member of ``enum`` whose value is ``name``; UnknownNameError naming the known values otherwise."""
    try:
        return enum(name)
    except ValueError:
        raise UnknownNameError(kind, name, [member.value for member in enum]) from None


@dataclass(frozen=True)
class WeightStorage:
    """How a file holds a quantized weight: the scales' dtype, the bits of each zero point (packed along a
    row) and, where the runtime stores a per-channel weight in blocks of K (integers padded to whole blocks,
    the row's scale repeated in each), the block size (None: the scheme's own groups)."""

    scale_dtype: torch.dtype = torch.float32
    zero_point_bits: int = 8
    block_size: int | None = None

    @property
    def scale_bytes(self) -> int:
        return self.scale_dtype.itemsize


CHECKPOINT_STORAGE = WeightStorage()  # a quantized checkpoint's tensors: float32 scales, int8 zero points


@dataclass(frozen=True)
class WeightScheme:
    """How a weight matrix [out, in] is quantized.

    bits: 4 or 8.
    group_size: input columns that share one scale; None means one scale per output channel (row).
    symmetric: zero point fixed at 0 (what XNNPACK's 4-bit kernels take); False adds an integer
        zero point per group.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    KIND: ClassVar[str] = "weight_scheme"
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        if type(self.bits) is not int or self.bits not in (4, 8):
            raise ConfigError(f"weight bits must be 4 or 8, got {self.bits!r}")
        if self.group_size is not None and (type(self.group_size) is not int or self.group_size <= 0):
            raise ConfigError(f"group size must be a positive integer or None (per channel), got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be true or false, got {self.symmetric!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def stored_bytes(self, out_features: int, in_features: int, storage: WeightStorage | None = None) -> int:
        """Bytes a weight [out, in] takes in this scheme: the integers at their bit width, a scale per group and,
        when asymmetric, a zero point per group, each as ``storage`` holds them (default: as the quantized
        checkpoint does, float32 scales and int8 zero points)."""
        storage = storage or CHECKPOINT_STORAGE
        if storage.block_size:
            groups = -(-in_features // storage.block_size)
            columns = groups * storage.block_size
        else:
            groups, columns = (in_features // self.group_size if self.group_size else 1), in_features
        zero_points = 0 if self.symmetric else out_features * -(-groups * storage.zero_point_bits // 8)
        return out_features * (columns * self.bits // 8 + groups * storage.scale_bytes) + zero_points

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "version": self.VERSION, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, data: dict) -> WeightScheme:
        data = dict(data)
        kind, version = data.pop("kind", cls.KIND), data.pop("version", cls.VERSION)
        if kind != cls.KIND or version != cls.VERSION:
            raise ConfigError(f"expected a {cls.KIND} version {cls.VERSION}, got {kind!r} version {version!r}")
        unknown = sorted(set(data) - {"bits", "group_size", "symmetric"})
        if unknown:
            raise ConfigError(f"unknown weight scheme fields: {', '.join(unknown)}")
        if "bits" not in data:
            raise ConfigError("weight scheme needs 'bits'")
        return cls(**data)


class QuantizedWeight(NamedTuple):
    """Integer values [out, in] (int8 holding int4 or int8), float32 scales and optional zero points."""

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None


def check_group_size(in_features: int, scheme: WeightScheme, layer_name: str) -> int:
    """Return the group size a layer `in_features` wide uses; raise UnsupportedError if it does not divide."""
    group_size = scheme.group_size or in_features
    if in_features % group_size:
        raise UnsupportedError(
            f"{layer_name}: group size {group_size} does not divide its input width {in_features}")
    return group_size


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, *, qmin: int, qmax: int,
                       symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point when asymmetric) mapping [min_val, max_val] ∪ {0} onto [qmin, qmax]."""
    min_neg = torch.clamp(min_val, max=0)
    max_pos = torch.clamp(max_val, min=0)
    if symmetric:
        scale = torch.maximum(-min_neg, max_pos) / ((qmax - qmin) / 2)
        return scale.clamp(min=MIN_SCALE), None
    scale = ((max_pos - min_neg) / float(qmax - qmin)).clamp(min=MIN_SCALE)
    zero_point = (qmin - torch.round(min_neg / scale)).clamp(qmin, qmax).to(torch.int8)
    return scale, zero_point


def compute_qparams(weight: torch.Tensor, scheme: WeightScheme,
                    clip_ratio: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max qparams per group of `weight` [out, in]: scale [out, groups] float32, zero point or None.

    clip_ratio (a float, or a tensor broadcastable to [out, groups]) shrinks each group's range
    before the scale is taken; values outside it are clamped when quantized.
    """
    weight = weight.float()
    out_features, in_features = weight.shape
    group_size = check_group_size(in_features, scheme, f"weight of shape {out_features}x{in_features}")
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    min_val, max_val = groups.amin(dim=-1), groups.amax(dim=-1)
    if clip_ratio is not None:
        min_val, max_val = min_val * clip_ratio, max_val * clip_ratio
    return qparams_from_range(min_val, max_val, qmin=scheme.qmin, qmax=scheme.qmax, symmetric=scheme.symmetric)


def quantize_values(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, *,
                    qmin: int, qmax: int) -> torch.Tensor:
    """Elementwise affine quantization with broadcasting qparams; returns int8."""
    # Multiplying by the reciprocal (not dividing) is what torchao does; it keeps results bit-identical.
    quantized = torch.round(values.float() * (1.0 / scale))
    if zero_point is not None:
        quantized = quantized + zero_point
    return quantized.clamp(qmin, qmax).to(torch.int8)


def dequantize_values(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Elementwise ``(q - zero_point) * scale`` with broadcasting qparams; returns float32."""
    values = qdata.float()
    if zero_point is not None:
        values = values - zero_point.float()
    return values * scale


def _grouped(tensor: torch.Tensor, qparam: torch.Tensor) -> torch.Tensor:
    """View [out, in] as [out, groups, group_size], the group count taken from a qparam [out, groups]."""
    out_features, in_features = tensor.shape
    if qparam.shape[0] != out_features or in_features % qparam.shape[1]:
        raise ValueError(f"qparams of shape {tuple(qparam.shape)} do not fit a weight of shape {tuple(tensor.shape)}")
    return tensor.reshape(out_features, qparam.shape[1], -1)


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             scheme: WeightScheme) -> torch.Tensor:
    """Quantize `weight` [out, in] with per-group qparams [out, groups]; returns int8 [out, in]."""
    zero = None if zero_point is None else zero_point[..., None]
    qdata = quantize_values(_grouped(weight, scale), scale[..., None], zero, qmin=scheme.qmin, qmax=scheme.qmax)
    return qdata.reshape(weight.shape)


def dequantize(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Float32 weight [out, in] from integer values and per-group qparams [out, groups]."""
    zero = None if zero_point is None else zero_point[..., None]
    return dequantize_values(_grouped(qdata, scale), scale[..., None], zero).reshape(qdata.shape)


def pack_int4(qdata: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7], shape [out, in], into uint8 [out, in // 2] (low nibble = even column)."""
    if qdata.dtype != torch.int8 or qdata.dim() != 2:
        raise ValueError(f"pack_int4 takes a 2-D int8 tensor, got {qdata.dtype} of shape {tuple(qdata.shape)}")
    if qdata.shape[1] % 2:
        raise UnsupportedError(f"int4 packing needs an even input width, got {qdata.shape[1]}")
    if qdata.numel() and (qdata.min() < -8 or qdata.max() > 7):
        raise ValueError(f"int4 values must lie in [-8, 7], got [{qdata.min()}, {qdata.max()}]")
    offset = (qdata + 8).to(torch.uint8)
    return offset[:, 0::2] | (offset[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [out, in // 2] to int8 [out, in] in [-8, 7]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 takes a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # [out, in // 2, (even, odd)]
    return nibbles.reshape(packed.shape[0], -1).to(torch.int8) - 8
