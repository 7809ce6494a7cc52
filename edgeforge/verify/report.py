"""The verify result: one record (:class:`VerifyReport`), rendered as llama.cpp-style text or as JSON.

JSON record (``edgeforge verify --json FILE``), kind ``edgeforge.verify``, schema_version 1. Fields
are only ever added within a schema version; renaming or removing one bumps it.

    kind, schema_version      "edgeforge.verify", 1
    created                   RFC 3339 UTC timestamp, "2026-01-31T12:00:00Z"
    verdict                   "pass" | "fail" | "ungated" (no gate given or recorded)
    verdict_line              the PASS/FAIL/UNGATED line printed last
    artifact                  {path, sha256, kind: artifact|quantized|checkpoint, format: pte|onnx|eager,
                               architecture: llama|bert, scheme: fp32|8da4w|..., recipe, max_seq_len}
                              sha256: over the directory's files (names + bytes), or Checkpoint.content_hash
    reference                 {path, format, sha256 (Checkpoint.content_hash), architecture}
    data                      {path, sha256 (of the text's bytes), documents (in the text),
                               documents_evaluated (that reached a window/sentence), tokens_sha256}
    settings                  decoders: {seq_len_tokens, windows, scored_tokens, top_k}
                              encoders: {max_length_tokens, sentences, neighbours}
    drift                     decoders, else null. Every *_sem is the standard error of the figure before it.
                              token_count; ppl_ref, ppl_test, ppl_ratio (+ _sem; perplexity, unitless);
                              ln_ppl_ratio_nats (+ _sem); kld_mean_nats (+ _sem), kld_median_nats,
                              kld_p90_nats, kld_p95_nats, kld_p99_nats, kld_max_nats: KL(ref || test) per
                              token, top-k + rest lower bound; top1_agreement (+ _sem, fraction 0..1);
                              delta_p_mean, rms_delta_p (+ _sem; probability 0..1)
    embedding                 encoders, else null: sentence_count; cosine_mean (+ _sem), cosine_median,
                              cosine_p1, cosine_min; neighbours (k); recall_at_k (+ _sem, fraction 0..1)
    samples                   the raw figures behind the summary. decoders: per window, in order:
                              window_kld_mean_nats, window_ref_nll_mean_nats, window_test_nll_mean_nats,
                              window_top1_agreement; encoders: sentence_cosine
    gates                     [{gate: max_kld|min_top1|max_ppl_ratio|min_cosine|max_kld_eager, statistic (a
                               drift/embedding key), op: "<=" | ">=", threshold, value, passed,
                               source: option|recipe|eager, basis (how an eager threshold was derived, else null)}]
    gates_source              where recipe gates came from, or null
    overlap                   {method: fingerprints|file-hash|none, calibration_sha256, evaluated_documents,
                               overlapping_documents (null for file-hash), short_documents (under 8 words,
                               not compared), same_file, allowed, source (the fingerprints file)}
    reference_cache           {path (null: not cached), hit, top_k, rest_mass_mean (the reference's mean
                               probability outside its top k: how loose the KLD lower bound can be; null for encoders)}
    eager                     decoder artifacts whose source quantized checkpoint is there and unchanged, else
                              null: that checkpoint run eagerly on the same windows: {path, sha256 (its content
                              hash), activation_numerics (the artifact target's, null: the checkpoint's own),
                              kld_mean_nats (+ _sem), top1_agreement, ppl_ratio, window_kld_mean_nats (per
                              window, in order), cache_path (null: not cached), cache_hit}
    timing                    {reference_seconds (0 on a cache hit), test_seconds, eager_seconds (0 on a cache
                               hit; only with an eager section)}
    notes                     lines printed with the report: lineage mismatches, missing fingerprints
    versions                  {edgeforge, git_commit, python, torch, onnxruntime, executorch, platform}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgeforge.errors import GateFailed
from edgeforge.verify.drift import DriftStats
from edgeforge.verify.embedding import EmbeddingStats

KIND = "edgeforge.verify"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class GateResult:
    gate: str  # "max_kld"
    statistic: str  # the report key it reads: "kld_mean"
    op: str  # "<=" (a max gate) or ">=" (a min gate)
    threshold: float
    value: float
    source: str  # "option" | "recipe" | "eager" (derived from the eager source's result: decoder.eager_kld_bound)
    basis: str | None = None  # how a derived threshold was computed

    @property
    def passed(self) -> bool:
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

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

    method: str  # "fingerprints" | "file-hash" | "none"
    calibration_sha256: str | None
    evaluated_documents: int
    overlapping_documents: int | None
    short_documents: int  # evaluated documents under verify.MIN_OVERLAP_WORDS words, not compared
    same_file: bool
    allowed: bool
    source: str | None


@dataclass
class VerifyReport:
    artifact: dict
    reference: dict
    data: dict
    settings: dict
    drift: DriftStats | None
    embedding: EmbeddingStats | None
    samples: dict
    eager: dict | None
    gates: tuple[GateResult, ...]
    gates_source: str | None
    overlap: Overlap
    reference_cache: dict
    timing: dict
    versions: dict
    created: str
    notes: tuple[str, ...] = field(default=())

    @property
    def verdict(self) -> str:
        if not self.gates:
            return "ungated"
        return "pass" if all(gate.passed for gate in self.gates) else "fail"

    @property
    def verdict_line(self) -> str:
        if not self.gates:
            return ("UNGATED: no gates given and none recorded for this model "
                    "(pass --max-kld/--min-top1/--max-ppl-ratio or --min-cosine)")
        failed = [gate.describe() for gate in self.gates if not gate.passed]
        if failed:
            return "FAIL: " + "; ".join(failed)
        return "PASS: " + "; ".join(gate.describe() for gate in self.gates)

    def raise_for_gates(self) -> None:
        """GateFailed (exit 1) when a gate failed; call it after the report is printed."""
        if self.verdict == "fail":
            raise GateFailed(f"verify: {self.verdict_line}", path=self.artifact["path"])

    def to_record(self) -> dict:
        """The JSON record (schema in the module docstring)."""
        return {
            "kind": KIND, "schema_version": SCHEMA_VERSION, "created": self.created,
            "verdict": self.verdict, "verdict_line": self.verdict_line,
            "artifact": self.artifact, "reference": self.reference, "data": self.data, "settings": self.settings,
            "drift": None if self.drift is None else {_with_units(k): v for k, v in self.drift.to_dict().items()},
            "embedding": None if self.embedding is None else self.embedding.to_dict(),
            "samples": self.samples, "eager": self.eager,
            "gates": [{**asdict(gate), "passed": gate.passed} for gate in self.gates],
            "gates_source": self.gates_source, "overlap": asdict(self.overlap),
            "reference_cache": self.reference_cache, "timing": self.timing, "notes": list(self.notes),
            "versions": self.versions,
        }


def _with_units(name: str) -> str:
    """DriftStats field -> record key: KL divergences and log-ratios are in nats (kld_mean -> kld_mean_nats)."""
    if name.startswith(("kld_", "ln_ppl_ratio")):
        base, sem = (name[:-4], "_sem") if name.endswith("_sem") else (name, "")
        return f"{base}_nats{sem}"
    return name


def format_verify_report(report: VerifyReport) -> str:
    """The human report: provenance, the statistics block, a reading, notes, and the verdict line last."""
    artifact, reference, settings = report.artifact, report.reference, report.settings
    recipe = f", recipe {artifact['recipe']}" if artifact.get("recipe") else ""
    lines = [(f"model      {artifact['path']} ({artifact['kind']}, {artifact['format']}, {artifact['scheme']}{recipe}) "
              f"sha256 {artifact['sha256'][:12]}"),
             f"reference  {reference['path']} ({reference['format']}, fp32) sha256 {reference['sha256'][:12]}"]
    cache = report.reference_cache
    cached = ("not cached" if cache["path"] is None else
              f"{'read from' if cache['hit'] else 'computed, stored in'} {cache['path']}")
    if report.drift is not None:
        lines.append(f"data       {report.data['path']}: {settings['windows']} windows x {settings['seq_len_tokens']} "
                     f"tokens, each one prefill from position 0 ({settings['scored_tokens']:,} scored tokens, "
                     f"{report.data['documents_evaluated']} documents)")
        lines.append(f"reference  top-{settings['top_k']} log-probs (they leave {cache['rest_mass_mean']:.1e} of the "
                     f"probability outside, on average) {cached}")
        lines += ["", *_drift_block(report.drift, settings["top_k"]), "", reading(report.drift)]
    else:
        lines.append(f"data       {report.data['path']}: {settings['sentences']} sentences, at most "
                     f"{settings['max_length_tokens']} tokens each ({report.data['documents_evaluated']} documents)")
        lines.append(f"reference  embeddings {cached}")
        lines += ["", *_embedding_block(report.embedding)]
    if report.eager is not None:
        eager = report.eager
        lines.append(f"eager      {eager['path']} (its quantized checkpoint) on the same windows: KLD "
                     f"{eager['kld_mean_nats']:.6f} ± {eager['kld_mean_nats_sem']:.6f}, top-1 "
                     f"{eager['top1_agreement']:.1%}, PPL ratio {eager['ppl_ratio']:.4f}"
                     f"{' (cached)' if eager['cache_hit'] else ''}")
    eager_time = (f", eager source {report.timing['eager_seconds']:.1f} s" if report.eager is not None else "")
    lines.append(f"timing     reference {report.timing['reference_seconds']:.1f} s"
                 f"{' (cached)' if cache['hit'] else ''}, model {report.timing['test_seconds']:.1f} s{eager_time}")
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


def _drift_block(stats: DriftStats, top_k: int) -> list[str]:
    def pm(value: float, sem: float, scale: float = 1.0, width: int = 10, digits: int = 6) -> str:
        return f"{value * scale:{width}.{digits}f} ± {sem * scale:{width}.{digits}f}"

    return [
        f"====== Perplexity statistics ({stats.token_count:,} tokens) ======",
        f"PPL(test)                  : {pm(stats.ppl_test, stats.ppl_test_sem)}",
        f"PPL(ref)                   : {pm(stats.ppl_ref, stats.ppl_ref_sem)}",
        f"Mean ln(PPL(test)/PPL(ref)): {pm(stats.ln_ppl_ratio, stats.ln_ppl_ratio_sem)}",
        f"PPL(test)/PPL(ref)         : {pm(stats.ppl_ratio, stats.ppl_ratio_sem)}",
        "",
        f"====== KL divergence statistics (nats/token; top-{top_k} + rest, a lower bound) ======",
        f"Mean    KLD: {pm(stats.kld_mean, stats.kld_mean_sem)}",
        f"Maximum KLD: {stats.kld_max:10.6f}",
        f"99.0%   KLD: {stats.kld_p99:10.6f}",
        f"95.0%   KLD: {stats.kld_p95:10.6f}",
        f"90.0%   KLD: {stats.kld_p90:10.6f}",
        f"Median  KLD: {stats.kld_median:10.6f}",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {pm(stats.delta_p_mean, stats.delta_p_mean_sem, 100, 7, 3)} %",
        f"RMS     Δp: {pm(stats.rms_delta_p, stats.rms_delta_p_sem, 100, 7, 3)} %",
        f"Same top p: {pm(stats.top1_agreement, stats.top1_agreement_sem, 100, 7, 3)} %",
    ]


def reading(stats: DriftStats) -> str:
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
