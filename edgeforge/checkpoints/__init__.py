"""Checkpoint loaders: every format opens to the same lazily-read :class:`Checkpoint`, and
:func:`load_model` turns one into the fp32 reference model.

Formats: ``hf`` (config.json + safetensors), ``meta`` (params.json + consolidated.NN.pth),
``llama2c`` (.bin), ``gguf``.
"""

from __future__ import annotations

from pathlib import Path

from edgeforge.checkpoints import gguf, hf, llama2c, meta  # noqa: F401  (register formats)
from edgeforge.checkpoints.base import Checkpoint, LazyTensors, formats, register_format
from edgeforge.checkpoints.loading import expected_shapes, load_model, open_checkpoint

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "data" / "stories260K" / "stories260K.bin"

__all__ = ["Checkpoint", "LazyTensors", "DEFAULT_CHECKPOINT", "expected_shapes", "formats", "load_model",
           "open_checkpoint", "register_format"]
