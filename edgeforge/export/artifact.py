"""Exported artifacts and the exporter registry.

An artifact is a directory: the model file(s) for one runtime, the tokenizer files, and
``edgeforge.json`` (kind ``edgeforge.artifact``) saying what made it, from what, and the export report.
A format is added by adding a module that registers an :class:`Exporter`; nothing else changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from edgeforge.errors import InputError, UnknownNameError, UnsupportedError
from edgeforge.fileio import read_json

MANIFEST = "edgeforge.json"
KIND = "edgeforge.artifact"
SCHEMA_VERSION = 1


class Session(Protocol):
    """A loaded artifact in its runtime.

    Decoders: ``forward(tokens [1, S] int64, input_pos [S] int64) -> logits [1, S, vocab]`` through the
    artifact's KV cache (positions must continue the ones already fed; start again at 0 to reset).
    Encoders: ``embed(input_ids, attention_mask, token_type_ids) -> [B, dim]``.
    """

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor: ...


class Exporter(Protocol):
    name: str  # the target format it produces: "pte", "onnx"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int, phase: Callable[[str, str], None]) -> dict:
        """Write the model file(s) into ``out_dir`` (a fresh temporary directory), calling ``phase(name, what)``
        as each long step starts (export() prints it with the elapsed time); return report fields:
        at least ``model_file`` (relative name), and where known ``delegated_ops``, ``total_ops``,
        ``ops_outside_delegate`` (op name -> count), ``delegated_parameter_share``."""

    def open(self, artifact_dir: Path, manifest: dict) -> Session:
        """Load the artifact in its real runtime."""


def no_phase(name: str, what: str = "") -> None:
    """The ``phase`` callback of a caller that does not follow an export's progress."""


_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter_class):
    """Class decorator: register an exporter under its ``name``."""
    _EXPORTERS[exporter_class.name] = exporter_class()
    return exporter_class


_BUILTIN_EXPORTERS = {"pte": "edgeforge.export.executorch", "onnx": "edgeforge.export.onnx"}  # format -> module


def exporter_for(format: str) -> Exporter:
    if format not in _EXPORTERS and format in _BUILTIN_EXPORTERS:
        importlib.import_module(_BUILTIN_EXPORTERS[format])  # registers it; only the runtime this format needs
    if format not in _EXPORTERS:
        raise UnknownNameError("artifact format", format, sorted(set(_EXPORTERS) | set(_BUILTIN_EXPORTERS)))
    return _EXPORTERS[format]


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest["report"]["model_file"]

    def open(self) -> Session:
        target = self.manifest["target"]
        if not target.get("runs_here", True):
            raise UnsupportedError(f"artifacts for target {target['name']} cannot run here: {target['latency']}",
                                   path=self.path)
        return exporter_for(self.format).open(self.path, self.manifest)


def open_artifact(path: str | Path) -> Artifact:
    """An exported artifact directory, checked for its manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise InputError(f"not an edgeforge artifact (no {MANIFEST})", path=path)
    manifest = read_json(manifest_path)
    if manifest.get("kind") != KIND or manifest.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"expected kind {KIND!r} schema {SCHEMA_VERSION}, found {manifest.get('kind')!r}",
                         path=manifest_path)
    return Artifact(path, manifest)
