"""Tolerances that follow from float32 arithmetic, for tests that compare two float32 computations.

Two float32 computations of the same value differ by summation order (BLAS kernels, batch shapes and
thread counts choose it, and they differ by CPU), never by more than the rounding error bound of each.
A test compares against that bound, so it passes on any machine and still fails on a real error.
"""

from __future__ import annotations

import torch

from edgeforge.generate import teacher_forced_shortfall

EPS32 = torch.finfo(torch.float32).eps


def matmul_error_bound(x: torch.Tensor, weight: torch.Tensor, *, extra_roundings: int = 0) -> torch.Tensor:
    """Worst-case |fl(x @ weightᵀ) - x @ weightᵀ| per output: the classic dot-product bound γ_n Σ|x_k w_k|,
    γ_n = n·eps/(1 - n·eps), n = K for K-term sums in float32 in any order, plus ``extra_roundings`` for
    each product's factors that were themselves rounded once more (a folded scale, a normalised input)."""
    n = x.shape[-1] + extra_roundings
    gamma = n * EPS32 / (1 - n * EPS32)
    return gamma * (x.abs().double() @ weight.abs().double().T)


def near_tie_margin(logits: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Positions [...] where the top two logits lie within ``tolerance``: their argmax may flip under rounding."""
    top2 = logits.double().topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) <= tolerance


def assert_same_top1_except_near_ties(reference: torch.Tensor, candidate: torch.Tensor) -> None:
    """The argmax of every position agrees, except where the reference's top two logits are closer than
    twice the largest difference between the two computations (either could then be first)."""
    tolerance = 2 * (reference - candidate).abs().max().item()
    differs = reference.argmax(-1) != candidate.argmax(-1)
    unexplained = differs & ~near_tie_margin(reference, tolerance)
    assert not unexplained.any(), f"top-1 differs at {int(unexplained.sum())} positions that are not near-ties"


def assert_greedy_is_argmax(tokens: list[int], forward, prompt: list[int], tolerance: float) -> None:
    """Every greedy token a runtime chose is the argmax of ``forward``'s logits (to within ``tolerance``: a
    near-tie may go either way) on the runtime's own sequence, teacher-forced along the generation path
    (prefill the prompt, then one token per call). Unlike comparing two greedy chains, one rounding-level
    tie cannot make every later token differ."""
    shortfall = teacher_forced_shortfall(forward, prompt, tokens)
    worst = int(shortfall.argmax())
    assert shortfall.max() <= tolerance, (f"token {worst} ({tokens[worst]}) is {shortfall.max():.3g} below the "
                                          f"reference's best logit (tolerance {tolerance:.3g})")
