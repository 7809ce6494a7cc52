"""Exported artifacts and the exporter registry.

An artifact is a directory: the model file(s) for one runtime, the tokenizer files, and
``edgeforge.json``, its :class:`ArtifactRecord` (kind ``edgeforge.artifact``): what made it, from what,
the export report and the guard's verdict.
A format is added by a class with the :class:`Exporter` methods and an entry point naming it in the group
``edgeforge.exporters`` (edgeforge's own ``pte`` and ``onnx`` are declared in its ``pyproject.toml``);
nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from edgeforge.checkpoints.tokenizers import TokenizerPolicy
from edgeforge.errors import InputError, UnsupportedError
from edgeforge.export.guard import GuardResult
from edgeforge.export.targets import Target
from edgeforge.fileio import read_json
from edgeforge.quantize.record import CalibrationRecord, model_config
from edgeforge.records import Record, described
from edgeforge.registry import Registry

MANIFEST = "edgeforge.json"


@dataclass(frozen=True)
class ArtifactSource:
    """The checkpoint an artifact was exported from."""

    path: str = described("the checkpoint (quantized or fp32) exported")
    sha256: str = described("its content hash at export")
    recipe: str | None = described("its recipe's name, None for an fp32 checkpoint", default=None)
    calibration: CalibrationRecord | None = described("its calibration, None where it had none", default=None)
    bits_per_weight: float | None = described("bits its block linears store per weight, scales and zero points "
                                              "included; None for an fp32 checkpoint", default=None)


@dataclass(frozen=True)
class GuardTolerance:
    """An exporter's documented widening of the guard's tolerance, and why."""

    min_cosine: float = described("minimum cosine between artifact and eager outputs")
    min_top1: float = described("minimum top-1 agreement")
    reason: str = described("why the runtime differs from the eager model by design")


@dataclass(frozen=True, kw_only=True)
class ExportReport:
    """What an export produced: the exporter's fields (None where a format has no such thing), then sizes
    against what the scheme implies, and time and memory."""

    model_file: str = described("the model file, relative to the artifact directory")
    delegated_ops: int | None = described("kernels the delegate (or execution provider) runs", default=None)
    total_ops: int | None = described("kernels in the program", default=None)
    external_data: str | None = described("ONNX external-data file, None when inline", default=None)
    opset: dict[str, int] | None = described("ONNX opset per domain", default=None)
    op_types: dict[str, int] | None = described("ONNX op type -> count", default=None)
    ops_outside_delegate: dict[str, int] | None = described("op name -> count of kernels outside the delegate",
                                                            default=None)
    delegated_parameter_share: float | None = described("share of parameters the delegate reads", default=None)
    planned_memory_bytes: int | None = described("ExecuTorch's planned activation and KV-cache memory", default=None)
    runner_metadata: dict[str, Any] | None = described("constant methods ExecuTorch's LLM runner reads", default=None)
    runner_tokenizer: str | None = described("tokenizer file to hand ExecuTorch's LLM runner", default=None)
    guard_tolerance: GuardTolerance | None = described("the exporter's widened guard tolerance", default=None)
    genai: dict[str, Any] | None = described("onnxruntime-genai files: config and tokenizer", default=None)
    check_provider: str | None = described("onnxruntime provider the guard ran on", default=None)
    versions: dict[str, str] = described("the runtime packages' versions", default_factory=dict)
    size_bytes: int | None = described("bytes of the model file(s)", default=None)
    parameters: int | None = described("parameters of the exported model", default=None)
    bytes_per_parameter: float | None = described("size_bytes / parameters", default=None)
    expected_size_bytes: int | None = described("size the scheme implies (quantized layers at their bit width)",
                                                default=None)
    size_ratio_to_expected: float | None = described("size_bytes / expected_size_bytes", default=None)
    size_warning: str | None = described("set when the artifact is far bigger than its scheme implies", default=None)
    export_seconds: float | None = described("wall time of the export", default=None)
    phase_seconds: dict[str, float] = described("seconds per export phase", default_factory=dict)
    peak_rss_bytes: int | None = described("peak resident memory of the exporting process", default=None)


@dataclass(frozen=True, kw_only=True)
class ArtifactRecord(Record):
    """An artifact directory's ``edgeforge.json``."""

    kind = "edgeforge.artifact"
    version = 1

    format: str = described("artifact format: a registered exporter (pte, onnx)")
    target: Target = described("the target profile it was exported for")
    architecture: str = described("model family (llama, bert)")
    config: dict = described("the model config (to_dict)")
    scheme: str = described("linear scheme: fp32, 8da4w, 8da8w, 4w, 8w, w8a8-static")
    max_seq_len: int = described("positions the exported graph holds")
    source: ArtifactSource = described("the checkpoint it was exported from")
    tokenizer_files: list[str] = described("tokenizer files copied beside the model")
    tokenizer: TokenizerPolicy | None = described("the tokenizer's BOS/EOS policy (runners prepend BOS where "
                                                  "adds_bos)", default=None)
    report: ExportReport = described("the export report")
    versions: dict[str, str] = described("versions of edgeforge, torch and the runtime", default_factory=dict)
    created: str = described("RFC 3339 UTC time of the export")
    guard: GuardResult | None = described("the miscompile guard's verdict, None where it could not run here",
                                          default=None)

    def model_config(self):
        """The model config object (LlamaConfig or BertConfig)."""
        return model_config(self.architecture, self.config)


