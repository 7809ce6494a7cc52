"""Where a model under test came from, as its records say: :class:`Lineage` (recipe and gates, calibration
fingerprints for the overlap check, the fp32 checkpoint it was quantized from, the quantized checkpoint an
artifact was exported from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeforge.errors import InputError
from edgeforge.fileio import read_json
from edgeforge.quantize.record import MANIFEST, QuantizedCheckpoint, read_quantized

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Lineage:
    """What the model's records say about its making (None where they do not say).

    gates: verify thresholds of its recipe (``max_kld``, ``min_top1``, ...); gates_source: where they came from.
    calibration_sha256: SHA-256 of the calibration text; calibration_fingerprints: per-document
    fingerprints (``edgeforge.quantize.calibration.document_fingerprint``), None when not found.
    source_sha256: content hash of the full-precision checkpoint it was made from.
    eager_source: the quantized checkpoint an artifact was exported from, when its record is still there;
    eager_source_sha256: that checkpoint's content hash as the artifact recorded it at export;
    eager_numerics: the activation numerics of the artifact's target, which the eager source computes with.
    notes: what could not be found, printed with the report.
    """

    recipe: str | None = None
    gates: dict = field(default_factory=dict)
    gates_source: str | None = None
    calibrated: bool = False
    calibration_sha256: str | None = None
    calibration_fingerprints: frozenset[str] | None = None
    fingerprints_source: str | None = None
    source_sha256: str | None = None
    eager_source: Path | None = None
    eager_source_sha256: str | None = None
    eager_numerics: str | None = None
    bits_per_weight: float | None = None
    notes: tuple[str, ...] = ()


def quantized_lineage(path: Path, record: QuantizedCheckpoint) -> Lineage:
    """Lineage of a quantized checkpoint directory from its record and calibration.json."""
    recipe, calibration = record.recipe, record.calibration
    fingerprints, source, notes = None, None, ()
    if calibration is not None:
        fingerprints = _read_fingerprints(path / CALIBRATION_FILE)
        source = str(path / CALIBRATION_FILE) if fingerprints is not None else None
        if fingerprints is None:
            notes = (f"{path / CALIBRATION_FILE} is missing: the overlap check compares whole-file hashes only",)
    return Lineage(recipe=recipe.name, gates=dict(recipe.gates), gates_source=f"recipe {recipe.name} in {path / MANIFEST}",
                   calibrated=calibration is not None,
                   calibration_sha256=calibration.sha256 if calibration else None,
                   calibration_fingerprints=fingerprints, fingerprints_source=source,
                   source_sha256=record.source.sha256, bits_per_weight=record.block_bits_per_weight(), notes=notes)


def artifact_lineage(path: Path, record) -> Lineage:
    """Lineage of an artifact (its ``ArtifactRecord``), then of the quantized checkpoint it was exported from.

    Calibration fingerprints are read from ``calibration.json`` in the artifact directory when the
    exporter copied it there, else from the source quantized checkpoint (``source.path``) when that
    directory still exists and its calibration is the one the artifact records. Gates come from the
    source checkpoint's recipe, else from the bundled recipe of the recorded name.
    """
    source = record.source
    recipe, calibration = source.recipe, source.calibration
    source_dir = Path(source.path) if source.path else None
    source_record = None
    if recipe is not None and source_dir is not None and (source_dir / MANIFEST).is_file():
        try:
            candidate = read_quantized(source_dir)
        except InputError:  # replaced by something else: as good as gone
            candidate = None
        if candidate is not None and candidate.calibration == calibration and candidate.recipe.name == recipe:
            source_record = candidate
    notes: list[str] = []
    gates, gates_source = _artifact_gates(recipe, source_dir, source_record, notes)
    fingerprints, fingerprints_source = None, None
    if calibration is not None:
        for candidate in (path / CALIBRATION_FILE, source_dir / CALIBRATION_FILE if source_record else None):
            if candidate is not None and (fingerprints := _read_fingerprints(candidate)) is not None:
                fingerprints_source = str(candidate)
                break
        else:
            notes.append(f"calibration fingerprints not found (no {CALIBRATION_FILE} in the artifact, and the source "
                         f"checkpoint {source_dir} is gone or changed): the overlap check compares whole-file "
                         "hashes only")
    if recipe is None:  # exported straight from a full-precision checkpoint
        source_sha256 = source.sha256
    else:
        source_sha256 = source_record.source.sha256 if source_record else None
    return Lineage(recipe=recipe, gates=gates, gates_source=gates_source, calibrated=calibration is not None,
                   calibration_sha256=calibration.sha256 if calibration else None,
                   calibration_fingerprints=fingerprints, fingerprints_source=fingerprints_source,
                   source_sha256=source_sha256, eager_source=source_dir if source_record else None,
                   eager_source_sha256=source.sha256 if source_record else None,
                   eager_numerics=record.target.activation_numerics.value, bits_per_weight=source.bits_per_weight,
                   notes=tuple(notes))


def _artifact_gates(recipe: str | None, source_dir: Path | None, source_record: QuantizedCheckpoint | None,
                    notes: list[str]) -> tuple[dict, str | None]:
    if source_record is not None:
        return dict(source_record.recipe.gates), f"recipe {recipe} in {source_dir / MANIFEST}"
    if recipe is None:
        return {}, None
    from edgeforge.quantize.recipe import list_recipes, load_recipe

    if recipe in list_recipes():
        return dict(load_recipe(recipe).gates), f"bundled recipe {recipe}"
    notes.append(f"recipe {recipe!r} is not bundled and its checkpoint {source_dir} is gone: no default gates")
    return {}, None


def _read_fingerprints(file: Path) -> frozenset[str] | None:
    if not file.is_file():
        return None
    record = read_json(file)
    fingerprints = record.get("document_fingerprints")
    if not isinstance(fingerprints, list):
        raise InputError("no 'document_fingerprints' list", path=file)
    return frozenset(fingerprints)
