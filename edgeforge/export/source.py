"""What an exporter consumes: the eager model to lower (fp32 or edgeforge-quantized), its tokenizer
files and scheme, opened from a checkpoint path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgeforge.checkpoints import Checkpoint, load_model, open_checkpoint
from edgeforge.errors import InputError
from edgeforge.quantize.record import MANIFEST, QuantizedCheckpoint


@dataclass
class ExportSource:
    path: Path
    architecture: str  # "llama" | "bert"
    config: object
    model: nn.Module  # eager reference for this export: fp32, or the quantized model with QuantizedLinear modules
    tokenizer: object | None
    tokenizer_files: list[Path]
    scheme: str  # "fp32", "8da4w", ...
    quantized: QuantizedCheckpoint | None  # the quantized checkpoint's record, None for an fp32 checkpoint
    sha256: str


def open_source(path: str | Path) -> ExportSource:
    """Open a checkpoint (exported in fp32) or an edgeforge quantized checkpoint (exported as quantized)."""
    from edgeforge.checkpoints.tokenizers import tokenizer_files
    from edgeforge.quantize import load_quantized_model, read_quantized

    checkpoint: Checkpoint = open_checkpoint(path)
    quantized = read_quantized(checkpoint.path) if checkpoint.format == "edgeforge" else None
    model = load_quantized_model(checkpoint.path) if quantized else load_model(checkpoint)
    tokenizer = checkpoint.tokenizer
    files = tokenizer_files(tokenizer)
    return ExportSource(path=checkpoint.path, architecture=checkpoint.architecture, config=checkpoint.config,
                        model=model, tokenizer=tokenizer, tokenizer_files=files,
                        scheme=quantized.scheme if quantized else "fp32", quantized=quantized,
                        sha256=checkpoint.content_hash())


def open_fp32_reference(source: ExportSource) -> nn.Module:
    """The fp32 model a quantized source was made from: the checkpoint its record names, refused (InputError)
    when it is missing or its content no longer has the sha256 the record holds."""
    recorded = source.quantized.source
    if not recorded.path or not recorded.sha256:
        raise InputError("the record names no fp32 source (path and sha256)", path=source.path / MANIFEST)
    path = Path(recorded.path)
    if not path.exists():
        raise InputError("the fp32 checkpoint this model was quantized from is missing", path=path)
    checkpoint = open_checkpoint(path)
    found = checkpoint.content_hash()
    if found != recorded.sha256:
        raise InputError(f"the fp32 checkpoint has sha256 {found[:12]}..., not the {recorded.sha256[:12]}... "
                         "this model was quantized from", path=path)
    return load_model(checkpoint).eval()
