"""Decoder measurement for verify: token windows of the evaluation text through the model and the cached fp32
reference, llama.cpp's ``--kl-divergence`` statistics, and the ``max_kld_eager`` bound from the artifact's
source quantized checkpoint run eagerly on the same windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgeforge.errors import ConfigError, InputError
from edgeforge.verify.drift import TokenStats, summarize_drift, token_windows
from edgeforge.verify.measured import Measured, MeasureContext, check_overlap, say_progress
from edgeforge.verify.models import EvalModel, open_for_eval
from edgeforge.verify.report import DecoderSamples, DecoderSettings, Drift, EagerSource, ReferenceCache, Timing
from edgeforge.verify.reference import (
    DEFAULT_TOP_K,
    CacheKey,
    cached,
    decoder_reference,
    stats_from_inputs,
    tokens_sha256,
)

DEFAULT_SEQ_LEN = 512  # tokens per window (llama.cpp's default context), capped by the model's context
DEFAULT_WINDOWS = 32  # windows evaluated when not given (fewer when the text holds fewer)
LOGITS_BUDGET = 1 << 27  # logits values per batch of windows (512 MiB of float32)
# max_kld_eager = eager KLD x (1 + EAGER_KLD_SLACK) + EAGER_KLD_SEMS x the paired standard error of
# (artifact - eager) window KLDs. The slack is what a runtime may add legitimately (XNNPACK's bf16 group
# scales, other int8 rounding of the activations: measured up to ~1% of the eager KLD, docs/gates.md);
# 3 standard errors keep a normal artifact's false-fail rate near 0.1% whatever the window count.
EAGER_KLD_SLACK = 0.05
EAGER_KLD_SEMS = 3.0
EAGER_DRIFT = ("kld", "test_nll", "same_top1", "delta_p")  # TokenStats fields cached for the eager source


@dataclass(frozen=True)
class EagerBound:
    """The max_kld_eager threshold and what it was derived from (KLDs in nats per token)."""

    eager_kld: float  # the eager source's mean KLD on the windows
    paired_sem: float  # standard error of the mean of the per-window (artifact - eager) KLD differences
    windows: int
    threshold: float

    def describe(self) -> str:
        return (f"eager source's KLD {self.eager_kld:.4g} x {1 + EAGER_KLD_SLACK:g} + {EAGER_KLD_SEMS:g} x paired "
                f"sem {self.paired_sem:.2g} ({self.windows} windows)")


def eager_kld_bound(eager_window_kld: Sequence[float], test_window_kld: Sequence[float]) -> EagerBound:
    """max_kld_eager from per-window mean KLDs of the eager source and of the artifact on the same windows.

    Windows are the paired unit: tokens inside one window share their context, so a per-token
    standard error would overstate the evidence. With one window there is no spread to measure and
    the bound is the slack alone.
    """
    eager = torch.tensor(list(eager_window_kld), dtype=torch.float64)
    test = torch.tensor(list(test_window_kld), dtype=torch.float64)
    if eager.shape != test.shape or eager.numel() == 0:
        raise InputError(f"{eager.numel()} eager and {test.numel()} artifact window KLDs: they must pair up")
    differences = test - eager
    sem = float(differences.std(correction=1)) / math.sqrt(differences.numel()) if differences.numel() > 1 else 0.0
    eager_kld = float(eager.mean())
    return EagerBound(eager_kld=eager_kld, paired_sem=sem, windows=eager.numel(),
                      threshold=eager_kld * (1 + EAGER_KLD_SLACK) + EAGER_KLD_SEMS * sem)


def _decoder_stream(documents: list[str], tokenizer, seq_len: int, windows: int | None):
    """(windows [N, L], indices of the documents they contain): documents as the tokenizer encodes them
    (BOS where it adds one), concatenated, cut."""
    wanted = (windows or DEFAULT_WINDOWS) * seq_len
    stream: list[int] = []
    owners: list[int] = []
    for index, document in enumerate(documents):
        ids = tokenizer.encode(document)  # BOS/EOS as the tokenizer adds them
        stream += ids
        owners += [index] * len(ids)
        if len(stream) >= wanted:
            break
    count = windows if windows is not None else min(DEFAULT_WINDOWS, len(stream) // seq_len)
    if count == 0:
        raise InputError(f"the evaluation text has {len(stream)} tokens: not one window of {seq_len}")
    batch = token_windows(stream, seq_len, count)
    return batch, sorted(set(owners[:count * seq_len]))


def measure_decoder(model: EvalModel, reference, documents, options, cache_dir, say,
                    context: MeasureContext) -> Measured:
    """Drift of ``model`` from the fp32 ``reference`` on windows of ``documents`` (``options``: VerifyOptions),
    and for an artifact the eager source's drift on the same windows with its bound."""
    if options.sentences is not None:
        raise ConfigError("--sentences applies to encoders; a decoder is verified on --windows of --seq-len tokens")
    top_k = options.top_k or DEFAULT_TOP_K
    limit = min(model.max_seq_len, reference.config.max_seq_len)
    seq_len = options.seq_len or min(DEFAULT_SEQ_LEN, limit)
    if seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context {model.max_seq_len} (max_seq_len) or the "
                          f"reference's {reference.config.max_seq_len}")
    windows, used = _decoder_stream(documents, reference.tokenizer, seq_len, options.windows)
    overlap = check_overlap(model.lineage, [documents[i] for i in used], context.data_sha256,
                            allow=options.allow_overlap, data_path=context.data_path)
    vocab = reference.config.vocab_size
    batch_size = max(1, min(8, LOGITS_BUDGET // (seq_len * vocab)))
    key = CacheKey("decoder-topk", context.reference_sha256, context.data_sha256, tokens_sha256(windows),
                   seq_len, windows.shape[0], top_k)

    def compute():
        from edgeforge.checkpoints import load_model

        say(f"reference: loading {reference.path} (fp32) ...")
        return decoder_reference(load_model(reference), windows, top_k=top_k, batch_size=batch_size, say=say)

    ref = cached(key, cache_dir, compute, say=say)
    start = time.perf_counter()
    parts = _window_stats(model, windows, ref.tensors, vocab, batch_size, say, "model")
    test_seconds = time.perf_counter() - start
    eager, eager_bound, notes, eager_seconds = None, None, (), None
    if options.eager and model.kind == "artifact":
        eager_parts, eager, notes, eager_seconds = _eager_source_stats(model, windows, ref.tensors, key, cache_dir,
                                                                      vocab, batch_size, say)
        if eager_parts is not None:
            eager_bound = eager_kld_bound([float(p.kld.mean()) for p in eager_parts],
                                          [float(p.kld.mean()) for p in parts])
            eager_seconds = round(eager_seconds, 3)
    kept = ref.tensors["topk_ids"].shape[-1]  # top_k, or the vocabulary when that is smaller
    rest_mass = float(ref.tensors["rest_logprob"].exp().mean())
    samples = DecoderSamples(window_kld_mean_nats=[float(p.kld.mean()) for p in parts],
                             window_ref_nll_mean_nats=[float(p.ref_nll.mean()) for p in parts],
                             window_test_nll_mean_nats=[float(p.test_nll.mean()) for p in parts],
                             window_top1_agreement=[float(p.same_top1.double().mean()) for p in parts])
    return Measured(
        drift=Drift.of(summarize_drift(parts)), embedding=None, samples=samples, overlap=overlap,
        tokens_sha256=key.tokens_sha256,
        settings=DecoderSettings(seq_len_tokens=seq_len, windows=windows.shape[0],
                                 scored_tokens=windows.shape[0] * (seq_len - 1), top_k=kept),
        cache=ReferenceCache(path=None if ref.path is None else str(ref.path), hit=ref.hit, top_k=kept,
                             rest_mass_mean=rest_mass),
        timing=Timing(reference_seconds=round(ref.seconds, 3), test_seconds=round(test_seconds, 3),
                      eager_seconds=eager_seconds),
        eager=eager, eager_bound=eager_bound, notes=notes)


def _window_stats(model: EvalModel, windows: torch.Tensor, reference: dict, vocab: int, batch_size: int, say,
                  role: str) -> list[TokenStats]:
    """Per-window drift of ``model`` against the cached reference tensors (eager models take batches)."""
    parts = []
    step = batch_size if model.eager else 1
    for first in range(0, windows.shape[0], step):
        model_vocab, inputs = model.drift_inputs(windows[first:first + step], reference["topk_ids"][first:first + step])
        if model_vocab != vocab:
            raise InputError(f"the model's vocabulary ({model_vocab}) is not the reference's ({vocab})",
                             path=model.path)
        parts += [stats_from_inputs(reference, first + row, test) for row, test in enumerate(inputs)]
        say_progress(say, role, first + len(inputs), windows.shape[0])
    return parts


def _eager_source_stats(model: EvalModel, windows: torch.Tensor, reference: dict, key: CacheKey, cache_dir,
                        vocab: int, batch_size: int, say):
    """(per-window TokenStats, record section, notes, seconds) of the artifact's source quantized checkpoint
    run eagerly on the same windows; (None, None, (note,), 0) when that checkpoint is gone or changed."""
    from edgeforge.checkpoints import open_checkpoint

    source, recorded = model.lineage.eager_source, model.lineage.eager_source_sha256
    if source is None:
        return None, None, ("the quantized checkpoint this artifact was exported from is not where its manifest "
                            "says: max_kld_eager not applied, only the recipe's bounds",), 0.0
    sha256 = open_checkpoint(source).content_hash()
    if sha256 != recorded:
        return None, None, (f"the quantized checkpoint {source} changed since this artifact was exported from it "
                            f"(sha256 {sha256[:12]}, recorded {recorded[:12]}): max_kld_eager not applied",), 0.0

    numerics = model.lineage.eager_numerics

    def compute():
        say(f"eager source: loading {source} ...")
        eager = open_for_eval(source)
        if numerics is not None:  # round activations as the artifact's runtime does
            from edgeforge.quantize.activations import ActivationNumerics
            from edgeforge.quantize.modules import set_activation_numerics

            set_activation_numerics(eager.session.model, ActivationNumerics.from_name(numerics))
        parts = _window_stats(eager, windows, reference, vocab, batch_size, say, "eager source")
        return {name: torch.stack([getattr(p, name) for p in parts]) for name in EAGER_DRIFT}

    drift = cached(replace(key, kind="decoder-eager-drift", model=f"{sha256} {numerics or 'recorded'}"), cache_dir,
                   compute, say=say, role="eager source")
    parts = [TokenStats(ref_nll=reference["ref_nll"][row], **{name: drift.tensors[name][row] for name in EAGER_DRIFT})
             for row in range(windows.shape[0])]
    stats = summarize_drift(parts)
    section = EagerSource(path=str(Path(source).resolve()), sha256=sha256, activation_numerics=numerics,
                          kld_mean_nats=stats.kld_mean, kld_mean_nats_sem=stats.kld_mean_sem,
                          top1_agreement=stats.top1_agreement, ppl_ratio=stats.ppl_ratio,
                          window_kld_mean_nats=[float(p.kld.mean()) for p in parts],
                          cache_path=None if drift.path is None else str(drift.path), cache_hit=drift.hit)
    return parts, section, (), drift.seconds
