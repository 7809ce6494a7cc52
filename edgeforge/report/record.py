"""The forge report record: every stage's record under its own key, plus provenance."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata

from edgeforge import __version__

REPORT_KIND = "edgeforge.report"
REPORT_SCHEMA_VERSION = 1


def _versions() -> dict:
    out = {"edgeforge": __version__, "python": platform.python_version()}
    for package in ("torch", "torchao", "executorch", "onnx", "onnxruntime", "transformers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def build_report(*, source: dict, recipe: dict, target: dict, stages: dict[str, dict],
                 quantize: dict | None, export: dict | None, verify: dict | None, bench: dict | None) -> dict:
    """Assemble the report; stage records are kept as their stages wrote them."""
    return {
        "kind": REPORT_KIND,
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "source": source,
        "recipe": recipe,
        "target": target,
        "stages": stages,
        "quantize": quantize,
        "export": export,
        "verify": verify,
        "bench": bench,
    }
