"""The miscompile guard: run the new artifact on fixed sequences and judge it, in two tiers.

Tier 1, ``eager``: the artifact against the eager (quantized) model, which must compute the same thing
within the scheme's tolerance. Prefill of a fixed prompt, then single-token decode steps, both through
each side's KV cache, so the decode graph is checked too.

Tier 2, ``fp32-drift``, only when tier 1 fails on a quantized model: where the eager model cannot
reproduce a runtime's arithmetic to the last bit, int8 roundings near a boundary go the other way, the
flip stays in the KV cache and, over many layers, chaos moves top tokens, although the artifact is as
good a quantization as the eager model. So both are judged against the fp32 model on the same
positions (text where a tokenizer exists, prefill and decode): the artifact passes when its mean
KLD(fp32 || artifact) exceeds eager's by no more than the paired statistics' uncertainty plus a small
share of eager's own drift, and its top-1 agreement with fp32 is not significantly below eager's. A
miscompile (dropped or wrong scales, swapped nibbles) drifts many times more than the eager model does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgeforge.errors import EdgeforgeError, GateFailed
from edgeforge.export.tolerance import scheme_tolerance
from edgeforge.quantize.metrics import kl_divergence_nats
from edgeforge.records import described

# Top-1 agreement counts a position where the artifact's top token is the eager top token, or one the eager
# model finds as likely to within this many nats: a tie is not a disagreement (random-weight models are full
# of near-ties: their next-token distributions are almost flat).
NEAR_TIE_NATS = 0.01
SUGGESTION = {"8w": "8da8w (recipe int8-dynamic) or 8da4w (recipe int4-gptq)"}

# Tier 2. One-sided z: an artifact exactly as good as eager is refused with probability ~0.1% if positions
# were independent. They are not (the KV cache carries each window's history forward), so the per-position
# standard error understates the uncertainty; the floor, a share of eager's own drift (KLD, and misses of
# fp32's top token), covers that. The same quantization run with another rounding of its activations or
# scales lands within a few percent of eager's mean KLD (SmolLM2-135M 8da4w on onnx-cpu here: +0.4%,
# tier 1 at cosine 0.992; verify on wikitext: .pte -0.5%, ONNX -13%; its 4-layer slice: +0.6% to +0.8%,
# -4.4% with eager rounding per token against MLAS per block), a planted fault far above (the slice: one
# layer's scales x4 +640%, swapped nibbles +12,000%).
DRIFT_Z = 3.0
DRIFT_FLOOR_SHARE = 0.10
DRIFT_WINDOWS = 4  # windows of real text (or random ids), each a prefill then single-token decode steps
DRIFT_WINDOW = 128  # an eighth of each window decoded: decode calls cost most, prefill positions little
GUARD_TEXT = Path(__file__).resolve().parent.parent / "data" / "tinystories" / "evaluation.txt"
GUARD_TEXT_CHARS = 20_000  # its opening: >= 4 x 128 tokens even at one byte per token (ASCII stories)


@dataclass(frozen=True)
class GuardReport:
    """Tier 1: the artifact's logits (or embeddings) against the eager model's."""

    positions: int
    min_cosine: float
    max_abs_diff: float
    top1_agreement: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DriftReport:
    """Tier 2: the artifact's and the eager model's drift from fp32 on the same positions (KLD in nats).

    kld_excess_mean / _sem: mean and standard error of the per-position KLD(fp32 || artifact) minus
    KLD(fp32 || eager); top1_shortfall_*: the same for eager's top-1 hit minus the artifact's.
    Each passes when its mean is at most its bound: DRIFT_Z sem + DRIFT_FLOOR_SHARE x eager's own drift.
    """

    positions: int
    tokens: str  # "text" (the tokenizer's ids of GUARD_TEXT) or "random" (fixed random ids)
    kld_artifact_mean: float
    kld_eager_mean: float
    kld_excess_mean: float
    kld_excess_sem: float
    kld_excess_bound: float
    top1_artifact: float
    top1_eager: float
    top1_shortfall_mean: float
    top1_shortfall_sem: float
    top1_shortfall_bound: float
    passed: bool


@dataclass(frozen=True, kw_only=True)
class GuardResult:
    """The artifact record's ``guard``: tier 1's figures (a decoder's over positions, an encoder's over
    sentences), which test decided, and tier 2's figures when it ran. ``passed`` is the verdict (a refused
    artifact is never written)."""

    positions: int | None = described("decoder: positions compared (prefill and decode)", default=None)
    sentences: int | None = described("encoder: sentences whose embeddings were compared", default=None)
    min_cosine: float = described("lowest cosine between artifact and eager outputs")
    max_abs_diff: float = described("largest absolute difference between them")
    top1_agreement: float | None = described("decoder: share of positions whose top token agrees", default=None)
    passed: bool = described("the verdict")
    test: str = described("which test decided: eager | fp32-drift", default="eager")
    fp32_drift: DriftReport | None = described("tier 2's figures, None where tier 1 passed", default=None)


def guard_record(test: str, eager: GuardReport | EncoderGuardReport, drift: DriftReport | None = None) -> GuardResult:
    """The artifact record's ``guard`` of a passed check."""
    return GuardResult(**{**asdict(eager), "passed": True}, test=test, fp32_drift=drift)


