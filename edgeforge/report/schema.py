"""docs/report-schema.md, generated from the stage records' fields: ``python -m edgeforge.report.schema`` writes it
(a test fails when the committed file differs)."""

from __future__ import annotations

from pathlib import Path

SCHEMA_DOC = Path(__file__).resolve().parents[2] / "docs" / "report-schema.md"


def report_schema() -> str:
    """The page: the verify, bench, bench-matrix and forge reports, the quantized checkpoint's and the artifact's
    records, an AI Hub profile, then every nested section."""
    from edgeforge.export.artifact import ArtifactRecord
    from edgeforge.quantize.record import QuantizedCheckpoint
    from edgeforge.records import schema_markdown
    from edgeforge.report.record import ForgeReport
    from edgeforge.runners.aihub import HubProfile
    from edgeforge.verify.bench_record import BenchReport
    from edgeforge.verify.matrix_record import BenchMatrix
    from edgeforge.verify.report import VerifyReport

    return schema_markdown([VerifyReport, BenchReport, BenchMatrix, ForgeReport, QuantizedCheckpoint, ArtifactRecord,
                            HubProfile])


def write_schema(path: Path = SCHEMA_DOC) -> None:
    from edgeforge.fileio import write_text_atomic

    write_text_atomic(path, report_schema())


if __name__ == "__main__":
    write_schema()
