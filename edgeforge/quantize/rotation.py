"""Rotations folded into a decoder's weights before it is quantized: the same function, easier to quantize.

A pre-norm decoder's residual stream h is read only through RMSNorms and written only by adding linear outputs.
RMSNorm without its gain commutes with an orthogonal Q (``rms(h Q) = rms(h)``), so with every norm's gain folded
into the linears that read it, the model computes the same logits on ``h Q``: the embedding's rows become E Q, a
reader's weight W diag(g) Q, a writer's Qᵀ W, the output head W_head diag(g_final) Q (so a tied head is untied).
Per value head a second orthogonal R (``head_dim`` wide) goes between wv's rows (Rᵀ W_v) and wo's columns of
every query head reading that value head (W_o R): attention mixes value vectors linearly, so R passes through it.
Nothing is added at run time: the exported graph is the same graph with other weights.

Why it helps: a real model's activations carry a few channels 20-40x their RMS (the residual stream's "massive
activations"), and per-token int8 rounding of such a row spends its range on them. A random rotation spreads
each outlier over every channel (and makes weight groups closer to Gaussian), so per-token, per-block and
per-group grids fit. On SmolLM2-135M (WikiText-2, 32 x 256 tokens, XNNPACK numerics) int8-dynamic's mean KLD
went 0.0387 -> 0.0185, and about 0.011 with SmoothQuant after the rotation (recipe int8-dynamic-rotated's
artifacts: .pte 0.0120, ONNX 0.0088 against int8-dynamic's 0.0387 and 0.0164); 8-bit g32 weight-only 0.0037 -> 0.0033.

The matrices are random orthogonal (QR of a Gaussian, signs fixed), drawn from ``seed``: any width works (a
Hadamard matrix needs a power of two, SmolLM2's 576 is not). The rotation is computed in float64 and each tensor
stored in float32; SwiGLU's input to w2 is not a linear image of the stream and is left as it is.
"""

from __future__ import annotations

import dataclasses

import torch

from edgeforge.checkpoints.base import Checkpoint, LazyTensors
from edgeforge.errors import UnsupportedError
from edgeforge.models.architecture import Architecture, RotationPlan


@dataclasses.dataclass(frozen=True)
class Rotations:
    """The residual rotation Q [width, width] (None: not rotated) and one R [head_dim, head_dim] per value head
    of each layer (None: not rotated), all float64."""

    residual: torch.Tensor | None
    heads: list[list[torch.Tensor]] | None


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix [size, size], float64."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def draw_rotations(plan: RotationPlan, value_heads: int, *, residual: bool, heads: bool, seed: int) -> Rotations:
    """Q (if ``residual``) then every layer's per-head R (if ``heads``), from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    q = random_orthogonal(plan.width, generator) if residual else None
    per_head = [[random_orthogonal(plan.head_dim, generator) for _ in range(value_heads)]
                for _ in plan.heads] if heads else None
    return Rotations(q, per_head)


def rotated_checkpoint(checkpoint: Checkpoint, model: Architecture, *, residual: bool, heads: bool,
                       seed: int) -> Checkpoint:
    """``checkpoint`` with the rotations folded into its tensors, still read lazily (UnsupportedError when its
    architecture ``model`` has no ``rotation_plan``). Norm gains become ones; the output head is its own tensor
    (the config says so: ``model.quantized_config``)."""
    if not hasattr(model, "rotation_plan"):
        raise UnsupportedError(f"architecture {checkpoint.architecture!r} has no rotation plan: take a recipe "
                               "without [rotation]", path=checkpoint.path)
    source = checkpoint.tensors
    plan = model.rotation_plan(checkpoint.config, set(source))
    value_heads = source.entry(plan.heads[0][0]).shape[0] // plan.head_dim if plan.heads else 0
    rotated = _Rotated(source, plan, draw_rotations(plan, value_heads, residual=residual, heads=heads, seed=seed))
    tensors = LazyTensors(source.source)
    for name in [*source, *([plan.head] if residual and plan.head not in source else [])]:
        entry = source.entry(plan.head_source if name == plan.head else name)
        if name in rotated.changed:
            tensors.add(name, entry.shape, "F32", lambda name=name: rotated.value(name))
        else:
            tensors.add(name, entry.shape, entry.dtype, entry.load)
    return dataclasses.replace(checkpoint, tensors=tensors, config=model.quantized_config(checkpoint.config))


class _Rotated:
    """The rotated value of each tensor that changes (``changed``), computed from the source when read."""

    def __init__(self, source: LazyTensors, plan: RotationPlan, rotations: Rotations):
        self.source, self.plan, self.rotations = source, plan, rotations
        self.norms = set(plan.readers.values())
        self.layer_of = {name: index for index, pair in enumerate(plan.heads) for name in pair}
        self.changed = set()
        if rotations.residual is not None:
            self.changed |= {plan.embedding, plan.head, *plan.readers, *self.norms, *plan.writers}
        if rotations.heads is not None:
            self.changed |= set(self.layer_of)

    def value(self, name: str) -> torch.Tensor:
        plan, q = self.plan, self.rotations.residual
        weight = self.source[plan.head_source if name == plan.head else name]
        if q is not None:
            if name == plan.embedding:  # the largest tensors stay float32: a 128k x 4096 table is 2 GiB so
                weight = weight @ q.float()
            elif name == plan.head:
                weight = (weight * self.source[plan.readers[name]]) @ q.float()
            elif name in plan.readers:
                weight = (weight.double() * self.source[plan.readers[name]].double()) @ q
            elif name in self.norms:
                weight = torch.ones_like(weight)
            elif name in plan.writers:
                weight = q.T @ weight.double()
        if self.rotations.heads is not None and name in self.layer_of:
            weight = self._per_head(name, weight.double())
        return weight.float().contiguous()

    def _per_head(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        value, _ = plan.heads[self.layer_of[name]]
        weight = weight.clone()
        for head, r in enumerate(self.rotations.heads[self.layer_of[name]]):
            if name == value:  # the value head's rows: v' = Rᵀ v
                rows = slice(head * plan.head_dim, (head + 1) * plan.head_dim)
                weight[rows] = r.T @ weight[rows]
            else:  # the columns of every query head reading that value head: W_o R
                for query in range(head * plan.queries_per_value, (head + 1) * plan.queries_per_value):
                    columns = slice(query * plan.head_dim, (query + 1) * plan.head_dim)
                    weight[:, columns] = weight[:, columns] @ r
        return weight