def describe(guard: GuardResult | None) -> str:
    """The guard's verdict in one line, for summaries."""
    if guard is None:
        return "not run: the target does not execute on this machine"
    if guard.sentences is not None:  # an encoder's: embeddings of fixed sentences
        return f"passed against the eager model: min cosine {guard.min_cosine:.5f} over {guard.sentences} sentences"
    eager = f"min cosine {guard.min_cosine:.5f}, top-1 {guard.top1_agreement:.3f} over {guard.positions} positions"
    drift = guard.fp32_drift
    if guard.test == "eager" or not drift:
        return f"passed against the eager model: {eager}"
    return (f"passed on drift from fp32 (against eager: {eager}, outside tolerance): mean KLD "
            f"{drift.kld_artifact_mean:.4f} vs eager {drift.kld_eager_mean:.4f} nats (excess "
            f"{drift.kld_excess_mean:+.4f} <= {drift.kld_excess_bound:.4f}), top-1 with fp32 "
            f"{drift.top1_artifact:.3f} vs eager {drift.top1_eager:.3f} over {drift.positions} positions")


def fixed_sequence(vocab_size: int, length: int, seed: int = 1234) -> torch.Tensor:
    """The guard's token ids [1, length]: deterministic, starting with BOS-like id 1."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab_size, (1, length), generator=generator)
    tokens[0, 0] = 1 if vocab_size > 1 else 0
    return tokens


@torch.no_grad()
def decode_logits(forward, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [length, vocab] from ``forward(tokens, input_pos)``: one prefill call, then one token per call."""
    outputs = [forward(tokens[:, :prefill], torch.arange(prefill))[0]]
    for position in range(prefill, tokens.shape[1]):
        outputs.append(forward(tokens[:, position:position + 1], torch.tensor([position]))[0])
    return torch.cat(outputs).float()


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, scheme: str,
                   tolerance: tuple[float, float] | None = None) -> GuardReport:
    """``tolerance`` (min cosine, min top-1) replaces the scheme's default; an exporter whose runtime
    computes a scheme differently by design (see its report's ``guard_tolerance``) passes one."""
    cosine = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    min_cosine, min_top1 = tolerance or scheme_tolerance(scheme)
    log_probs = reference.double().log_softmax(-1)
    chosen = log_probs.gather(-1, candidate.argmax(-1, keepdim=True)).squeeze(-1)
    top1 = (chosen >= log_probs.max(-1).values - NEAR_TIE_NATS).float().mean().item()
    report = GuardReport(positions=reference.shape[0], min_cosine=cosine.min().item(),
                         max_abs_diff=(reference - candidate).abs().max().item(), top1_agreement=top1,
                         passed=bool(cosine.min().item() >= min_cosine and top1 >= min_top1))
    return report


