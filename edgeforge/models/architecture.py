"""Model families as registered objects: what the quantizer (and later export and verify) needs of one.

An architecture (``edgeforge.architectures`` entry points: ``llama`` decoder, ``bert`` encoder) supplies

- ``model_class`` (its ``config_class``), and ``quantized_config(config)``: the config a quantized copy records;
- the layer plan: ``embedding`` (the token embedding's layer name), ``layer_widths(config)`` (every linear the
  quantizer may round, full name -> input width, in execution order);
- ``forward_inputs(tokens)``: the model's forward arguments for a batch of token windows (calibration and
  drift windows alike);
- ``walk(checkpoint, seq_len)``: a :class:`Walk` over the model one :class:`Block` at a time, each with its
  groups of linears that share an input (:class:`Group`), how scales fold into the op producing it, and the
  forward of the block, so the quantizer never holds more than one block of weights;
- optionally ``rotation_plan(config, names)``: a :class:`RotationPlan`, where its residual stream is read and
  written, for recipes that fold rotations into the weights (an architecture without one refuses them);
- what the later stages decide by it: ``family`` (the graph the exporters build, the session that runs it,
  the export guard's check and verify's measurement are looked up by it), ``generates_text`` (generate,
  bench and the runtimes' LLM runners need it), ``gates`` (the verify gates that apply),
  ``genai_model_type`` (onnxruntime-genai's model type, None: no genai files) and
  ``quantized_activation_tolerance`` (the export guard's widened limits when activations are quantized).

Adding an architecture is adding its file and entry point; one of an existing family reuses that family's
graphs, sessions, guard and measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, TypeVar

import torch
from torch import nn

from edgeforge.errors import UnsupportedError
from edgeforge.registry import Registry

T = TypeVar("T")


class Absorb(Enum):
    """Where per-input-channel scales s of a group go (``W x = (W · diag(s)) (x / s)``)."""

    NORM = "norm"  # the producer is a norm: its weight is divided by s
    ROWS = "rows"  # the producer is a linear whose output rows are the input: they are divided by s
    MULTIPLIER = "multiplier"  # nothing can absorb 1/s exactly: the linears keep it as an explicit multiply
    NONE = "none"  # nothing exact to fold into (grouped-query attention's wv -> wo): no scales


@dataclass(frozen=True)
class Group:
    """Linears of a block (names inside it) reading the same input, and the op producing that input."""

    linears: tuple[str, ...]
    producer: str | None
    absorb: Absorb


@dataclass
class Block:
    """One step of the quantizer's walk: a module with its groups, in the order they compute.

    ``prefix`` turns a name inside the block into the model's ("layers.3."); ``group_input(stage, x, memo)`` is
    the input of ``groups[stage]`` given the block's current weights; ``forward(x, memo)`` the block's output
    (None for the last block: nothing reads it). ``memo``: a dict per input batch, kept by the caller from
    stage 0 to the forward while the groups are quantized in order, in which the block may keep what a stage
    computed from finished groups for later stages to reuse (a fresh dict each time: nothing reused).
    ``head``: the model's output head (AWQ scales it, SmoothQuant does not)."""

    label: str
    prefix: str
    module: nn.Module
    groups: tuple[Group, ...]
    group_input: Callable[[int, torch.Tensor, dict], torch.Tensor]
    forward: Callable[[torch.Tensor, dict], torch.Tensor] | None
    head: bool = False


@dataclass(frozen=True)
class RotationPlan:
    """Where a pre-norm decoder's residual stream is read and written (tensor names), for an orthogonal Q folded
    into the weights (:mod:`edgeforge.quantize.rotation`): the embedding's rows and the writers' outputs are
    rotated, the readers' inputs (their norm's gain folded in first) rotated back, so nothing runs on line.

    readers: weight -> the RMSNorm gain in front of it (the output head reads the final norm); writers: weights
    whose outputs add into the stream; heads: (value weight, output weight) per layer, rotated per value head of
    ``head_dim`` (each value head feeds ``queries_per_value`` query heads' columns of the output weight);
    head_source: the tensor the output head is read from (the embedding when tied)."""

    width: int
    embedding: str
    readers: dict[str, str]
    writers: tuple[str, ...]
    heads: tuple[tuple[str, str], ...]
    head_dim: int
    queries_per_value: int
    head: str
    head_source: str


class Walk(Protocol):
    """A checkpoint seen block by block for calibration windows of one length."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first block's input for a batch of token windows [batch, seq_len]."""

    def prologue(self) -> dict[str, torch.Tensor]:
        """Tensors before the first block other than the token embedding (position embeddings, norms)."""

    def blocks(self) -> Iterator[Block]:
        """The blocks in order, each loaded when reached."""


DECODER = "decoder"  # token ids -> next-token logits, through a static KV cache
ENCODER = "encoder"  # token ids and attention mask -> one embedding per sentence


class Architecture(Protocol):
    name: str
    embedding: str
    model_class: type[nn.Module]
    family: str  # DECODER or ENCODER
    generates_text: bool
    gates: tuple[str, ...]  # verify's gate names (edgeforge.verify.verify.GATES) that apply
    genai_model_type: str | None
    quantized_activation_tolerance: dict | None  # {"min_cosine", "min_top1", "reason"}; None: the scheme's own

    def quantized_config(self, config): ...

    def layer_widths(self, config) -> dict[str, int]: ...

    def forward_inputs(self, tokens: torch.Tensor) -> tuple: ...

    def walk(self, checkpoint, seq_len: int) -> Walk: ...


ARCHITECTURES: Registry[Architecture] = Registry("architectures", "architecture", make=lambda cls: cls())


def family_choice(name: str, choices: dict[str, T], what: str, *, path=None) -> T:
    """``choices[family]`` for the architecture called ``name`` (a stage's graph builder, session, check or
    measurement per family); UnsupportedError (naming ``path`` if given) when its family has no ``what``."""
    family = ARCHITECTURES.get(name).family
    if family not in choices:
        raise UnsupportedError(f"architecture {name!r} is a {family}: no {what} for it "
                               f"(there is one for: {', '.join(choices)})", path=path)
    return choices[family]


def load_block(block: nn.Module, tensors, prefix: str) -> nn.Module:
    """``block`` (built on the meta device) with its weights read from a checkpoint's lazy ``tensors``."""
    block.load_state_dict({name: tensors[prefix + name] for name in block.state_dict()}, assign=True)
    return block.eval()


def captured_input(module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The input ``module`` receives while ``run()`` runs (e.g. the attention context its output linear reads)."""
    captured = []
    handle = module.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return captured[0]
