"""verify: run a model where it ships and measure its drift from the fp32 reference on real text.

    from edgeforge.verify.verify import VerifyOptions, verify
    report = verify("llama-int4.pte.d", "Llama-3.2-1B", "wiki.test.raw", VerifyOptions(max_kld=0.05))
    print(format_verify_report(report)); report.raise_for_gates()

Inputs: the model (an exported artifact, run in its runtime; an edgeforge quantized checkpoint or a
plain checkpoint, run eagerly), the full-precision reference checkpoint, and evaluation text
(documents separated by blank lines, a .jsonl with a 'text' field, or a folder of .txt).
Output: a :class:`~edgeforge.verify.report.VerifyReport`.

Decoders: each document is encoded with BOS by the reference's tokenizer, the documents are
concatenated and cut into non-overlapping windows of ``seq_len`` tokens, and each window is fed as one
prefill from position 0, to the model and to the reference; the statistics are llama.cpp's
``--kl-divergence`` set (:mod:`edgeforge.verify.drift`). The reference side comes from the cache
(:mod:`edgeforge.verify.reference`) when the same reference, text and windows were verified before.
Encoders: the text's non-empty lines are embedded by both (:mod:`edgeforge.verify.embedding`).

Before anything runs, the evaluated documents are compared with the model's calibration documents;
overlap is refused (InputError, exit 2) unless allowed, since it flatters the quantized model.

Gates (docs/gates.md): the recipe's ``[gates]`` (bounds any sane quantization of its scheme family
meets on any model), each replaced by its option when given; and, for a decoder artifact whose
source quantized checkpoint is still where its manifest says and unchanged, ``max_kld_eager``:
that checkpoint runs eagerly on the same windows (cached like the reference) and the artifact's
mean KLD may exceed the eager one only by a relative slack plus a few paired standard errors
(:func:`eager_kld_bound`), so "the artifact computes what was quantized" is checked on every model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from edgeforge.errors import ConfigError, InputError, UnsupportedError
from edgeforge.verify.drift import DriftStats, TokenStats, summarize_drift, token_windows
from edgeforge.verify.embedding import MIN_SENTENCES, NEIGHBOURS, EmbeddingStats, embedding_stats, sentences_of
from edgeforge.verify.models import EvalModel, Lineage, open_for_eval
from edgeforge.verify.reference import (
    DEFAULT_TOP_K,
    CacheKey,
    cached,
    decoder_reference,
    default_cache_dir,
    tokens_sha256,
    topk_token_stats,
)
from edgeforge.verify.report import GateResult, Overlap, VerifyReport

DEFAULT_SEQ_LEN = 512  # tokens per window (llama.cpp's default context), capped by the model's context
DEFAULT_WINDOWS = 32  # windows evaluated when not given (fewer when the text holds fewer)
DEFAULT_SENTENCES = 256  # sentences embedded when not given (fewer when the text holds fewer)
ENCODER_BATCH = 32
LOGITS_BUDGET = 1 << 27  # logits values per batch of windows (512 MiB of float32)
MIN_OVERLAP_WORDS = 8  # shorter documents are too generic to count as calibration overlap

# gate -> (statistic it reads, "<=" for a maximum or ">=" for a minimum). Gates read the mean
# statistics (the point estimate), as the recipe's gates are written.
GATES = {"max_kld": ("kld_mean", "<="), "min_top1": ("top1_agreement", ">="),
         "max_ppl_ratio": ("ppl_ratio", "<="), "min_cosine": ("cosine_mean", ">=")}
APPLICABLE_GATES = {"llama": ("max_kld", "min_top1", "max_ppl_ratio"), "bert": ("min_cosine",)}
# max_kld_eager = eager KLD x (1 + EAGER_KLD_SLACK) + EAGER_KLD_SEMS x the paired standard error of
# (artifact - eager) window KLDs. The slack is what a runtime may add legitimately (XNNPACK's bf16 group
# scales, other int8 rounding of the activations: measured up to ~1% of the eager KLD, docs/gates.md);
# 3 standard errors keep a normal artifact's false-fail rate near 0.1% whatever the window count.
EAGER_KLD_SLACK = 0.05
EAGER_KLD_SEMS = 3.0
EAGER_DRIFT = ("kld", "test_nll", "same_top1", "delta_p")  # TokenStats fields cached for the eager source


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify. None means "the default" named beside each field.

    seq_len: decoders: tokens per window (min(512, the model's and the reference's context));
        encoders: tokens per sentence (the reference's max_seq_len).
    windows: decoders: windows evaluated (32, or all the text holds if fewer).
    sentences: encoders: sentences embedded (256, or all the text holds if fewer).
    top_k: decoders: reference log-probs kept per token in the cache (128; see reference.DEFAULT_TOP_K).
    cache_dir: reference cache folder ($EDGEFORGE_CACHE/reference or ~/.cache/edgeforge/reference);
        use_cache False computes the reference without reading or writing the cache.
    allow_overlap: measure even when the evaluation text overlaps the calibration text.
    max_kld, min_top1, max_ppl_ratio, min_cosine: gates; each overrides the recipe's gate of that name.
    eager: decoder artifacts: also run the source quantized checkpoint eagerly and gate on max_kld_eager.
    """

    seq_len: int | None = None
    windows: int | None = None
    sentences: int | None = None
    top_k: int | None = None
    cache_dir: str | Path | None = None
    use_cache: bool = True
    allow_overlap: bool = False
    max_kld: float | None = None
    min_top1: float | None = None
    max_ppl_ratio: float | None = None
    min_cosine: float | None = None
    eager: bool = True

    def __post_init__(self):
        for name in ("windows", "sentences", "top_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 2):
            raise ConfigError(f"seq_len must be an integer of at least 2, got {self.seq_len!r}")
        for name in GATES:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")


def verify(model_path: str | Path, reference_path: str | Path, data_path: str | Path,
           options: VerifyOptions = VerifyOptions(), *, progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Measure the model at ``model_path`` against the reference checkpoint on the text at ``data_path``."""
    from edgeforge.quantize.calibration import read_documents

    say = progress or (lambda message: None)
    reference = _open_reference(reference_path)
    say(f"opening {model_path} ...")
    model = open_for_eval(model_path)
    if model.architecture not in _MEASURE:
        raise UnsupportedError(f"verify has no measure for a {model.architecture} model "
                               f"(it measures {', '.join(_MEASURE)})", path=model_path)
    if model.architecture != reference.architecture:
        raise InputError(f"the model is a {model.architecture} and the reference {reference_path} a "
                         f"{reference.architecture}: nothing to compare", path=model_path)
    gates = _gate_thresholds(model.architecture, options, model.lineage)
    documents, data_sha256 = read_documents(data_path)
    reference_sha256 = reference.content_hash()
    notes = list(model.lineage.notes)
    if model.lineage.source_sha256 is not None and model.lineage.source_sha256 != reference_sha256:
        notes.append(f"the reference (sha256 {reference_sha256[:12]}) is not the checkpoint this model was made from "
                     f"(sha256 {model.lineage.source_sha256[:12]})")
    cache_dir = None
    if options.use_cache:
        cache_dir = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    context = _Context(data_path=Path(data_path), data_sha256=data_sha256, reference_sha256=reference_sha256)
    measured = _MEASURE[model.architecture](model, reference, documents, options, cache_dir, say, context)
    stats = measured.drift or measured.embedding
    results = tuple(GateResult(gate=name, statistic=GATES[name][0], op=GATES[name][1], threshold=threshold,
                               value=getattr(stats, GATES[name][0]), source=source)
                    for name, (threshold, source) in gates.items())
    if measured.eager_bound is not None:
        bound = measured.eager_bound
        results += (GateResult(gate="max_kld_eager", statistic="kld_mean", op="<=", threshold=bound.threshold,
                               value=stats.kld_mean, source="eager", basis=bound.describe()),)
    notes += measured.notes
    return VerifyReport(
        artifact=model.describe(),
        reference={"path": str(Path(reference.path).resolve()), "format": reference.format, "sha256": reference_sha256,
                   "architecture": reference.architecture},
        data={"path": str(context.data_path.resolve()), "sha256": data_sha256, "documents": len(documents),
              "documents_evaluated": measured.overlap.evaluated_documents, "tokens_sha256": measured.tokens_sha256},
        settings=measured.settings, drift=measured.drift, embedding=measured.embedding, samples=measured.samples,
        eager=measured.eager, gates=results,
        gates_source=model.lineage.gates_source if any(source == "recipe" for _, source in gates.values()) else None,
        overlap=measured.overlap, reference_cache=measured.cache, timing=measured.timing,
        versions=provenance(model.format), created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        notes=tuple(notes))


@dataclass(frozen=True)
class _Context:
    data_path: Path
    data_sha256: str
    reference_sha256: str


@dataclass(frozen=True)
class _Measured:
    """What one architecture's measurement hands back to :func:`verify` (record sections as in report.py)."""

    drift: DriftStats | None
    embedding: EmbeddingStats | None
    samples: dict
    overlap: Overlap
    tokens_sha256: str
    settings: dict
    cache: dict
    timing: dict
    eager: dict | None = None
    eager_bound: EagerBound | None = None
    notes: tuple[str, ...] = ()


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


def _open_reference(path: str | Path):
    import edgeforge.quantize  # noqa: F401  (registers the quantized-checkpoint format, to name it below)
    from edgeforge.checkpoints import open_checkpoint

    checkpoint = open_checkpoint(path)
    if checkpoint.format == "edgeforge":
        raise ConfigError("the reference must be a full-precision checkpoint, not an edgeforge quantized one "
                          "(pass the checkpoint it was quantized from)", path=path)
    if checkpoint.tokenizer is None:
        raise InputError("the reference has no tokenizer: the evaluation text cannot be tokenized", path=path)
    return checkpoint


def _gate_thresholds(architecture: str, options: VerifyOptions, lineage: Lineage) -> dict[str, tuple[float, str]]:
    """gate -> (threshold, "option" | "recipe"); an option overrides the recipe's gate of the same name."""
    applicable = APPLICABLE_GATES[architecture]
    for name in GATES:
        if getattr(options, name) is not None and name not in applicable:
            flags = ", ".join("--" + gate.replace("_", "-") for gate in applicable)
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to a {architecture} model "
                              f"(its gates: {flags})")
    thresholds = {name: (float(value), "recipe") for name, value in lineage.gates.items() if name in applicable}
    thresholds.update({name: (float(getattr(options, name)), "option") for name in applicable
                       if getattr(options, name) is not None})
    return {name: thresholds[name] for name in GATES if name in thresholds}


def check_overlap(lineage: Lineage, evaluated: list[str], data_sha256: str, *, allow: bool,
                  data_path) -> Overlap:
    """Compare the evaluated documents with the calibration documents; InputError unless ``allow``.

    Documents of fewer than MIN_OVERLAP_WORDS words ("The end.", a section heading) recur across any
    corpus and identify nothing, so they are not compared; the record counts them.
    """
    from edgeforge.quantize.calibration import document_fingerprint

    if not lineage.calibrated:
        return Overlap("none", None, len(evaluated), None, 0, False, allow, None)
    same_file = data_sha256 == lineage.calibration_sha256
    compared = [d for d in evaluated if len(d.split()) >= MIN_OVERLAP_WORDS]
    overlapping = None
    if lineage.calibration_fingerprints is not None:
        overlapping = sum(document_fingerprint(d) in lineage.calibration_fingerprints for d in compared)
    overlap = Overlap("fingerprints" if overlapping is not None else "file-hash", lineage.calibration_sha256,
                      len(evaluated), overlapping, len(evaluated) - len(compared), same_file, allow,
                      lineage.fingerprints_source)
    if (same_file or overlapping) and not allow:
        found = ("it is the calibration text" if same_file else
                 f"{overlapping} of {len(evaluated)} evaluated documents were calibration documents "
                 f"({lineage.fingerprints_source})")
        raise InputError(f"evaluation text overlaps the model's calibration text: {found}; evaluate on held-out "
                         "text, or pass --allow-overlap to measure anyway", path=data_path)
    return overlap


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


def _measure_decoder(model: EvalModel, reference, documents, options: VerifyOptions, cache_dir, say,
                     context: _Context) -> _Measured:
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
    eager, eager_bound, notes, timing = None, None, (), {}
    if options.eager and model.kind == "artifact":
        eager_parts, eager, notes, eager_seconds = _eager_source_stats(model, windows, ref.tensors, key, cache_dir,
                                                                      vocab, batch_size, say)
        if eager_parts is not None:
            eager_bound = eager_kld_bound([float(p.kld.mean()) for p in eager_parts],
                                          [float(p.kld.mean()) for p in parts])
            timing = {"eager_seconds": round(eager_seconds, 3)}
    kept = ref.tensors["topk_ids"].shape[-1]  # top_k, or the vocabulary when that is smaller
    rest_mass = float(ref.tensors["rest_logprob"].exp().mean())
    samples = {"window_kld_mean_nats": [float(p.kld.mean()) for p in parts],
               "window_ref_nll_mean_nats": [float(p.ref_nll.mean()) for p in parts],
               "window_test_nll_mean_nats": [float(p.test_nll.mean()) for p in parts],
               "window_top1_agreement": [float(p.same_top1.double().mean()) for p in parts]}
    return _Measured(
        drift=summarize_drift(parts), embedding=None, samples=samples, overlap=overlap,
        tokens_sha256=key.tokens_sha256,
        settings={"seq_len_tokens": seq_len, "windows": windows.shape[0],
                  "scored_tokens": windows.shape[0] * (seq_len - 1), "top_k": kept},
        cache={"path": None if ref.path is None else str(ref.path), "hit": ref.hit, "top_k": kept,
               "rest_mass_mean": rest_mass},
        timing={"reference_seconds": round(ref.seconds, 3), "test_seconds": round(test_seconds, 3), **timing},
        eager=eager, eager_bound=eager_bound, notes=notes)


def _window_stats(model: EvalModel, windows: torch.Tensor, reference: dict, vocab: int, batch_size: int, say,
                  role: str) -> list[TokenStats]:
    """Per-window drift of ``model`` against the cached reference tensors (eager models take batches)."""
    parts = []
    step = batch_size if model.eager else 1
    for first in range(0, windows.shape[0], step):
        logits = model.window_logits(windows[first:first + step])
        if logits.shape[-1] != vocab:
            raise InputError(f"the model's vocabulary ({logits.shape[-1]}) is not the reference's ({vocab})",
                             path=model.path)
        parts += [topk_token_stats(reference, first + row, logits[row]) for row in range(logits.shape[0])]
        _say_progress(say, role, first + logits.shape[0], windows.shape[0])
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

            set_activation_numerics(eager.runtime, ActivationNumerics.from_name(numerics))
        parts = _window_stats(eager, windows, reference, vocab, batch_size, say, "eager source")
        return {name: torch.stack([getattr(p, name) for p in parts]) for name in EAGER_DRIFT}

    drift = cached(replace(key, kind="decoder-eager-drift", model=f"{sha256} {numerics or 'recorded'}"), cache_dir,
                   compute, say=say, role="eager source")
    parts = [TokenStats(ref_nll=reference["ref_nll"][row], **{name: drift.tensors[name][row] for name in EAGER_DRIFT})
             for row in range(windows.shape[0])]
    stats = summarize_drift(parts)
    section = {"path": str(Path(source).resolve()), "sha256": sha256, "activation_numerics": numerics,
               "kld_mean_nats": stats.kld_mean,
               "kld_mean_nats_sem": stats.kld_mean_sem, "top1_agreement": stats.top1_agreement,
               "ppl_ratio": stats.ppl_ratio, "window_kld_mean_nats": [float(p.kld.mean()) for p in parts],
               "cache_path": None if drift.path is None else str(drift.path), "cache_hit": drift.hit}
    return parts, section, (), drift.seconds


def _measure_encoder(model: EvalModel, reference, documents, options: VerifyOptions, cache_dir, say,
                     context: _Context) -> _Measured:
    for name in ("windows", "top_k"):
        if getattr(options, name) is not None:
            raise ConfigError(f"--{name.replace('_', '-')} applies to decoders; an encoder is verified on --sentences")
    sentences, owners = sentences_of(documents)
    count = options.sentences if options.sentences is not None else min(DEFAULT_SENTENCES, len(sentences))
    if count > len(sentences) or count < MIN_SENTENCES:
        raise InputError(f"asked for {count} sentences; the text holds {len(sentences)} non-empty lines "
                         f"(at least {MIN_SENTENCES} needed)", path=context.data_path)
    limit = min(model.max_seq_len, reference.config.max_seq_len)
    max_length = options.seq_len or limit
    if max_length > limit:
        raise ConfigError(f"--seq-len {max_length} exceeds the model's max_seq_len {model.max_seq_len} or the "
                          f"reference's {reference.config.max_seq_len}")
    chosen = sentences[:count]
    batches = [reference.tokenizer.encode_batch(chosen[i:i + ENCODER_BATCH], max_length)
               for i in range(0, count, ENCODER_BATCH)]
    used = sorted(set(owners[:count]))
    overlap = check_overlap(model.lineage, [documents[i] for i in used], context.data_sha256,
                            allow=options.allow_overlap, data_path=context.data_path)
    key = CacheKey("encoder-embeddings", context.reference_sha256, context.data_sha256,
                   tokens_sha256(*(b[0] for b in batches)), max_length, count)

    def compute():
        from edgeforge.checkpoints import load_model

        say(f"reference: loading {reference.path} (fp32) ...")
        encoder = load_model(reference)
        with torch.inference_mode():
            return {"embeddings": torch.cat([encoder(*batch) for batch in batches]).float()}

    ref = cached(key, cache_dir, compute, say=say)
    start = time.perf_counter()
    test = torch.cat([model.embed(*batch) for batch in batches]).float()
    test_seconds = time.perf_counter() - start
    stats, cosine = embedding_stats(ref.tensors["embeddings"], test, neighbours=NEIGHBOURS)
    return _Measured(
        drift=None, embedding=stats, samples={"sentence_cosine": cosine.tolist()}, overlap=overlap,
        tokens_sha256=key.tokens_sha256,
        settings={"max_length_tokens": max_length, "sentences": count, "neighbours": stats.neighbours},
        cache={"path": None if ref.path is None else str(ref.path), "hit": ref.hit, "top_k": None,
               "rest_mass_mean": None},
        timing={"reference_seconds": round(ref.seconds, 3), "test_seconds": round(test_seconds, 3)})


_MEASURE = {"llama": _measure_decoder, "bert": _measure_encoder}


def _say_progress(say, role: str, done: int, total: int) -> None:
    """About eight progress lines per pass, whatever the number of windows."""
    if done == total or done * 8 // total != (done - 1) * 8 // total:
        say(f"{role}: {done}/{total} windows")


def provenance(model_format: str) -> dict:
    """Versions of what produced the figures: edgeforge (+ git commit), Python, torch, the runtime, the CPU."""
    import platform
    import subprocess
    from importlib import metadata

    from edgeforge import __version__

    out = {"edgeforge": __version__, "git_commit": None, "python": platform.python_version()}
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5, check=False)
        out["git_commit"] = (result.stdout.strip() or None) if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    runtimes = {"pte": "executorch", "onnx": "onnxruntime"}
    for package in ("torch", runtimes.get(model_format)):
        if package:
            try:
                out[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                out[package] = None
    out["platform"] = f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip()
    return out
