"""Export: a checkpoint (fp32) or an edgeforge quantized checkpoint -> an artifact for a target.

    from edgeforge.export import export
    artifact = export("llama-int4", "android-arm64-xnnpack", "out/llama.pte.d")

Every export runs the new artifact in its real runtime against the eager model, and where they
disagree its drift from the fp32 model against the eager model's (the miscompile guard, two tiers),
before the directory is renamed into place; a wrong artifact is never written.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from edgeforge import __version__
from edgeforge.checkpoints.tokenizers import tokenizer_policy
from edgeforge.errors import ConfigError, UnsupportedError
from edgeforge.export.artifact import (MANIFEST, Artifact, ArtifactRecord, ArtifactSource, ExportReport, exporter_for,
                                       open_artifact)
from edgeforge.export.guard import check_decoder, check_encoder
from edgeforge.export.source import ExportSource, open_fp32_reference, open_source
from edgeforge.export.targets import Target, list_targets, load_target, supporting_targets
from edgeforge.fileio import atomic_directory, write_json_atomic
from edgeforge.models.architecture import DECODER, ENCODER, family_choice
from edgeforge.quantize.modules import set_activation_numerics
from edgeforge.quantize.scheme import ActivationScheme
from edgeforge.records import decode

__all__ = ["Artifact", "ArtifactRecord", "ExportSource", "Target", "export", "list_targets", "load_target", "open_artifact",
           "open_source"]

SIZE_WARNING_RATIO = 1.25  # artifact bigger than this times what its scheme implies: layers left in fp32?
SIZE_WARNING_BYTES = 1 << 20  # ...and by more than this: graph structure and RoPE tables are not layers


def export(source_path: str | Path, target: str | Target, output_dir: str | Path, *, format: str | None = None,
           max_seq_len: int | None = None, check: bool = True,
           progress: Callable[[str], None] | None = None) -> Artifact:
    """Export ``source_path`` for ``target`` into the artifact directory ``output_dir``."""
    say = progress or (lambda message: None)
    target = load_target(target) if not isinstance(target, Target) else target
    if format is not None and format != target.format:
        raise ConfigError(f"target {target.name} produces {target.format}, not {format}; "
                          f"{format} targets: {', '.join(n for n in list_targets() if load_target(n).format == format)}")
    source = open_source(source_path)
    set_activation_numerics(source.model, target.activation_numerics)  # the guard's oracle computes as the target
    if source.scheme not in target.schemes:
        others = supporting_targets(source.scheme)
        raise ConfigError(f"target {target.name} does not run scheme {source.scheme} (it runs "
                          f"{', '.join(target.schemes)}); "
                          + (f"targets that run {source.scheme}: {', '.join(others)}" if others else
                             f"no bundled target runs {source.scheme}: quantize with another recipe"))
    context = source.config.max_seq_len
    max_seq_len = max_seq_len or min(context, 2048)
    if not 0 < max_seq_len <= context:
        raise ConfigError(f"--max-seq-len {max_seq_len} outside 1..{context} (the model's context)")
    exporter = exporter_for(target.format)
    start = time.perf_counter()
    phase = _PhaseClock(say)
    fp32_source = source.quantized.source.path if source.quantized else None
    with atomic_directory(output_dir, inputs=[source.path, *source.tokenizer_files, fp32_source]) as tmp:
        say(f"exporting {source.path} ({source.scheme}) for {target.name} ...")
        fields = exporter.export(source, target, tmp, max_seq_len=max_seq_len, phase=phase)
        phase("files", "tokenizer, record")
        for file in source.tokenizer_files:
            shutil.copyfile(file, tmp / file.name)
        if (source.path / "calibration.json").is_file():  # verify's overlap check reads it from the artifact
            shutil.copyfile(source.path / "calibration.json", tmp / "calibration.json")
        record = _record(source, target, _export_report(fields, exporter.name), max_seq_len)
        guard = None
        if check and target.runs_here:
            phase("check", "the artifact in its runtime against the eager model")
            session = exporter.open(tmp, record)
            widened = record.report.guard_tolerance  # the exporter's documented tolerance, kept in the record
            tolerance = (widened.min_cosine, widened.min_top1) if widened else None
            fp32_model = (lambda: open_fp32_reference(source)) if source.quantized else None
            check = family_choice(source.architecture, {
                DECODER: lambda: check_decoder(session, source.model, scheme=source.scheme, max_seq_len=max_seq_len,
                                               tolerance=tolerance, fp32_model=fp32_model, tokenizer=source.tokenizer),
                ENCODER: lambda: check_encoder(session, source.model, source.tokenizer, scheme=source.scheme,
                                               tolerance=tolerance)}, "export guard")
            guard = check()
        phase("size", "against what the scheme implies")
        sizes = _size_report(tmp / record.report.model_file, source, target)
        phase.stop()
        report = dataclasses.replace(record.report, **sizes, export_seconds=round(time.perf_counter() - start, 3),
                                     phase_seconds=phase.seconds,
                                     peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        write_json_atomic(tmp / MANIFEST, dataclasses.replace(record, report=report, guard=guard).to_dict())
    return open_artifact(output_dir)


class _PhaseClock:
    """``phase(name, what)`` starts a named phase of an export: says it with the seconds since the export
    began, and adds the time until the next phase (or ``stop()``) to ``seconds[name]``."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.start, self.seconds = say, time.perf_counter(), {}
        self._running: tuple[str, float] | None = None

    def __call__(self, name: str, what: str = "") -> None:
        self.stop()
        self._running = (name, time.perf_counter())
        self.say(f"{self._running[1] - self.start:7.1f} s  {name}" + (f": {what}" if what else ""))

    def stop(self) -> None:
        if self._running is not None:
            name, began = self._running
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - began, 3)
            self._running = None


