"""The miscompile guard's tolerances, in one place: each scheme's own limits, and the documented widening for
encoders with int8 activations that an exporter records in its report (``guard_tolerance``).

A tolerance is (minimum cosine between artifact and eager outputs at any position, minimum top-1 agreement).
"""

from __future__ import annotations

# fp32 differs only by kernel summation order. With int8 activations a last-bit difference in a fused
# kernel can push a value across a rounding boundary; the flipped key/value then stays in the KV cache,
# so near-tied top tokens flip at a few positions. A miscompile is far outside both (cosine ~0.004).
TOLERANCE = {"fp32": (0.99999, 1.0), "default": (0.999, 0.90)}
# Encoders with int8 activations: the eager model rounds activations as the runtime does, but a last-bit float
# difference upstream of an int8 rounding (the runtime's fused LayerNorm and softmax kernels against eager
# torch) now and then moves a value across a rounding boundary, and BERT's outlier channels make one step
# large: cosine ~0.9991 on MiniLM 8da8w, in XNNPACK and onnxruntime alike. A wrong lowering (XNNPACK's int8
# weight-only linear dropping the scale, swapped nibbles, wrong scales) lands far below (cosine -0.3 to 0.004).
# Decoders keep the scheme's limits: every quantized linear matches the runtime's numerics to float32
# summation order, and where chaos over many layers still moves top tokens the guard's second tier judges
# the artifact's drift from fp32 instead.
ENCODER_ACTIVATION_TOLERANCE = (0.995, 0.0)  # sentence embeddings have no top-1
ENCODER_ACTIVATION_REASON = ("float differences upstream of int8 activation rounding (fused kernels against "
                             "eager torch) change a few rounded values in the encoder, each by one int8 step")


def scheme_tolerance(scheme: str) -> tuple[float, float]:
    """The scheme's own (min cosine, min top-1)."""
    return TOLERANCE.get(scheme, TOLERANCE["default"])


def widened_tolerance(source) -> dict | None:
    """The report's ``guard_tolerance`` (limits and reason) for an export source whose runtime results differ
    from the eager model's for a reason the eager model cannot follow: an encoder with quantized activations.
    None when the scheme's own tolerance applies."""
    from edgeforge.quantize.modules import QuantizedLinear
    from edgeforge.quantize.scheme import ActivationScheme

    quantized_activations = any(isinstance(module, QuantizedLinear) and module.activations is not ActivationScheme.NONE
                                for module in source.model.modules())
    if source.architecture != "bert" or not quantized_activations:
        return None
    min_cosine, min_top1 = ENCODER_ACTIVATION_TOLERANCE
    return {"min_cosine": min_cosine, "min_top1": min_top1, "reason": ENCODER_ACTIVATION_REASON}
