"""Error measures for quantized tensors and layer outputs (higher SQNR and lower relative error are better)."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20·log10(‖ref‖ / ‖ref − approx‖) in dB; inf when identical."""
    reference, approx = reference.double(), approx.double()
    noise = torch.linalg.vector_norm(reference - approx).item()
    signal = torch.linalg.vector_norm(reference).item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 20 * math.log10(signal / noise)


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
