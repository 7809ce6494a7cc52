"""Check a checkpoint's tensors against the architecture and build the fp32 model from them."""

from __future__ import annotations

from pathlib import Path

import torch

from edgeforge.checkpoints.base import FORMATS, Checkpoint
from edgeforge.errors import InputError
from edgeforge.models import model_class


def expected_shapes(architecture: str, config) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape the model core expects (a tied output head is not listed)."""
    with torch.device("meta"):
        model = model_class(architecture)(config)
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()
            if not (getattr(config, "tie_embeddings", False) and name == "output.weight")}


def validate(checkpoint: Checkpoint) -> None:
    """Raise InputError naming the first missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(checkpoint.architecture, checkpoint.config)
    present = set(checkpoint.tensors)
    missing = [name for name in expected if name not in present]
    if missing:
        raise InputError(f"missing tensor {missing[0]} ({len(missing)} missing in all)", path=checkpoint.path)
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise InputError(f"unexpected tensor {unexpected[0]} ({len(unexpected)} not in a {checkpoint.architecture} "
                         f"of this config)", path=checkpoint.path)
    for name, shape in expected.items():
        stored = checkpoint.tensors.entry(name).shape
        if stored != shape:
            raise InputError(f"tensor {name} has shape {stored}, config implies {shape}", path=checkpoint.path)


def load_model(checkpoint: Checkpoint) -> torch.nn.Module:
    """Build the model on the meta device and assign the checkpoint's fp32 tensors (no double copy)."""
    validate(checkpoint)
    with torch.device("meta"):
        model = model_class(checkpoint.architecture)(checkpoint.config)
    state = {name: checkpoint.tensors[name] for name in expected_shapes(checkpoint.architecture, checkpoint.config)}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(checkpoint.config, "tie_embeddings", False):
        model.output.weight = model.tok_embeddings.weight
    model.init_buffers()
    return model.eval()


def open_checkpoint(path: str | Path, format: str | None = None) -> Checkpoint:
    """Open and validate a checkpoint lazily, auto-detecting its format unless ``format`` names one."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path=path)
    candidates = [FORMATS.get(format)] if format else [fmt for fmt in FORMATS if fmt.detect(path)]
    if not candidates:
        raise InputError(f"not a recognised checkpoint (known formats: {', '.join(FORMATS.names())})", path=path)
    checkpoint = candidates[0].open(path)
    validate(checkpoint)
    return checkpoint
