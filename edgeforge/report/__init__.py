"""Reports: one JSON record per forge run (stable field names, see docs/report-schema.md) and a
self-contained HTML page (inline CSS, plots embedded as PNG data URIs) that opens offline."""

from edgeforge.report.html import render_html, write_html
from edgeforge.report.record import REPORT_KIND, REPORT_SCHEMA_VERSION, build_report

__all__ = ["REPORT_KIND", "REPORT_SCHEMA_VERSION", "build_report", "render_html", "write_html"]
