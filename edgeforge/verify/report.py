"""The verify result: one record (:class:`VerifyReport`, kind ``edgeforge.verify``), rendered as llama.cpp-style
text or as JSON (``edgeforge verify --json FILE``: ``VerifyReport.to_dict()``). Every field's meaning is in
docs/report-schema.md, generated from the fields below.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeforge.errors import GateFailed
from edgeforge.records import Record, described
from edgeforge.runners.conditions import Provenance
from edgeforge.verify.drift import DriftStats
from edgeforge.verify.embedding import EmbeddingStats


@dataclass(frozen=True, kw_only=True)
class GateResult:
    """One gate: a drift or embedding field of this record held to a threshold."""

    gate: str = described("max_kld, min_top1, max_ppl_ratio, min_cosine (recipe or option) or max_kld_eager")
    statistic: str = described("the `drift`/`embedding` field it reads (kld_mean_nats, top1_agreement, ppl_ratio, "
                               "cosine_mean; files before this field's rename say kld_mean)")
    op: str = described('"<=" (a max gate) or ">=" (a min gate)')
    threshold: float = described("the bound")
    value: float = described("the statistic's value")
    source: str = described("option, recipe or eager (derived from the eager source's result)")
    basis: str | None = described("how an eager threshold was derived, else null", default=None)
    passed: bool = described("value op threshold (computed)", init=False)

    def __post_init__(self):
        passed = self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold
        object.__setattr__(self, "passed", passed)

    def describe(self) -> str:
        op = self.op if self.passed else {"<=": ">", ">=": "<"}[self.op]
        line = f"{self.statistic} {self.value:.4g} {op} {self.gate} {self.threshold:.4g}"
        if self.source == "eager" and not self.passed:
            line += (" (the artifact drifts beyond its own quantized checkpoint run eagerly: a fault in the "
                     "lowering or the runtime, not the quantization)")
        return line


@dataclass(frozen=True)
class Overlap:
    """How the evaluation text relates to the calibration text (method "none": the model had no calibration)."""

    method: str = described("fingerprints, file-hash or none")
    calibration_sha256: str | None = described("SHA-256 of the calibration text")
    evaluated_documents: int = described("documents that reached a window or sentence")
    overlapping_documents: int | None = described("evaluated documents that were calibration documents "
                                                  "(null for file-hash)")
    short_documents: int = described("evaluated documents under verify.MIN_OVERLAP_WORDS words, not compared")
    same_file: bool = described("the evaluation text is the calibration text")
    allowed: bool = described("--allow-overlap was given")
    source: str | None = described("the fingerprints file")


@dataclass(frozen=True, kw_only=True)
class Drift:
    """Decoder drift (llama.cpp's --kl-divergence set); every *_sem is the standard error of the figure before it."""

    token_count: int = described("scored tokens")
    ppl_ref: float = described("the reference's perplexity")
    ppl_ref_sem: float = described("its standard error")
    ppl_test: float = described("the model's perplexity")
    ppl_test_sem: float = described("its standard error")
    ln_ppl_ratio_nats: float = described("mean(test NLL - reference NLL) per token, nats")
    ln_ppl_ratio_nats_sem: float = described("its standard error")
    ppl_ratio: float = described("PPL(test) / PPL(ref)")
    ppl_ratio_sem: float = described("its standard error")
    kld_mean_nats: float = described("mean KL(ref || test) per token, nats: top-k + rest, a lower bound")
    kld_mean_nats_sem: float = described("its standard error")
    kld_median_nats: float = described("median per-token KLD")
    kld_p90_nats: float = described("90th percentile per-token KLD")
    kld_p95_nats: float = described("95th percentile per-token KLD")
    kld_p99_nats: float = described("99th percentile per-token KLD")
    kld_max_nats: float = described("largest per-token KLD")
    top1_agreement: float = described("share of tokens whose argmax agrees, 0..1")
    top1_agreement_sem: float = described("its standard error")
    delta_p_mean: float = described("mean of p_test - p_ref of the next token, probability")
    delta_p_mean_sem: float = described("its standard error")
    rms_delta_p: float = described("RMS of p_test - p_ref")
    rms_delta_p_sem: float = described("its standard error")

    @classmethod
    def of(cls, stats: DriftStats) -> Drift:
        """The record of a DriftStats: KL divergences and log-ratios carry their unit (kld_mean -> kld_mean_nats)."""
        return cls(**{_with_units(name): value for name, value in stats.to_dict().items()})


def _with_units(name: str) -> str:
    if name.startswith(("kld_", "ln_ppl_ratio")):
        base, sem = (name[:-4], "_sem") if name.endswith("_sem") else (name, "")
        return f"{base}_nats{sem}"
    return name


@dataclass(frozen=True)
class VerifiedModel:
    """The model measured."""

    path: str = described("resolved path")
    sha256: str = described("over the directory's files (names + bytes), or Checkpoint.content_hash")
    kind: str = described("artifact, quantized or checkpoint")
    format: str = described("pte, onnx or eager")
    architecture: str = described("registered architecture (llama, bert)")
    scheme: str = described("fp32, 8da4w, 8da8w, 4w, 8w, ...")
    recipe: str | None = described("the recipe it was quantized with, null for a plain checkpoint")
    max_seq_len: int = described("positions it holds")
    bits_per_weight: float | None = described("bits its block linears store per weight (scales and zero points "
                                              "included), null for fp32 or an artifact exported before this field",
                                              default=None)


@dataclass(frozen=True)
class ReferenceModel:
    """The full-precision reference checkpoint."""

    path: str = described("resolved path")
    format: str = described("checkpoint format")
    sha256: str = described("Checkpoint.content_hash")
    architecture: str = described("registered architecture")


@dataclass(frozen=True)
class EvaluationText:
    """The evaluation text."""

    path: str = described("resolved path")
    sha256: str = described("SHA-256 of the text's bytes")
    documents: int = described("documents in the text")
    documents_evaluated: int = described("documents that reached a window or sentence")
    tokens_sha256: str = described("SHA-256 of the evaluated token ids")


@dataclass(frozen=True)
class DecoderSettings:
    """How a decoder was measured."""

    seq_len_tokens: int = described("tokens per window, each one prefill from position 0")
    windows: int = described("windows evaluated")
    scored_tokens: int = described("windows x (seq_len_tokens - 1)")
    top_k: int = described("reference log-probs kept per token")


@dataclass(frozen=True)
class EncoderSettings:
    """How an encoder was measured."""

    max_length_tokens: int = described("tokens per sentence at most")
    sentences: int = described("sentences embedded")
    neighbours: int = described("k of recall@k")


@dataclass(frozen=True)
class DecoderSamples:
    """The raw figures behind a decoder's summary, per window in order."""

    window_kld_mean_nats: list[float] = described("mean KLD")
    window_ref_nll_mean_nats: list[float] = described("the reference's mean NLL")
    window_test_nll_mean_nats: list[float] = described("the model's mean NLL")
    window_top1_agreement: list[float] = described("top-1 agreement")


@dataclass(frozen=True)
class EncoderSamples:
    """The raw figures behind an encoder's summary."""

    sentence_cosine: list[float] = described("cosine of each sentence's embeddings, in order")


@dataclass(frozen=True)
class EagerSource:
    """A decoder artifact's source quantized checkpoint run eagerly on the same windows."""

    path: str = described("its resolved path")
    sha256: str = described("its content hash (it must match the artifact's record)")
    activation_numerics: str | None = described("the artifact target's numerics, null: the checkpoint's own")
    kld_mean_nats: float = described("its mean KLD against the reference")
    kld_mean_nats_sem: float = described("its standard error")
    top1_agreement: float = described("its top-1 agreement")
    ppl_ratio: float = described("its PPL ratio")
    window_kld_mean_nats: list[float] = described("its mean KLD per window, in order")
    cache_path: str | None = described("where its drift is cached, null: not cached")
    cache_hit: bool = described("read from the cache")


@dataclass(frozen=True)
class ReferenceCache:
    """Where the reference's side came from."""

    path: str | None = described("the cache file, null: not cached")
    hit: bool = described("read from the cache")
    top_k: int | None = described("log-probs kept per token (null for encoders)")
    rest_mass_mean: float | None = described("the reference's mean probability outside its top k: how loose the "
                                             "KLD lower bound can be (null for encoders)")


@dataclass(frozen=True)
class Timing:
    """Seconds each pass took."""

    reference_seconds: float = described("the reference pass, 0 on a cache hit")
    test_seconds: float = described("the model's pass")
    eager_seconds: float | None = described("the eager source's pass (0 on a cache hit), null without one",
                                            default=None)


@dataclass(frozen=True)
class MeasuringDevice:
    """The farm device whose runtime computed the artifact's logits (``verify --farm F --device NAME``)."""

    name: str = described("the device's name in the farm file")
    runner: str = described("its runner (the device's kind): ssh, local, ...")
    labels: dict[str, str] = described("its labels in the farm file")
    versions: dict[str, str | None] = described("package versions there (torch, the runtimes; null: not installed)")
    load_s: float = described("seconds the artifact took to load there")
    provenance: Provenance = described("artifact and worker hashes, the worker's command line, threads, CPU mask, "
                                       "uname and OS build there")


@dataclass(frozen=True, kw_only=True)
class VerifyReport(Record):
    """What `edgeforge verify` measured and decided (`--json FILE`, and `verify` in a forge report)."""

    kind = "edgeforge.verify"
    version = 1

    created: str = described("RFC 3339 UTC timestamp")
    verdict: str = described("pass, fail or ungated (no gate given or recorded; computed from gates)", init=False)
    verdict_line: str = described("the PASS/FAIL/UNGATED line printed last (computed from gates)", init=False)
    artifact: VerifiedModel = described("the model measured")
    reference: ReferenceModel = described("the fp32 reference")
    data: EvaluationText = described("the evaluation text")
    settings: DecoderSettings | EncoderSettings = described("how it was measured")
    drift: Drift | None = described("decoders, else null")
    embedding: EmbeddingStats | None = described("encoders, else null")
    samples: DecoderSamples | EncoderSamples = described("the raw figures behind the summary")
    eager: EagerSource | None = described("decoder artifacts whose source quantized checkpoint is there and "
                                          "unchanged, else null")
    gates: tuple[GateResult, ...] = described("every gate applied, in order")
    gates_source: str | None = described("where recipe gates came from, or null")
    overlap: Overlap = described("evaluation text against calibration text")
    reference_cache: ReferenceCache = described("where the reference's side came from")
    timing: Timing = described("seconds per pass")
    notes: tuple[str, ...] = described("lines printed with the report: lineage mismatches, missing fingerprints",
                                       default=())
    versions: dict[str, str | None] = described("edgeforge, git_commit, python, torch, the runtime, platform")
    device: MeasuringDevice | None = described("where the artifact's logits were computed with --device, else null "
                                               "(this host; versions above are this host's)", default=None)

    def __post_init__(self):
        object.__setattr__(self, "verdict", _verdict(self.gates))
        object.__setattr__(self, "verdict_line", _verdict_line(self.gates))

    def raise_for_gates(self) -> None:
        """GateFailed (exit 1) when a gate failed; call it after the report is printed."""
        if self.verdict == "fail":
            raise GateFailed(f"verify: {self.verdict_line}", path=self.artifact.path)


def _verdict(gates: tuple[GateResult, ...]) -> str:
    if not gates:
        return "ungated"
    return "pass" if all(gate.passed for gate in gates) else "fail"


def _verdict_line(gates: tuple[GateResult, ...]) -> str:
    if not gates:
        return ("UNGATED: no gates given and none recorded for this model "
                "(pass --max-kld/--min-top1/--max-ppl-ratio or --min-cosine)")
    failed = [gate.describe() for gate in gates if not gate.passed]
    if failed:
        return "FAIL: " + "; ".join(failed)
    return "PASS: " + "; ".join(gate.describe() for gate in gates)


def format_verify_report(report: VerifyReport) -> str:
    """The human report: provenance, the statistics block, a reading, notes, and the verdict line last."""
    artifact, reference, settings, data = report.artifact, report.reference, report.settings, report.data
    recipe = f", recipe {artifact.recipe}" if artifact.recipe else ""
    lines = [(f"model      {artifact.path} ({artifact.kind}, {artifact.format}, {artifact.scheme}{recipe}) "
              f"sha256 {artifact.sha256[:12]}"),
             f"reference  {reference.path} ({reference.format}, fp32) sha256 {reference.sha256[:12]}"]
    cache = report.reference_cache
    cached = ("not cached" if cache.path is None else
              f"{'read from' if cache.hit else 'computed, stored in'} {cache.path}")
    if report.drift is not None:
        lines.append(f"data       {data.path}: {settings.windows} windows x {settings.seq_len_tokens} "
                     f"tokens, each one prefill from position 0 ({settings.scored_tokens:,} scored tokens, "
                     f"{data.documents_evaluated} documents)")
        lines.append(f"reference  top-{settings.top_k} log-probs (they leave {cache.rest_mass_mean:.1e} of the "
                     f"probability outside, on average) {cached}")
        lines += ["", *_drift_block(report.drift, settings.top_k), "", reading(report.drift)]
        if artifact.bits_per_weight is not None:
            lines.append(f"size       {artifact.bits_per_weight:.3f} bits per weight over the block linears "
                         f"(scales and zero points included; head and embedding apart), KLD "
                         f"{report.drift.kld_mean_nats:.4f}")
    else:
        lines.append(f"data       {data.path}: {settings.sentences} sentences, at most "
                     f"{settings.max_length_tokens} tokens each ({data.documents_evaluated} documents)")
        lines.append(f"reference  embeddings {cached}")
        lines += ["", *_embedding_block(report.embedding)]
    if report.eager is not None:
        eager = report.eager
        lines.append(f"eager      {eager.path} (its quantized checkpoint) on the same windows: KLD "
                     f"{eager.kld_mean_nats:.6f} ± {eager.kld_mean_nats_sem:.6f}, top-1 "
                     f"{eager.top1_agreement:.1%}, PPL ratio {eager.ppl_ratio:.4f}"
                     f"{' (cached)' if eager.cache_hit else ''}")
    timing = report.timing
    eager_time = f", eager source {timing.eager_seconds:.1f} s" if report.eager is not None else ""
    if report.device is not None:
        device, provenance = report.device, report.device.provenance
        lines.append(f"device     {device.name} ({device.runner}, {provenance.uname.get('machine', '?')}, "
                     f"{provenance.os_build or 'OS unknown'}) computed the model's logits; worker sha256 "
                     f"{provenance.runner_sha256[:12]}")
    lines.append(f"timing     reference {timing.reference_seconds:.1f} s"
                 f"{' (cached)' if cache.hit else ''}, model {timing.test_seconds:.1f} s{eager_time}")
    overlap = report.overlap
    if overlap.method != "none" and (overlap.same_file or overlap.overlapping_documents):
        lines.append(f"overlap    {_overlap_text(overlap)} (allowed by --allow-overlap: the figures are optimistic)")
    lines += [f"note       {note}" for note in report.notes]
    lines += [f"gates      {line}" for line in _gate_sources(report)]
    lines.append(report.verdict_line)
    return "\n".join(lines)


def _gate_sources(report: VerifyReport) -> list[str]:
    """Where each gate's threshold came from, one line per source."""
    lines = []
    for source, where in (("recipe", f"from {report.gates_source}"), ("option", "from the command line")):
        names = [gate.gate for gate in report.gates if gate.source == source]
        if names:
            lines.append(f"{', '.join(names)} {where}")
    lines += [f"{gate.gate} = {gate.basis}" for gate in report.gates if gate.source == "eager"]
    return lines


def _overlap_text(overlap: Overlap) -> str:
    if overlap.same_file:
        return "the evaluation text is the calibration text"
    return (f"{overlap.overlapping_documents} of {overlap.evaluated_documents} evaluated documents were "
            "calibration documents")


def _drift_block(stats: Drift, top_k: int) -> list[str]:
    def pm(value: float, sem: float, scale: float = 1.0, width: int = 10, digits: int = 6) -> str:
        return f"{value * scale:{width}.{digits}f} ± {sem * scale:{width}.{digits}f}"

    return [
        f"====== Perplexity statistics ({stats.token_count:,} tokens) ======",
        f"PPL(test)                  : {pm(stats.ppl_test, stats.ppl_test_sem)}",
        f"PPL(ref)                   : {pm(stats.ppl_ref, stats.ppl_ref_sem)}",
        f"Mean ln(PPL(test)/PPL(ref)): {pm(stats.ln_ppl_ratio_nats, stats.ln_ppl_ratio_nats_sem)}",
        f"PPL(test)/PPL(ref)         : {pm(stats.ppl_ratio, stats.ppl_ratio_sem)}",
        "",
        f"====== KL divergence statistics (nats/token; top-{top_k} + rest, a lower bound) ======",
        f"Mean    KLD: {pm(stats.kld_mean_nats, stats.kld_mean_nats_sem)}",
        f"Maximum KLD: {stats.kld_max_nats:10.6f}",
        f"99.0%   KLD: {stats.kld_p99_nats:10.6f}",
        f"95.0%   KLD: {stats.kld_p95_nats:10.6f}",
        f"90.0%   KLD: {stats.kld_p90_nats:10.6f}",
        f"Median  KLD: {stats.kld_median_nats:10.6f}",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {pm(stats.delta_p_mean, stats.delta_p_mean_sem, 100, 7, 3)} %",
        f"RMS     Δp: {pm(stats.rms_delta_p, stats.rms_delta_p_sem, 100, 7, 3)} %",
        f"Same top p: {pm(stats.top1_agreement, stats.top1_agreement_sem, 100, 7, 3)} %",
    ]


def reading(stats: Drift) -> str:
    """One line saying what the drift figures mean (after llama.cpp's perplexity README)."""
    change = (stats.ppl_ratio - 1) * 100
    sem = stats.ppl_ratio_sem * 100
    if abs(stats.delta_p_mean) <= 2 * stats.delta_p_mean_sem:
        dp = "mean Δp is 0 within its error: the quantization adds noise without a bias against the text"
    elif stats.delta_p_mean < 0:
        dp = "mean Δp is negative: probability moved away from the tokens that follow, the model got worse"
    else:
        dp = "mean Δp is positive: the test model puts more probability on the tokens that follow"
    return (f"reading    perplexity {change:+.2f}% ± {sem:.2f}%, top-1 agrees on {stats.top1_agreement:.1%} of "
            f"tokens; {dp}")


def _embedding_block(stats: EmbeddingStats) -> list[str]:
    return [
        f"====== Embedding statistics ({stats.sentence_count} sentences) ======",
        f"Mean    cosine: {stats.cosine_mean:10.6f} ± {stats.cosine_mean_sem:10.6f}",
        f"Median  cosine: {stats.cosine_median:10.6f}",
        f"1.0%    cosine: {stats.cosine_p1:10.6f}",
        f"Minimum cosine: {stats.cosine_min:10.6f}",
        (f"Recall@{stats.neighbours:<2}     : {stats.recall_at_k * 100:10.3f} ± {stats.recall_at_k_sem * 100:10.3f} %"
         f"  (the reference's {stats.neighbours} nearest sentences that the model also ranks nearest)"),
    ]
