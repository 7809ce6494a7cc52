"""What every checkpoint format produces: a lazily-read :class:`Checkpoint`, and the format registry.

A format is added by a module with a :class:`CheckpointFormat` (``@checkpoint_format(name, detect=...)`` on its
opener) and an entry point naming it in the group ``edgeforge.formats`` (edgeforge's own formats are declared in
its ``pyproject.toml``); nothing else changes.
Tensors are exposed under the model core's names and layout (rotate-half RoPE) and read only when
asked for, so a caller can stream one decoder block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeforge.errors import InputError
from edgeforge.fileio import content_sha256
from edgeforge.registry import Registry


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: str  # as stored in the file: "F32", "BF16", "Q4_0", ...
    load: Callable[[], torch.Tensor]


class LazyTensors(Mapping[str, torch.Tensor]):
    """Name -> tensor, read from the file on access and returned as float32 in the core's layout."""

    def __init__(self, source: Path):
        self.source = source
        self._entries: dict[str, TensorEntry] = {}

    def add(self, name: str, shape, dtype: str, load: Callable[[], torch.Tensor]) -> None:
        self._entries[name] = TensorEntry(tuple(int(d) for d in shape), dtype, load)

    def entry(self, name: str) -> TensorEntry:
        return self._entries[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stored(name).float()

    def stored(self, name: str) -> torch.Tensor:
        """The tensor in the dtype the file holds (e.g. bf16: half the memory of the float32 view)."""
        entry = self._entries[name]
        try:
            tensor = entry.load()
        except InputError:
            raise
        except Exception as exc:  # truncated data, bad offsets, decoder errors from the format library
            raise InputError(f"cannot read tensor {name}: {exc}", path=self.source) from exc
        if tuple(tensor.shape) != entry.shape:
            raise InputError(f"tensor {name} has {tuple(tensor.shape)} values, header says {entry.shape}", path=self.source)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class Checkpoint:
    """An opened checkpoint: its config, lazily-read tensors, and tokenizer (None if absent).

    architecture: "llama" (decoder, config is LlamaConfig) or "bert" (encoder, config is BertConfig).
    metadata: format facts for `inspect` (e.g. the GGUF quantization types seen).
    """

    path: Path
    format: str
    architecture: str
    config: object
    tensors: LazyTensors
    tokenizer: object | None
    files: list[Path] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def parameter_count(self) -> int:
        return sum(_numel(self.tensors.entry(name).shape) for name in self.tensors)

    def dtype_counts(self) -> dict[str, int]:
        """Stored dtype -> number of parameters held in it."""
        counts: dict[str, int] = {}
        for name in self.tensors:
            entry = self.tensors.entry(name)
            counts[entry.dtype] = counts.get(entry.dtype, 0) + _numel(entry.shape)
        return counts

    def content_hash(self) -> str:
        """SHA-256 over the checkpoint's files (``fileio.content_sha256``), for manifests and caches."""
        return content_sha256(*self.files)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path], Checkpoint]


# Format name -> CheckpointFormat, from the entry points of the group edgeforge.formats.
FORMATS: Registry[CheckpointFormat] = Registry("formats", "checkpoint format")


def checkpoint_format(name: str, detect: Callable[[Path], bool]):
    """Decorator: ``open(path) -> Checkpoint`` becomes the CheckpointFormat ``name`` for files where ``detect(path)``
    is true (the object the format's entry point names)."""

    def decorate(open_fn: Callable[[Path], Checkpoint]) -> CheckpointFormat:
        return CheckpointFormat(name, detect, open_fn)

    return decorate


def require(config: dict, key: str, path: Path):
    """``config[key]``, or InputError naming the missing key and file."""
    if key not in config:
        raise InputError(f"missing config key {key!r}", path=path)
    return config[key]
