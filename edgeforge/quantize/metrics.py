"""Error measures for quantized tensors and layer outputs (higher SQNR and lower relative error are better)."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference`` in dB; inf when identical."""
    reference, approx = reference.double(), approx.double()
    return energy_sqnr_db(reference.pow(2).sum().item(), (reference - approx).pow(2).sum().item())


def energy_sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal energy / noise energy), from sums of squares (accumulated over row chunks, say); inf
    when the noise is zero, -inf when the signal is."""
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def relative_output_error(ref_out: torch.Tensor, q_out: torch.Tensor) -> float:
    """‖ref_out − q_out‖ / ‖ref_out‖ (Frobenius norms over all elements); 0 when identical."""
    ref_out, q_out = ref_out.double(), q_out.double()
    noise = torch.linalg.vector_norm(ref_out - q_out).item()
    signal = torch.linalg.vector_norm(ref_out).item()
    if noise == 0:
        return 0.0
    return noise / signal if signal else math.inf


def kl_divergence_nats(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats per row of log-probabilities [..., vocab] (log_softmax of logits, float64).

    Rounding can leave a mathematically-zero KLD at -1e-17; KL is never negative, so it is clamped."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
