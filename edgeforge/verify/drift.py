"""Paired drift statistics: a test model's next-token distributions against a reference model's.

Both models see the same token windows; logits at position t predict token t+1 (the last position
of each window has no target and is dropped). Following llama.cpp ``llama-perplexity
--kl-divergence``, every figure carries an uncertainty:

- KLD is KL(ref || test) in nats per token; mean ± standard error of the mean, plus tail percentiles.
- ln(PPL_test / PPL_ref) = mean(test_nll - ref_nll) ± its SEM (paired, so correlated noise cancels);
  the ratio and the two perplexities get the same SEM propagated through exp.
- Top-1 agreement p ± sqrt(p (1 - p) / n) (binomial).
- delta_p = p_test(target) - p_ref(target); RMS delta_p ± SEM of mean(delta_p^2) propagated through sqrt.

Reading them: KLD near 0 and top-1 near 1 mean the distributions barely moved; a PPL ratio above 1
beyond its ± means the test model got worse on this text; a negative mean delta_p means probability
was taken away from the correct tokens rather than just noise added.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from edgeforge.errors import ConfigError, InputError
from edgeforge.quantize.metrics import kl_divergence_nats

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [B, L] -> logits [B, L, V]


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics, all 1-D of length T (float64, same_top1 bool)."""

    kld: torch.Tensor  # KL(ref || test), nats
    ref_nll: torch.Tensor  # -ln p_ref(target), nats
    test_nll: torch.Tensor  # -ln p_test(target), nats
    same_top1: torch.Tensor  # argmax of both distributions agrees
    delta_p: torch.Tensor  # p_test(target) - p_ref(target)

    def __len__(self) -> int:
        return self.kld.numel()

    @classmethod
    def cat(cls, parts: Sequence[TokenStats]) -> TokenStats:
        """Concatenate the statistics of several windows."""
        if not parts:
            raise InputError("no token statistics to concatenate")
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in cls.__dataclass_fields__))


def token_stats(ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """Statistics of T positions: ref_logits, test_logits [T, V]; targets [T] (the token each position predicts)."""
    if ref_logits.ndim != 2 or ref_logits.shape != test_logits.shape:
        raise InputError(f"reference logits {tuple(ref_logits.shape)} and test logits {tuple(test_logits.shape)} "
                         "must both be [tokens, vocab]")
    if targets.shape != ref_logits.shape[:1]:
        raise InputError(f"targets {tuple(targets.shape)} do not match {ref_logits.shape[0]} logit rows")
    ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
    test_logp = torch.log_softmax(test_logits.double(), dim=-1)
    kld = kl_divergence_nats(ref_logp, test_logp)
    index = targets.long().unsqueeze(-1)
    ref_nll = -ref_logp.gather(-1, index).squeeze(-1)
    test_nll = -test_logp.gather(-1, index).squeeze(-1)
    same_top1 = ref_logits.argmax(-1) == test_logits.argmax(-1)
    delta_p = torch.exp(-test_nll) - torch.exp(-ref_nll)
    return TokenStats(kld=kld, ref_nll=ref_nll, test_nll=test_nll, same_top1=same_top1, delta_p=delta_p)


@dataclass(frozen=True)
class DriftStats:
    """Summary of paired drift over ``token_count`` scored tokens; each ``*_sem`` is the standard error
    of the figure before it. KLD in nats per token; perplexities and probabilities are unitless."""

    token_count: int
    ppl_ref: float
    ppl_ref_sem: float
    ppl_test: float
    ppl_test_sem: float
    ln_ppl_ratio: float  # mean(test_nll - ref_nll)
    ln_ppl_ratio_sem: float
    ppl_ratio: float  # ppl_test / ppl_ref = exp(ln_ppl_ratio)
    ppl_ratio_sem: float
    kld_mean: float
    kld_mean_sem: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    top1_agreement_sem: float
    delta_p_mean: float
    delta_p_mean_sem: float
    rms_delta_p: float
    rms_delta_p_sem: float

    def to_dict(self) -> dict:
        return asdict(self)


def _exp(value: float) -> float:
    """exp that saturates to inf: a broken artifact's perplexity must be reported, not crash verify."""
    return math.exp(value) if value < 709.0 else float("inf")


def _sem(values: torch.Tensor) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n))."""
    return float(values.std(correction=1) / math.sqrt(values.numel()))


def _quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile of an ascending 1-D tensor (torch.quantile caps its input size)."""
    position = q * (sorted_values.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, sorted_values.numel() - 1)
    return float(sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low]))