def _export_report(fields: dict, exporter: str) -> ExportReport:
    """The typed report of an exporter's ``export()`` fields; UnsupportedError on a field the record lacks."""
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ExportReport)})
    if unknown:
        raise UnsupportedError(f"exporter {exporter!r} reports fields the artifact record has no place for: "
                               f"{', '.join(unknown)}")
    return decode(ExportReport, fields, where=f"exporter {exporter!r}'s report")


def _record(source: ExportSource, target: Target, report: ExportReport, max_seq_len: int) -> ArtifactRecord:
    import torch

    quantized = source.quantized
    return ArtifactRecord(
        format=target.format, target=target, architecture=source.architecture, config=source.config.to_dict(),
        scheme=source.scheme, max_seq_len=max_seq_len,
        source=ArtifactSource(str(source.path), source.sha256, quantized.recipe.name if quantized else None,
                              quantized.calibration if quantized else None,
                              quantized.block_bits_per_weight(target.activation_numerics) if quantized else None),
        tokenizer_files=[f.name for f in source.tokenizer_files],
        tokenizer=tokenizer_policy(source.tokenizer),  # runners prepend BOS only where adds_bos
        report=report, versions={"edgeforge": __version__, "torch": torch.__version__, **report.versions},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _size_report(model_file: Path, source: ExportSource, target: Target) -> dict:
    """Artifact size against what the scheme implies (quantized layers at their bit width + scales)."""
    size = sum(f.stat().st_size for f in model_file.parent.iterdir() if f.is_file() and f.suffix in
               {".pte", ".onnx", ".data", ".bin"}) if model_file.suffix == ".onnx" else model_file.stat().st_size
    state, seen = {}, set()
    for name, tensor in source.model.state_dict().items():  # a tied head shares the embedding's storage
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    parameters = sum(t.numel() for name, t in state.items() if not name.endswith(("scale", "zero_point")))
    expected = 0
    for name, tensor in state.items():
        layer, _, buffer = name.rpartition(".")
        if buffer == "qdata":
            quantized = source.quantized.layers[layer]
            expected += target.activation_numerics.stored_bytes(quantized.weight_scheme, tuple(tensor.shape),
                                                                ActivationScheme.from_name(quantized.activations))
        elif buffer in ("scale", "zero_point") and f"{layer}.qdata" in state:
            continue  # the weight's own qparams are in its stored_bytes
        elif name.endswith(("scale", "zero_point")):  # activation qparams
            expected += tensor.numel() * tensor.element_size()
        else:
            expected += tensor.numel() * 4
    report = {"size_bytes": size, "parameters": parameters, "bytes_per_parameter": round(size / parameters, 4),
              "expected_size_bytes": int(expected), "size_ratio_to_expected": round(size / expected, 3)}
    if size > SIZE_WARNING_RATIO * expected and size - expected > SIZE_WARNING_BYTES:
        report["size_warning"] = (f"artifact is {size / expected:.2f}x the size its scheme {source.scheme} implies: "
                                  "some layers may have been left in fp32")
    return report
