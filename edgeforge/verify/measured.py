"""What one architecture's measurement hands back to :func:`edgeforge.verify.verify.verify`, and the checks and
progress every measurement shares (the calibration-overlap check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeforge.errors import InputError
from edgeforge.verify.embedding import EmbeddingStats
from edgeforge.verify.lineage import Lineage
from edgeforge.verify.report import (DecoderSamples, DecoderSettings, Drift, EagerSource, EncoderSamples,
                                     EncoderSettings, Overlap, ReferenceCache, Timing)

if TYPE_CHECKING:
    from edgeforge.verify.decoder import EagerBound

MIN_OVERLAP_WORDS = 8  # shorter documents are too generic to count as calibration overlap


@dataclass(frozen=True)
class MeasureContext:
    data_path: Path
    data_sha256: str
    reference_sha256: str


@dataclass(frozen=True)
class Measured:
    """What one architecture's measurement hands back to :func:`verify`: sections of its VerifyReport."""

    drift: Drift | None
    embedding: EmbeddingStats | None
    samples: DecoderSamples | EncoderSamples
    overlap: Overlap
    tokens_sha256: str
    settings: DecoderSettings | EncoderSettings
    cache: ReferenceCache
    timing: Timing
    eager: EagerSource | None = None
    eager_bound: EagerBound | None = None
    notes: tuple[str, ...] = ()


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


def say_progress(say, role: str, done: int, total: int) -> None:
    """About eight progress lines per pass, whatever the number of windows."""
    if done == total or done * 8 // total != (done - 1) * 8 // total:
        say(f"{role}: {done}/{total} windows")
