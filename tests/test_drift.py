"""Drift statistics (llama-perplexity --kl-divergence style) against hand computations."""

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from edgeforge.errors import ConfigError, InputError
from edgeforge.models.llama import LlamaConfig, Transformer
from edgeforge.verify.drift import TokenStats, compare_models, summarize_drift, token_stats, token_windows

CONFIG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=48, hidden_dim=64, max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, CONFIG.vocab_size, (5, 17), generator=torch.Generator().manual_seed(1))


def _perturbed(model, scale=0.05):
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return noisy


def test_identical_models_have_zero_drift(model, windows):
    stats = compare_models(model, model, windows, batch_size=2)
    assert stats.token_count == 5 * 16
    assert stats.kld_mean == 0.0 and stats.kld_max == 0.0 and stats.kld_mean_sem == 0.0
    assert stats.top1_agreement == 1.0 and stats.top1_agreement_sem == 0.0
    assert stats.ppl_ratio == 1.0 and stats.ln_ppl_ratio == 0.0 and stats.ppl_ratio_sem == 0.0
    assert stats.rms_delta_p == 0.0 and stats.rms_delta_p_sem == 0.0
    assert stats.ppl_ref == stats.ppl_test


def test_constant_logit_shift_is_invisible_to_kld(model, windows):
    # shifted in float64 so the shift itself adds no fp32 rounding to the logits
    stats = compare_models(lambda tokens: model(tokens).double(), lambda tokens: model(tokens).double() + 7.5, windows)
    assert stats.kld_max < 1e-12, stats
    assert stats.top1_agreement == 1.0
    assert stats.ppl_ratio == pytest.approx(1.0, abs=1e-12)
    assert stats.rms_delta_p < 1e-12


class RecordingModel:
    """Wraps a model and keeps every logits tensor it returns, so an oracle can use the very same numbers."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, tokens):
        logits = self.model(tokens)
        self.calls.append((tokens, logits))
        return logits

    def logits_and_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every scored position's logits [T, V] in float64 and its target [T], in call order."""
        logits = torch.cat([out[:, :-1].reshape(-1, out.shape[-1]) for _, out in self.calls]).double()
        targets = torch.cat([tokens[:, 1:].reshape(-1) for tokens, _ in self.calls])
        return logits, targets


