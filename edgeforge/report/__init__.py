"""Reports: one JSON record per forge run (:class:`ForgeReport`, fields in docs/report-schema.md) and a
self-contained HTML page (inline CSS, plots embedded as PNG data URIs) that opens offline."""

from edgeforge.report.html import render_html, write_html
from edgeforge.report.record import ExportStage, ForgeReport, ForgeSource, QuantizeStage, StageTiming, build_report

__all__ = ["ExportStage", "ForgeReport", "ForgeSource", "QuantizeStage", "StageTiming", "build_report",
           "render_html", "write_html"]
