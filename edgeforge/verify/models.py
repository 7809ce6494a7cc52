"""The model under test, whatever form it ships in, behind one interface: :func:`open_for_eval`.

    path                                  kind        runs in
    exported artifact (edgeforge.json,    artifact    its runtime: ExecuTorch (.pte) or onnxruntime (ONNX),
      kind edgeforge.artifact)                        through ``Artifact.open()``
    edgeforge quantized checkpoint        quantized   eager torch, with QuantizedLinear modules
    any checkpoint edgeforge loads        checkpoint  eager torch, fp32

Decoders answer ``forward(tokens [1, S], input_pos [S]) -> logits [1, S, vocab]``; encoders answer
``embed(input_ids, attention_mask, token_type_ids) -> [B, dim]``. :class:`Lineage` collects what
the model's manifests say about where it came from: the recipe and its gates, the calibration
fingerprints (for the overlap check) and the fp32 checkpoint it was quantized from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeforge.errors import InputError
from edgeforge.fileio import read_json

MANIFEST = "edgeforge.json"
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Lineage:
    """What the model's manifests record about its making (None where they do not say).

    gates: verify thresholds of its recipe (``max_kld``, ``min_top1``, ...); gates_source: where they came from.
    calibration_sha256: SHA-256 of the calibration text; calibration_fingerprints: per-document
    fingerprints (``edgeforge.quantize.calibration.document_fingerprint``), None when not found.
    source_sha256: content hash of the full-precision checkpoint it was made from.
    eager_source: the quantized checkpoint an artifact was exported from, when its manifest is still there;
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
    notes: tuple[str, ...] = ()