def test_perturbed_model_matches_cross_entropy_by_hand(model, windows):
    reference, noisy = RecordingModel(model), RecordingModel(_perturbed(model))
    stats = compare_models(reference, noisy, windows, batch_size=3)
    ref_logits, targets = reference.logits_and_targets()
    test_logits, test_targets = noisy.logits_and_targets()
    assert torch.equal(targets, test_targets) and targets.numel() == stats.token_count
    # The oracle is float64 cross entropy over the logits compare_models itself received, so the only
    # difference left is float64 summation order: relative 1e-12 is ~4500 float64 ulps, and a planted
    # error of 1e-6 in a statistic is a million times larger.
    ref_nll = F.cross_entropy(ref_logits, targets).item()
    test_nll = F.cross_entropy(test_logits, targets).item()
    kld = F.kl_div(F.log_softmax(test_logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                   reduction="none").sum(-1)
    assert stats.kld_mean > 0 and stats.kld_mean_sem > 0
    assert stats.kld_median <= stats.kld_p90 <= stats.kld_p95 <= stats.kld_p99 <= stats.kld_max
    assert stats.ppl_ref == pytest.approx(math.exp(ref_nll), rel=1e-12)
    assert stats.ppl_test == pytest.approx(math.exp(test_nll), rel=1e-12)
    assert stats.ppl_ratio == pytest.approx(math.exp(test_nll - ref_nll), rel=1e-12)
    assert stats.kld_mean == pytest.approx(kld.mean().item(), rel=1e-12)
    assert stats.kld_max == pytest.approx(kld.max().item(), rel=1e-12)


def test_batching_changes_the_statistics_only_by_float32_rounding(model, windows):
    noisy = _perturbed(model)
    by_three = compare_models(model, noisy, windows, batch_size=3).to_dict()
    by_five = compare_models(model, noisy, windows, batch_size=5).to_dict()
    # Another batch shape may sum the float32 matmuls in another order (BLAS kernels differ by CPU), so each
    # logit may move by about K * eps32 * |logit| (K = 64, the widest reduction here, |logit| < 10): 8e-5.
    # Every statistic is a mean of smooth functions of the logits with derivatives of order 1, so it moves
    # by at most that much in absolute terms; exact equality would hold only on one machine.
    logit_error = CONFIG.hidden_dim * torch.finfo(torch.float32).eps * 10
    assert by_three.keys() == by_five.keys()
    for name, value in by_three.items():
        assert by_five[name] == pytest.approx(value, rel=logit_error, abs=logit_error), name


def test_kld_matches_torch_kl_div():
    generator = torch.Generator().manual_seed(3)
    ref, test = torch.randn(6, 11, generator=generator), torch.randn(6, 11, generator=generator) * 2
    targets = torch.randint(0, 11, (6,), generator=generator)
    stats = token_stats(ref, test, targets)
    expected = F.kl_div(F.log_softmax(test.double(), -1), F.log_softmax(ref.double(), -1), log_target=True,
                        reduction="none").sum(-1)
    torch.testing.assert_close(stats.kld, expected, rtol=1e-12, atol=1e-14)
    p_ref, p_test = ref.double().softmax(-1), test.double().softmax(-1)
    torch.testing.assert_close(stats.delta_p, p_test[range(6), targets] - p_ref[range(6), targets])
    torch.testing.assert_close(stats.ref_nll, -p_ref[range(6), targets].log())
    assert stats.same_top1.tolist() == (ref.argmax(-1) == test.argmax(-1)).tolist()


def test_uncertainties_follow_the_llama_cpp_formulas():
    kld = [0.0, 0.1, 0.2, 0.3]
    ref_nll, test_nll = [1.0, 1.0, 1.0, 1.0], [1.0, 1.2, 1.4, 1.6]
    delta_p = [0.1, -0.2, 0.2, 0.0]
    stats = summarize_drift([
        TokenStats(kld=torch.tensor(kld[:2], dtype=torch.float64), ref_nll=torch.tensor(ref_nll[:2]).double(),
                   test_nll=torch.tensor(test_nll[:2]).double(), same_top1=torch.tensor([True, True]),
                   delta_p=torch.tensor(delta_p[:2]).double()),
        TokenStats(kld=torch.tensor(kld[2:], dtype=torch.float64), ref_nll=torch.tensor(ref_nll[2:]).double(),
                   test_nll=torch.tensor(test_nll[2:]).double(), same_top1=torch.tensor([True, False]),
                   delta_p=torch.tensor(delta_p[2:]).double()),
    ])
    n = 4
    assert stats.token_count == n
    assert stats.kld_mean == pytest.approx(0.15)
    assert stats.kld_mean_sem == pytest.approx(statistics.stdev(kld) / 2)
    assert stats.kld_median == pytest.approx(0.15) and stats.kld_max == pytest.approx(0.3)
    assert stats.kld_p90 == pytest.approx(0.27)  # linear interpolation between 0.2 and 0.3
    assert stats.top1_agreement == 0.75
    assert stats.top1_agreement_sem == pytest.approx(math.sqrt(0.75 * 0.25 / n))
    diff_sem = statistics.stdev([b - a for a, b in zip(ref_nll, test_nll)]) / 2
    assert stats.ln_ppl_ratio == pytest.approx(0.3) and stats.ln_ppl_ratio_sem == pytest.approx(diff_sem)
    assert stats.ppl_ratio == pytest.approx(math.exp(0.3))
    assert stats.ppl_ratio_sem == pytest.approx(math.exp(0.3) * diff_sem)
    assert stats.ppl_ref == pytest.approx(math.e) and stats.ppl_ref_sem == 0.0
    squares = [d * d for d in delta_p]
    rms = math.sqrt(statistics.mean(squares))
    assert stats.rms_delta_p == pytest.approx(0.15)
    assert stats.rms_delta_p_sem == pytest.approx(statistics.stdev(squares) / 2 / (2 * rms))
    assert stats.delta_p_mean == pytest.approx(0.025)
    assert set(stats.to_dict()) >= {"kld_mean", "kld_mean_sem", "top1_agreement", "top1_agreement_sem",
                                    "rms_delta_p", "ppl_ratio", "ppl_ratio_sem", "token_count"}


def test_token_windows_are_consecutive_and_non_overlapping():
    windows = token_windows(list(range(23)), 5, 3)
    assert windows.dtype == torch.long
    assert windows.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert token_windows(list(range(23)), 5, None).shape == (4, 5)


def test_token_windows_refuses_more_windows_than_the_text_holds():
    with pytest.raises(InputError, match="4 whole windows"):
        token_windows(list(range(23)), 5, 5)
    with pytest.raises(ConfigError):
        token_windows(list(range(23)), 1, None)


def test_compare_models_refuses_mismatched_vocabularies(model, windows):
    with pytest.raises(InputError, match="differ in shape"):
        compare_models(model, lambda tokens: model(tokens)[..., :-1], windows)


def test_summarize_drift_needs_two_tokens():
    one = token_stats(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(InputError, match="at least 2"):
        summarize_drift(one)
