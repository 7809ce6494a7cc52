"""The forge report record (:class:`ForgeReport`, kind ``edgeforge.report``): every stage's record under its own
field, plus provenance; ``forge`` writes it as OUT/report.json."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone

from edgeforge import __version__
from edgeforge.export.artifact import ExportReport
from edgeforge.export.guard import GuardResult
from edgeforge.export.targets import Target
from edgeforge.provenance import package_versions
from edgeforge.quantize.record import CalibrationRecord, QuantizedLayer, RecipeRecord
from edgeforge.records import Record, described
from edgeforge.verify.bench_record import BenchReport
from edgeforge.verify.report import VerifyReport


@dataclass(frozen=True)
class ForgeSource:
    """The fp32 checkpoint forge started from."""

    path: str = described("its file or directory")
    format: str = described("its checkpoint format")
    sha256: str = described("Checkpoint.content_hash (over its files)")


@dataclass(frozen=True)
class StageTiming:
    """How long one stage took."""

    seconds: float = described("wall time of the run that made its output")
    reused: bool = described("this run reused it: inputs unchanged")


@dataclass(frozen=True, kw_only=True)
class QuantizeStage:
    """The quantize stage: what its quantized checkpoint's record says of each layer."""

    seconds: float = described("wall time of the quantization")
    algorithm: str = described("the recipe's algorithm")
    layers: dict[str, QuantizedLayer] = described("every quantized layer by module name, in execution order")
    fallbacks: dict[str, str] = described("layers whose scheme was replaced, and why")
    calibration: CalibrationRecord | None = described("calibration text used, null for a data-free recipe")
    plan: dict | None = described("the budget planner's choice and curve (QuantizedCheckpoint.plan), null if none",
                                  default=None)


@dataclass(frozen=True, kw_only=True)
class ExportStage:
    """The export stage: the artifact and its record's report and guard."""

    artifact: str = described("the artifact directory")
    format: str = described("artifact format (pte, onnx)")
    scheme: str = described("linear scheme")
    model_file: str = described("the model file, relative to the artifact")
    report: ExportReport = described("the export report (sizes, ops, time, memory)")
    guard: GuardResult | None = described("the miscompile guard's verdict, null where it could not run here")
    max_seq_len: int = described("positions the exported graph holds")


@dataclass(frozen=True, kw_only=True)
class ForgeReport(Record):
    """One forge run: every stage's record, and provenance (OUT/report.json)."""

    kind = "edgeforge.report"
    version = 1

    created: str = described("RFC 3339 UTC timestamp")
    versions: dict[str, str | None] = described("edgeforge, python, torch, torchao, executorch, onnx, onnxruntime, "
                                                "transformers")
    source: ForgeSource = described("the fp32 checkpoint")
    recipe: RecipeRecord = described("the recipe as applied (Recipe.to_dict)")
    target: Target = described("the target profile (Target.to_dict)")
    stages: dict[str, StageTiming] = described("quantize, export, verify, bench: seconds and whether reused")
    quantize: QuantizeStage | None = described("the quantize stage")
    export: ExportStage | None = described("the export stage")
    verify: VerifyReport | None = described("the `edgeforge verify --json` record of the artifact")
    bench: BenchReport | None = described("the `edgeforge bench --json` record of the artifact and its reference")


def build_report(*, source: ForgeSource, recipe: RecipeRecord, target: Target, stages: dict[str, StageTiming],
                 quantize: QuantizeStage | None, export: ExportStage | None, verify: VerifyReport | None,
                 bench: BenchReport | None) -> ForgeReport:
    """The report of stage records made (or reused) now, stamped with the time and the versions."""
    versions = {"edgeforge": __version__, "python": platform.python_version(),
                **package_versions("torch", "torchao", "executorch", "onnx", "onnxruntime", "transformers")}
    return ForgeReport(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=versions,
                       source=source, recipe=recipe, target=target, stages=stages, quantize=quantize, export=export,
                       verify=verify, bench=bench)