@dataclass
class EvalModel:
    """A model opened for evaluation. ``runtime`` is an artifact Session or an eager ``nn.Module``."""

    path: Path
    kind: str  # "artifact" | "quantized" | "checkpoint"
    format: str  # "pte" | "onnx" | "eager"
    architecture: str  # "llama" | "bert"
    scheme: str  # "fp32", "8da4w", ...
    max_seq_len: int
    sha256: str
    lineage: Lineage
    runtime: object

    @property
    def eager(self) -> bool:
        return self.format == "eager"

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Decoder logits [1, S, vocab] for ``tokens`` [1, S] at positions ``input_pos`` [S] (KV cache kept)."""
        if self.eager:
            if self.runtime.cache_len != self.max_seq_len:
                self.runtime.setup_cache(1, self.max_seq_len)
            return self.runtime(tokens, input_pos)
        return self.runtime.forward(tokens, input_pos)

    def window_logits(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] of windows [B, L], each fed as one prefill from position 0.

        Eager models take the whole batch through plain causal attention (the same computation as a
        prefill into an empty cache); a runtime session takes one window per call.
        """
        with torch.inference_mode():
            if self.eager:
                return self.runtime(windows)
            positions = torch.arange(windows.shape[1])
            return torch.cat([self.runtime.forward(row[None], positions) for row in windows])

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, dim] of an encoder."""
        with torch.inference_mode():
            if self.eager:
                return self.runtime(input_ids, attention_mask, token_type_ids)
            return self.runtime.embed(input_ids, attention_mask, token_type_ids)

    def describe(self) -> dict:
        return {"path": str(Path(self.path).resolve()), "sha256": self.sha256, "kind": self.kind, "format": self.format,
                "architecture": self.architecture, "scheme": self.scheme, "recipe": self.lineage.recipe,
                "max_seq_len": self.max_seq_len}


def files_sha256(files) -> str:
    """SHA-256 over files (names and bytes, sorted by path): the digest ``Checkpoint.content_hash`` and
    the export manifest use, so hashes recorded there can be compared with ours."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _dir_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def open_for_eval(path: str | Path) -> EvalModel:
    """Open an artifact, a quantized checkpoint or a plain checkpoint for evaluation (kind from its manifest)."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path=path)
    kind = read_json(path / MANIFEST).get("kind") if (path / MANIFEST).is_file() else None
    if kind == "edgeforge.artifact":
        return _open_artifact(path)
    if kind == "edgeforge.quantized_checkpoint":
        return _open_quantized(path)
    return _open_checkpoint(path)


def _open_artifact(path: Path) -> EvalModel:
    from edgeforge.export.artifact import open_artifact

    artifact = open_artifact(path)
    manifest = artifact.manifest
    return EvalModel(path=path, kind="artifact", format=artifact.format, architecture=manifest["architecture"],
                     scheme=manifest["scheme"], max_seq_len=int(manifest["max_seq_len"]),
                     sha256=files_sha256(_dir_files(path)), lineage=artifact_lineage(path, manifest),
                     runtime=artifact.open())


def _open_quantized(path: Path) -> EvalModel:
    from edgeforge.export.targets import scheme_name
    from edgeforge.quantize import load_quantized_model, read_manifest

    manifest = read_manifest(path)
    model = load_quantized_model(path)
    return EvalModel(path=path, kind="quantized", format="eager", architecture=manifest["architecture"],
                     scheme=scheme_name(manifest), max_seq_len=model.config.max_seq_len,
                     sha256=files_sha256(_dir_files(path)), lineage=quantized_lineage(path, manifest),
                     runtime=model)


def _open_checkpoint(path: Path) -> EvalModel:
    from edgeforge.checkpoints import load_model, open_checkpoint

    checkpoint = open_checkpoint(path)
    sha256 = checkpoint.content_hash()
    return EvalModel(path=checkpoint.path, kind="checkpoint", format="eager", architecture=checkpoint.architecture,
                     scheme="fp32", max_seq_len=checkpoint.config.max_seq_len, sha256=sha256,
                     lineage=Lineage(source_sha256=sha256), runtime=load_model(checkpoint))


def quantized_lineage(path: Path, manifest: dict) -> Lineage:
    """Lineage of a quantized checkpoint directory from its manifest and calibration.json."""
    recipe = manifest["recipe"]
    calibration = manifest.get("calibration")
    fingerprints, source, notes = None, None, ()
    if calibration is not None:
        fingerprints = _read_fingerprints(path / CALIBRATION_FILE)
        source = str(path / CALIBRATION_FILE) if fingerprints is not None else None
        if fingerprints is None:
            notes = (f"{path / CALIBRATION_FILE} is missing: the overlap check compares whole-file hashes only",)
    return Lineage(recipe=recipe["name"], gates=dict(recipe.get("gates") or {}),
                   gates_source=f"recipe {recipe['name']} in {path / MANIFEST}",
                   calibrated=calibration is not None,
                   calibration_sha256=calibration["sha256"] if calibration else None,
                   calibration_fingerprints=fingerprints, fingerprints_source=source,
                   source_sha256=manifest["source"].get("sha256"), notes=notes)


def artifact_lineage(path: Path, manifest: dict) -> Lineage:
    """Lineage of an artifact: its own manifest, then the quantized checkpoint it was exported from.

    Calibration fingerprints are read from ``calibration.json`` in the artifact directory when the
    exporter copied it there, else from the source quantized checkpoint (``source.path``) when that
    directory still exists and its calibration hash is the one the artifact records. Gates come from
    ``source.gates`` when the artifact carries them, else from the source checkpoint's recipe, else
    from the bundled recipe of the recorded name.
    """
    source = manifest.get("source") or {}
    recipe, calibration = source.get("recipe"), source.get("calibration")
    source_dir = Path(source["path"]) if source.get("path") else None
    source_manifest = None
    if recipe is not None and source_dir is not None and (source_dir / MANIFEST).is_file():
        candidate = read_json(source_dir / MANIFEST)
        if candidate.get("calibration") == calibration and candidate.get("recipe", {}).get("name") == recipe:
            source_manifest = candidate
    notes: list[str] = []
    gates, gates_source = _artifact_gates(source, source_dir, source_manifest, notes)
    fingerprints, fingerprints_source = None, None
    if calibration is not None:
        for candidate in (path / CALIBRATION_FILE, source_dir / CALIBRATION_FILE if source_manifest else None):
            if candidate is not None and (fingerprints := _read_fingerprints(candidate)) is not None:
                fingerprints_source = str(candidate)
                break
        else:
            notes.append(f"calibration fingerprints not found (no {CALIBRATION_FILE} in the artifact, and the source "
                         f"checkpoint {source_dir} is gone or changed): the overlap check compares whole-file "
                         "hashes only")
    if recipe is None:  # exported straight from a full-precision checkpoint
        source_sha256 = source.get("sha256")
    else:
        source_sha256 = source_manifest["source"].get("sha256") if source_manifest else None
    return Lineage(recipe=recipe, gates=gates, gates_source=gates_source, calibrated=calibration is not None,
                   calibration_sha256=calibration["sha256"] if calibration else None,
                   calibration_fingerprints=fingerprints, fingerprints_source=fingerprints_source,
                   source_sha256=source_sha256, eager_source=source_dir if source_manifest else None,
                   eager_source_sha256=source.get("sha256") if source_manifest else None,
                   eager_numerics=(manifest.get("target") or {}).get("activation_numerics"), notes=tuple(notes))


def _artifact_gates(source: dict, source_dir: Path | None, source_manifest: dict | None,
                    notes: list[str]) -> tuple[dict, str | None]:
    recipe = source.get("recipe")
    if source.get("gates") is not None:
        return dict(source["gates"]), f"recipe {recipe} (artifact manifest)"
    if source_manifest is not None:
        return dict(source_manifest["recipe"].get("gates") or {}), f"recipe {recipe} in {source_dir / MANIFEST}"
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