def _mean_sem(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    sem = values.std(unbiased=True) / values.numel() ** 0.5 if values.numel() > 1 else torch.tensor(float("inf"))
    return values.mean().item(), sem.item()


def judge_drift(kld_artifact: torch.Tensor, kld_eager: torch.Tensor, top1_artifact: torch.Tensor,
                top1_eager: torch.Tensor, *, tokens: str) -> DriftReport:
    """Tier 2's verdict from per-position KLDs to fp32 and per-position top-1 hits (1 where the model's top
    token is fp32's), paired: the artifact and the eager model were fed the same tokens."""
    excess, excess_sem = _mean_sem(kld_artifact - kld_eager)
    shortfall, shortfall_sem = _mean_sem(top1_eager.double() - top1_artifact.double())
    eager_kld, eager_top1 = kld_eager.double().mean().item(), top1_eager.double().mean().item()
    kld_bound = DRIFT_Z * excess_sem + DRIFT_FLOOR_SHARE * eager_kld
    top1_bound = DRIFT_Z * shortfall_sem + DRIFT_FLOOR_SHARE * (1.0 - eager_top1)
    return DriftReport(positions=kld_artifact.numel(), tokens=tokens,
                       kld_artifact_mean=kld_artifact.double().mean().item(), kld_eager_mean=eager_kld,
                       kld_excess_mean=excess, kld_excess_sem=excess_sem, kld_excess_bound=kld_bound,
                       top1_artifact=top1_artifact.double().mean().item(), top1_eager=eager_top1,
                       top1_shortfall_mean=shortfall, top1_shortfall_sem=shortfall_sem,
                       top1_shortfall_bound=top1_bound, passed=excess <= kld_bound and shortfall <= top1_bound)


def drift_windows(tokenizer, vocab_size: int, max_seq_len: int) -> tuple[list[torch.Tensor], str]:
    """Tier 2's inputs: DRIFT_WINDOWS consecutive windows [1, length] of GUARD_TEXT in the tokenizer's ids,
    or of fixed random ids where there is no tokenizer (or its ids do not fit the model's vocabulary)."""
    length = min(DRIFT_WINDOW, max_seq_len)
    if tokenizer is not None:
        ids = tokenizer.encode(GUARD_TEXT.read_text()[:GUARD_TEXT_CHARS])
        if len(ids) >= DRIFT_WINDOWS * length and max(ids) < vocab_size:
            stream = torch.tensor(ids[:DRIFT_WINDOWS * length])
            return list(stream.reshape(DRIFT_WINDOWS, 1, length)), "text"
    return [fixed_sequence(vocab_size, length, seed=1234 + window) for window in range(DRIFT_WINDOWS)], "random"


def check_drift(session, eager_model, fp32_model, tokenizer, *, max_seq_len: int) -> DriftReport:
    """Tier 2: the artifact's and the eager model's drift from the fp32 model over the drift windows."""
    windows, kind = drift_windows(tokenizer, eager_model.config.vocab_size, max_seq_len)
    kld_artifact, kld_eager, top1_artifact, top1_eager = [], [], [], []
    for tokens in windows:
        prefill = tokens.shape[1] - tokens.shape[1] // 8
        logits = {}
        for name, model in (("fp32", fp32_model), ("eager", eager_model)):
            model.setup_cache(1, max_seq_len)
            logits[name] = decode_logits(model, tokens, prefill)
        artifact = decode_logits(session.forward, tokens, prefill)  # starts at position 0: a fresh cache
        reference_top = logits["fp32"].argmax(-1)
        log_p = logits["fp32"].double().log_softmax(-1)
        kld_artifact.append(kl_divergence_nats(log_p, artifact.double().log_softmax(-1)))
        kld_eager.append(kl_divergence_nats(log_p, logits["eager"].double().log_softmax(-1)))
        top1_artifact.append(artifact.argmax(-1) == reference_top)
        top1_eager.append(logits["eager"].argmax(-1) == reference_top)
    return judge_drift(torch.cat(kld_artifact), torch.cat(kld_eager), torch.cat(top1_artifact),
                       torch.cat(top1_eager), tokens=kind)


def check_decoder(session, eager_model, *, scheme: str, max_seq_len: int, prefill: int = 64, decode: int = 32,
                  tolerance: tuple[float, float] | None = None,
                  fp32_model: Callable[[], torch.nn.Module] | None = None, tokenizer=None) -> GuardResult:
    """Judge a decoder artifact (tier 1, then tier 2 if it fails); the record's ``guard``, or
    GateFailed naming the tests and their figures. ``fp32_model`` loads the fp32 model a quantized source
    came from (raising EdgeforgeError when it cannot), only if tier 2 runs; None: tier 1 alone decides."""
    prefill = min(prefill, max_seq_len // 2)
    length = min(prefill + decode, max_seq_len)
    tokens = fixed_sequence(eager_model.config.vocab_size, length)
    eager_model.setup_cache(1, max_seq_len)
    reference = decode_logits(eager_model, tokens, prefill)
    candidate = decode_logits(session.forward, tokens, prefill)
    report = compare_logits(reference, candidate, scheme, tolerance)
    if report.passed:
        return guard_record("eager", report)
    refusal = (f"export guard: the artifact's logits disagree with the eager {scheme} model (min cosine "
               f"{report.min_cosine:.4f}, top-1 agreement {report.top1_agreement:.3f} over {report.positions} "
               "positions)")
    hint = f"Try {SUGGESTION.get(scheme, 'fp32, or another scheme the target lists')}"
    if scheme == "fp32" or fp32_model is None:
        raise GateFailed(f"{refusal}; the lowering of this scheme is wrong here. {hint}")
    try:
        reference_model = fp32_model()
    except EdgeforgeError as exc:
        raise GateFailed(f"{refusal}, and the fp32-drift test cannot run: {exc}") from None
    drift = check_drift(session, eager_model, reference_model, tokenizer, max_seq_len=max_seq_len)
    if not drift.passed:
        raise GateFailed(f"{refusal}, and the fp32-drift test refuses it too: mean KLD to fp32 "
                         f"{drift.kld_artifact_mean:.4f} vs eager {drift.kld_eager_mean:.4f} nats (excess "
                         f"{drift.kld_excess_mean:+.4f}, bound {drift.kld_excess_bound:.4f}), top-1 with fp32 "
                         f"{drift.top1_artifact:.3f} vs eager {drift.top1_eager:.3f} (shortfall bound "
                         f"{drift.top1_shortfall_bound:.3f}) over {drift.positions} positions; the lowering of "
                         f"this scheme is wrong here. {hint}")
    return guard_record("fp32-drift", report, drift)


GUARD_SENTENCES = ("A man is eating food.", "The quick brown fox jumps over the lazy dog.",
                   "Quantized models must be checked against their reference.", "Hello")


@dataclass(frozen=True)
class EncoderGuardReport:
    """The encoder guard: the artifact's sentence embeddings against the eager encoder's (the decoder
    guard's field names for the same figures; embeddings have no top token, so no top-1)."""

    sentences: int
    min_cosine: float
    max_abs_diff: float
    passed: bool


@torch.no_grad()
def check_encoder(session, eager_model, tokenizer, *, scheme: str,
                  tolerance: tuple[float, float] | None = None) -> GuardResult:
    """Compare a sentence-embedding artifact with the eager encoder on fixed sentences; the record's ``guard``
    (``tolerance``'s minimum cosine replaces the scheme's; its top-1 does not apply)."""
    inputs = tokenizer.encode_batch(list(GUARD_SENTENCES), max_length=eager_model.config.max_seq_len)
    reference = eager_model(*inputs).float()
    candidate = session.embed(*inputs).float()
    min_cosine = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1).min().item()
    report = EncoderGuardReport(sentences=reference.shape[0], min_cosine=min_cosine,
                                max_abs_diff=(reference - candidate).abs().max().item(),
                                passed=min_cosine >= (tolerance or scheme_tolerance(scheme))[0])
    if not report.passed:
        raise GateFailed(f"export guard: the artifact's embeddings disagree with the eager {scheme} encoder "
                         f"(min cosine {report.min_cosine:.5f} over {report.sentences} sentences)")
    return guard_record("eager", report)
