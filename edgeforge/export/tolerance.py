"""The miscompile guard's tolerances: each scheme's own limits here, and the widening an architecture documents
for quantized activations (its ``quantized_activation_tolerance``), which an exporter records in its report
(``guard_tolerance``).

A tolerance is (minimum cosine between artifact and eager outputs at any position, minimum top-1 agreement).
"""

from __future__ import annotations

# fp32 differs only by kernel summation order. With int8 activations a last-bit difference in a fused
# kernel can push a value across a rounding boundary; the flipped key/value then stays in the KV cache,
# so near-tied top tokens flip at a few positions. A miscompile is far outside both (cosine ~0.004).
TOLERANCE = {"fp32": (0.99999, 1.0), "default": (0.999, 0.90)}


def scheme_tolerance(scheme: str) -> tuple[float, float]:
    """The scheme's own (min cosine, min top-1)."""
    return TOLERANCE.get(scheme, TOLERANCE["default"])


def widened_tolerance(source) -> dict | None:
    """The report's ``guard_tolerance`` (limits and reason) for an export source whose runtime results differ
    from the eager model's for a reason the eager model cannot follow: its architecture's
    ``quantized_activation_tolerance`` when its activations are quantized. None when the scheme's own
    tolerance applies."""
    from edgeforge.models import architecture
    from edgeforge.quantize.modules import QuantizedLinear
    from edgeforge.quantize.scheme import ActivationScheme

    widened = architecture(source.architecture).quantized_activation_tolerance
    quantized_activations = any(isinstance(module, QuantizedLinear) and module.activations is not ActivationScheme.NONE
                                for module in source.model.modules())
    return dict(widened) if widened and quantized_activations else None
