"""The forge report record: every stage's record under its own key, plus provenance."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from edgeforge import __version__
from edgeforge.provenance import package_versions

REPORT_KIND = "edgeforge.report"
REPORT_SCHEMA_VERSION = 1


def _versions() -> dict:
    return {"edgeforge": __version__, "python": platform.python_version(),
            **package_versions("torch", "torchao", "executorch", "onnx", "onnxruntime", "transformers")}


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
