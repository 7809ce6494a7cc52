"""edgeforge's quantized modules in the ops ExecuTorch lowers.

Quantized layers keep edgeforge's calibrated integers and scales as they are (nothing is re-quantized).
Linears with dynamic int8 activations become ``quantized_decomposed`` per-token and per-channel(-group) ops
(:class:`DynamicInt8Linear`), which XNNPACK runs as its 8da4w/8da8w kernels. Other quantized layers hold a
torchao ``IntxUnpackedToInt8Tensor`` of the checkpoint's ``qdata``/``scale``/``zero_point``; quantized
embeddings become ExecuTorch's ``embedding_byte``/``embedding_4bit`` ops.

Why not torchao's tensor for the dynamic linears too: XNNPACK runs the same qd8 kernel whatever ops describe
it, but torchao's ``choose_qparams_affine``/``quantize_affine``/``dequantize_affine`` are composite ops without
a fake kernel, so every pass of to_edge and of XNNPACK's preprocess re-runs their Python bodies over symbolic
shapes (on SmolLM2-135M, about half of lowering). ``quantized_decomposed``'s ops have meta kernels. The .pte
is the same to the byte (tests/test_export_pte.py checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.errors import UnsupportedError


INT8_RANGE = (-128, 127)


def to_lowerable(model: nn.Module, *, decomposed: bool = True) -> nn.Module:
    """Replace every QuantizedLinear/QuantizedEmbedding in ``model`` (in place) by modules over its own
    integers and scales that ExecuTorch lowers: :class:`DynamicInt8Linear` for dynamic int8 activations
    (``decomposed``; else torchao's tensor, the form other partitioners such as CoreML's read), nn.Linear /
    nn.Embedding holding a torchao ``IntxUnpackedToInt8Tensor`` for the rest."""
    from edgeforge.quantize.modules import QuantizedEmbedding, QuantizedLinear, set_module
    from edgeforge.quantize.scheme import ActivationScheme

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            if module.activations is ActivationScheme.STATIC_INT8:
                raise UnsupportedError(f"{name}: static int8 activations have no ExecuTorch XNNPACK lowering "
                                       "here; export them to ONNX (target onnx-qnn-htp)")
            dynamic = module.activations is ActivationScheme.DYNAMIC_INT8
            if dynamic and decomposed:
                linear = DynamicInt8Linear(module.qdata, module.scale, module.zero_point, module.scheme.bits,
                                           getattr(module, "bias", None))
                if module.input_multiplier is not None:
                    linear = ScaledInput(module.input_multiplier, linear)
                set_module(model, name, linear)
                continue
            linear = nn.Linear(module.in_features, module.out_features, bias=getattr(module, "bias", None) is not None,
                               device="meta")
            linear.weight = nn.Parameter(_intx_tensor(module, dynamic), requires_grad=False)
            if linear.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
            if module.input_multiplier is not None:
                linear = ScaledInput(module.input_multiplier, linear)
            set_module(model, name, linear)
        elif isinstance(module, QuantizedEmbedding):
            rows, dim = module.qdata.shape
            embedding = nn.Embedding(rows, dim, device="meta")
            embedding.weight = nn.Parameter(_intx_tensor(module, False), requires_grad=False)
            set_module(model, name, embedding)
    return model


class ScaledInput(nn.Module):
    """``linear(x * multiplier)``: a SmoothQuant input multiplier ahead of a quantized linear (XNNPACK runs the mul)."""

    def __init__(self, multiplier: torch.Tensor, linear: nn.Linear):
        super().__init__()
        self.register_buffer("multiplier", multiplier.detach().clone())
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.multiplier)


def _intx_tensor(module: nn.Module, dynamic_activations: bool):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    qdata, scale = module.qdata, module.scale
    zero_point = module.zero_point if module.zero_point is not None else torch.zeros(scale.shape, dtype=torch.int8)
    group_size = qdata.shape[1] // scale.shape[1]
    return IntxUnpackedToInt8Tensor(qdata, scale, zero_point, getattr(torch, f"int{module.scheme.bits}"),
                                    (1, group_size), torch.float32,
                                    "int8_asym_per_token" if dynamic_activations else None)


class DynamicInt8Linear(nn.Module):
    """``linear(dq(q(x)), dequant(qdata, scale, zero_point))`` with per-token asymmetric int8 activations and
    weights per output channel or per group of input columns, in the ``quantized_decomposed`` ops XNNPACK's
    partitioner matches as one dynamically quantized linear."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)

        self.in_features, self.groups = qdata.shape[1], scale.shape[1]
        self.weight_range = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        zero_point = zero_point if zero_point is not None else torch.zeros(scale.shape, dtype=torch.int8)
        per_channel = self.groups == 1
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale[:, 0].contiguous() if per_channel else scale)
        self.register_buffer("zero_point", zero_point[:, 0].contiguous() if per_channel else zero_point)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        scale, zero_point = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
        x = ops.quantize_per_token(x, scale, zero_point, *INT8_RANGE, torch.int8)
        x = ops.dequantize_per_token(x, scale, zero_point, *INT8_RANGE, torch.int8, torch.float32)
        low, high = self.weight_range
        if self.groups > 1:
            weight = ops.dequantize_per_channel_group(self.qdata, self.scale, self.zero_point, low, high, torch.int8,
                                                      self.in_features // self.groups, torch.float32)
        else:
            weight = ops.dequantize_per_channel(self.qdata, self.scale, self.zero_point, 0, low, high, torch.int8)
        return F.linear(x, weight, self.bias)
