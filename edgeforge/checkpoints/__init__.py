"""Checkpoint loaders: every format opens to the same lazily-read :class:`Checkpoint`, and
:func:`load_model` turns one into the fp32 reference model.

Formats: ``hf`` (config.json + safetensors), ``meta`` (params.json + consolidated.NN.pth),
``llama2c`` (.bin), ``gguf``.
"""

from __future__ import annotations

from pathlib import Path

from edgeforge.checkpoints.base import FORMATS, Checkpoint, CheckpointFormat, LazyTensors, checkpoint_format
from edgeforge.checkpoints.loading import expected_shapes, load_model, open_checkpoint

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "data" / "stories260K" / "stories260K.bin"

__all__ = ["FORMATS", "Checkpoint", "CheckpointFormat", "LazyTensors", "DEFAULT_CHECKPOINT", "checkpoint_format",
           "expected_shapes", "load_model", "open_checkpoint"]