def summarize_drift(stats: TokenStats | Sequence[TokenStats]) -> DriftStats:
    """Aggregate per-token statistics (one TokenStats or a list of them) into a :class:`DriftStats`."""
    if not isinstance(stats, TokenStats):
        stats = TokenStats.cat(list(stats))
    n = len(stats)
    if n < 2:
        raise InputError(f"drift statistics need at least 2 scored tokens for an uncertainty, got {n}")
    nll_diff = stats.test_nll - stats.ref_nll
    ln_ratio, ln_ratio_sem = float(nll_diff.mean()), _sem(nll_diff)
    ppl_ref, ppl_test, ppl_ratio = _exp(float(stats.ref_nll.mean())), _exp(float(stats.test_nll.mean())), \
        _exp(ln_ratio)
    kld_sorted = stats.kld.sort().values
    top1 = float(stats.same_top1.double().mean())
    squared_dp = stats.delta_p.square()
    rms_dp = math.sqrt(float(squared_dp.mean()))
    return DriftStats(
        token_count=n,
        ppl_ref=ppl_ref, ppl_ref_sem=ppl_ref * _sem(stats.ref_nll),  # d exp(x) = exp(x) dx
        ppl_test=ppl_test, ppl_test_sem=ppl_test * _sem(stats.test_nll),
        ln_ppl_ratio=ln_ratio, ln_ppl_ratio_sem=ln_ratio_sem,
        ppl_ratio=ppl_ratio, ppl_ratio_sem=ppl_ratio * ln_ratio_sem,
        kld_mean=float(stats.kld.mean()), kld_mean_sem=_sem(stats.kld),
        kld_median=_quantile(kld_sorted, 0.5), kld_p90=_quantile(kld_sorted, 0.9),
        kld_p95=_quantile(kld_sorted, 0.95), kld_p99=_quantile(kld_sorted, 0.99), kld_max=float(kld_sorted[-1]),
        top1_agreement=top1, top1_agreement_sem=math.sqrt(top1 * (1 - top1) / n),
        delta_p_mean=float(stats.delta_p.mean()), delta_p_mean_sem=_sem(stats.delta_p),
        rms_delta_p=rms_dp,
        rms_delta_p_sem=_sem(squared_dp) / (2 * rms_dp) if rms_dp > 0 else 0.0,  # d sqrt(x) = dx / (2 sqrt(x))
    )


def token_windows(ids: Sequence[int], seq_len: int, count: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens: LongTensor [N, seq_len].

    ``count`` takes the first N windows (an error if the ids hold fewer); None takes all whole windows.
    """
    if seq_len < 2:
        raise ConfigError(f"window length must be at least 2 tokens (one scored prediction), got {seq_len}")
    available = len(ids) // seq_len
    if count is None:
        count = available
    if count < 1 or count > available:
        raise InputError(f"asked for {count} windows of {seq_len} tokens; the text has {len(ids)} tokens "
                         f"({available} whole windows)")
    return torch.tensor(list(ids[: count * seq_len]), dtype=torch.long).view(count, seq_len)


def _logits(model: LogitsFn, tokens: torch.Tensor, role: str) -> torch.Tensor:
    logits = model(tokens)
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise InputError(f"{role} model returned logits {tuple(logits.shape)} for tokens {tuple(tokens.shape)}; "
                         "expected [batch, length, vocab]")
    return logits


def compare_models(reference: LogitsFn, test: LogitsFn, windows: torch.Tensor, *, batch_size: int = 8) -> DriftStats:
    """Score next-token prediction of ``test`` against ``reference`` on ``windows`` [N, L] and summarize.

    Both callables map tokens [B, L] to logits [B, L, V]. Each window yields L - 1 scored tokens.
    """
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ConfigError(f"windows must be [count, length] with length >= 2, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    windows = windows.long()
    parts = []
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            tokens = windows[start: start + batch_size]
            ref_logits = _logits(reference, tokens, "reference")
            test_logits = _logits(test, tokens, "test")
            if ref_logits.shape != test_logits.shape:
                raise InputError(f"reference logits {tuple(ref_logits.shape)} and test logits "
                                 f"{tuple(test_logits.shape)} differ in shape")
            for row in range(tokens.shape[0]):  # one window at a time bounds the float64 copies to [L, V]
                parts.append(token_stats(ref_logits[row, :-1], test_logits[row, :-1], tokens[row, 1:]))
    return summarize_drift(parts)