class Session(Protocol):
    """A loaded artifact in its runtime.

    Decoders: ``forward(tokens [1, S] int64, input_pos [S] int64) -> logits [1, S, vocab]`` through the
    artifact's KV cache (positions must continue the ones already fed; start again at 0 to reset).
    Encoders: ``embed(input_ids, attention_mask, token_type_ids) -> [B, dim]``.
    """

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor: ...


class Exporter(Protocol):
    name: str  # the target format it produces: "pte", "onnx"
    runtime_package: str  # the distribution its sessions run in, whose version reports record: "executorch"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int, phase: Callable[[str, str], None]) -> dict:
        """Write the model file(s) into ``out_dir`` (a fresh temporary directory), calling ``phase(name, what)``
        as each long step starts (export() prints it with the elapsed time); return report fields:
        at least ``model_file`` (relative name), and where known ``delegated_ops``, ``total_ops``,
        ``ops_outside_delegate`` (op name -> count), ``delegated_parameter_share``."""

    def open(self, artifact_dir: Path, record: ArtifactRecord) -> Session:
        """Load the artifact in its real runtime."""

    def prepare_runtime(self, threads: int) -> str:
        """Import the runtime open() needs (seconds: bench times it apart from loading) and size its thread
        pool to ``threads`` where the runtime has its own; return how its threads were set, for the report."""


def no_phase(name: str, what: str = "") -> None:
    """The ``phase`` callback of a caller that does not follow an export's progress."""


# Artifact format -> exporter; loading one imports only its own module (asking for onnx never imports ExecuTorch).
EXPORTERS: Registry[Exporter] = Registry("exporters", "artifact format", make=lambda exporter_class: exporter_class())


def exporter_for(format: str) -> Exporter:
    """The exporter of ``format``; UnknownNameError lists the known formats."""
    return EXPORTERS.get(format)


@dataclass
class Artifact:
    path: Path
    record: ArtifactRecord

    @property
    def format(self) -> str:
        return self.record.format

    @property
    def model_file(self) -> Path:
        return self.path / self.record.report.model_file

    def open(self) -> Session:
        target = self.record.target
        if not target.runs_here:
            raise UnsupportedError(f"artifacts for target {target.name} cannot run here: {target.latency}",
                                   path=self.path)
        return exporter_for(self.format).open(self.path, self.record)


def open_artifact(path: str | Path) -> Artifact:
    """An exported artifact directory and its record; InputError naming the file on another kind or a newer
    schema version."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.exists():
        raise InputError(f"not an edgeforge artifact (no {MANIFEST})", path=path)
    return Artifact(path, ArtifactRecord.from_dict(read_json(manifest), path=manifest))
