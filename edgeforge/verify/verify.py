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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from edgeforge.errors import ConfigError, InputError
from edgeforge.models import architecture
from edgeforge.models.architecture import DECODER, ENCODER, family_choice
from edgeforge.verify.decoder import measure_decoder
from edgeforge.verify.embedding import MIN_SENTENCES, NEIGHBOURS, embedding_stats, sentences_of
from edgeforge.verify.lineage import Lineage
from edgeforge.verify.measured import Measured, MeasureContext, check_overlap
from edgeforge.verify.models import EAGER, EvalModel, open_for_eval
from edgeforge.verify.reference import CacheKey, cached, default_cache_dir, tokens_sha256
from edgeforge.verify.report import (EncoderSamples, EncoderSettings, EvaluationText, GateResult, ReferenceCache,
                                     ReferenceModel, Timing, VerifiedModel, VerifyReport)

DEFAULT_SENTENCES = 256  # sentences embedded when not given (fewer when the text holds fewer)
ENCODER_BATCH = 32

# gate -> (the Drift/EmbeddingStats field it reads, "<=" for a maximum or ">=" for a minimum). Gates read the mean
# statistics (the point estimate), as the recipe's gates are written.
GATES = {"max_kld": ("kld_mean_nats", "<="), "min_top1": ("top1_agreement", ">="),
         "max_ppl_ratio": ("ppl_ratio", "<="), "min_cosine": ("cosine_mean", ">=")}


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
    device: a farm device (``edgeforge.runners.farm.Device``) whose runtime computes the artifact's logits
        (:mod:`edgeforge.verify.remote`); None: this host.
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
    device: object | None = None

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
    say = progress or (lambda message: None)
    reference = _open_reference(reference_path)
    say(f"opening {model_path} ...")
    if options.device is None:
        model = open_for_eval(model_path)
    else:
        from edgeforge.verify.remote import open_on_device

        model = open_on_device(model_path, options.device, say=say)
    try:
        return _verify_model(model, reference, reference_path, data_path, options, say)
    finally:
        model.close()


def _verify_model(model: EvalModel, reference, reference_path, data_path, options: VerifyOptions, say) -> VerifyReport:
    from edgeforge.quantize.calibration import read_documents

    measure = family_choice(model.architecture, _MEASURE, "verify measurement", path=model.path)
    if model.architecture != reference.architecture:
        raise InputError(f"the model is a {model.architecture} and the reference {reference_path} a "
                         f"{reference.architecture}: nothing to compare", path=model.path)
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
    context = MeasureContext(data_path=Path(data_path), data_sha256=data_sha256, reference_sha256=reference_sha256)
    measured = measure(model, reference, documents, options, cache_dir, say, context)
    stats = measured.drift or measured.embedding
    results = tuple(GateResult(gate=name, statistic=GATES[name][0], op=GATES[name][1], threshold=threshold,
                               value=getattr(stats, GATES[name][0]), source=source)
                    for name, (threshold, source) in gates.items())
    if measured.eager_bound is not None:
        bound = measured.eager_bound
        results += (GateResult(gate="max_kld_eager", statistic="kld_mean_nats", op="<=", threshold=bound.threshold,
                               value=stats.kld_mean_nats, source="eager", basis=bound.describe()),)
    notes += measured.notes
    return VerifyReport(
        artifact=VerifiedModel(**model.describe()),
        reference=ReferenceModel(path=str(Path(reference.path).resolve()), format=reference.format,
                                 sha256=reference_sha256, architecture=reference.architecture),
        data=EvaluationText(path=str(context.data_path.resolve()), sha256=data_sha256, documents=len(documents),
                            documents_evaluated=measured.overlap.evaluated_documents,
                            tokens_sha256=measured.tokens_sha256),
        settings=measured.settings, drift=measured.drift, embedding=measured.embedding, samples=measured.samples,
        eager=measured.eager, gates=results,
        gates_source=model.lineage.gates_source if any(source == "recipe" for _, source in gates.values()) else None,
        overlap=measured.overlap, reference_cache=measured.cache, timing=measured.timing,
        versions=provenance(model.format), device=None if options.device is None else model.session.record,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        notes=tuple(notes))


def _open_reference(path: str | Path):
    from edgeforge.checkpoints import open_checkpoint

    checkpoint = open_checkpoint(path)
    if checkpoint.format == "edgeforge":
        raise ConfigError("the reference must be a full-precision checkpoint, not an edgeforge quantized one "
                          "(pass the checkpoint it was quantized from)", path=path)
    if checkpoint.tokenizer is None:
        raise InputError("the reference has no tokenizer: the evaluation text cannot be tokenized", path=path)
    return checkpoint


def _gate_thresholds(architecture_name: str, options: VerifyOptions, lineage: Lineage) -> dict[str, tuple[float, str]]:
    """gate -> (threshold, "option" | "recipe"); an option overrides the recipe's gate of the same name."""
    applicable = architecture(architecture_name).gates
    for name in GATES:
        if getattr(options, name) is not None and name not in applicable:
            flags = ", ".join("--" + gate.replace("_", "-") for gate in applicable)
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to a {architecture_name} model "
                              f"(its gates: {flags})")
    thresholds = {name: (float(value), "recipe") for name, value in lineage.gates.items() if name in applicable}
    thresholds.update({name: (float(getattr(options, name)), "option") for name in applicable
                       if getattr(options, name) is not None})
    return {name: thresholds[name] for name in GATES if name in thresholds}


def _measure_encoder(model: EvalModel, reference, documents, options: VerifyOptions, cache_dir, say,
                     context: MeasureContext) -> Measured:
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
    return Measured(
        drift=None, embedding=stats, samples=EncoderSamples(sentence_cosine=cosine.tolist()), overlap=overlap,
        tokens_sha256=key.tokens_sha256,
        settings=EncoderSettings(max_length_tokens=max_length, sentences=count, neighbours=stats.neighbours),
        cache=ReferenceCache(path=None if ref.path is None else str(ref.path), hit=ref.hit, top_k=None,
                             rest_mass_mean=None),
        timing=Timing(reference_seconds=round(ref.seconds, 3), test_seconds=round(test_seconds, 3)))


_MEASURE = {DECODER: measure_decoder, ENCODER: _measure_encoder}  # by the architecture's family


def provenance(model_format: str) -> dict:
    """Versions of what produced the figures: edgeforge (+ git commit), Python, torch, the runtime, the CPU."""
    import platform

    from edgeforge import __version__
    from edgeforge.export.artifact import exporter_for
    from edgeforge.provenance import git_commit, package_versions

    out = {"edgeforge": __version__, "git_commit": git_commit(), "python": platform.python_version()}
    runtime = () if model_format == EAGER else (exporter_for(model_format).runtime_package,)
    out.update(package_versions("torch", *runtime))
    out["platform"] = f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip()
    return out
