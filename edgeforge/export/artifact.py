"""Exported artifacts and the exporter registry.

An artifact is a directory: the model file(s) for one runtime, the tokenizer files, and
``edgeforge.json`` (kind ``edgeforge.artifact``) saying what made it, from what, and the export report.
A format is added by a class with the :class:`Exporter` methods and an entry point naming it in the group
``edgeforge.exporters`` (edgeforge's own ``pte`` and ``onnx`` are declared in its ``pyproject.toml``);
nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from edgeforge.errors import InputError, UnsupportedError
from edgeforge.fileio import read_json
from edgeforge.registry import Registry

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
    runtime_package: str  # the distribution its sessions run in, whose version reports record: "executorch"

    def export(self, source, target, out_dir: Path, *, max_seq_len: int, phase: Callable[[str, str], None]) -> dict:
        """Write the model file(s) into ``out_dir`` (a fresh temporary directory), calling ``phase(name, what)``
        as each long step starts (export() prints it with the elapsed time); return report fields:
        at least ``model_file`` (relative name), and where known ``delegated_ops``, ``total_ops``,
        ``ops_outside_delegate`` (op name -> count), ``delegated_parameter_share``."""

    def open(self, artifact_dir: Path, manifest: dict) -> Session:
        """Load the artifact in its real runtime."""

    def prepare_runtime(self, threads: int) -> str:
        """Import the runtime open() needs (seconds: bench times it apart from loading) and size its thread
        pool to ``threads`` where the runtime has its own; return how its threads were set, for the report."""


def no_phase(name: str, what: str = "") -> None:
    """The ``phase`` callback of a caller that does not follow an export's progress."""


# Artifact format -> exporter; loading one imports only its own module (asking for onnx never imports ExecuTorch).
EXPORTERS: Registry[Exporter] = Registry("exporters", "artifact format", make=lambda exporter_class: exporter_class())


def exporter_for(format: str) -> Exporter:
    """The exporter of ``format``; UnknownNameError lists the known formats."""
    return EXPORTERS.get(format)


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
