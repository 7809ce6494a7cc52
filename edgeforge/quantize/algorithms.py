"""Quantization algorithms: small frozen configs whose hooks the block-by-block driver calls.

torchao's ``quantize_(model, config)`` shape: a recipe names an algorithm (``algorithm = "gptq"``), the
registry makes its config from the recipe's settings tables, and the driver calls, for each group of
linears that read one input:

- ``observe()``: what calibration must measure beyond the probe rows and range every group collects
  (:class:`Observation`: the Hessian E[x xᵀ]; the fp32 block's inputs, for algorithms that fold scales);
- ``fold(weights, rows, scheme, runtime_inputs, head)``: per-input-channel scales s to fold into the op
  producing the input (AWQ, SmoothQuant), or None;
- ``round(rows, scheme, stats)``: a chunk of a linear's rows as integers + scales (RTN, MSE clipping, GPTQ);
  the built-ins take their group scales from the recipe's ``[scales]`` search where it asks for one.

Built-ins register as an outside package would: entry points in ``edgeforge.algorithms``
(pyproject.toml) naming a class, or a :class:`Composition` of two, with ``from_recipe(recipe)``.
A new algorithm is a subclass of :class:`Algorithm` in any importable module plus that entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from edgeforge.quantize.awq import awq_search_scales
from edgeforge.quantize.gptq import InverseHessian, fp32_alignment, gptq_quantize, prepare_hessian
from edgeforge.quantize.rtn import mse_clip_search, rtn_quantize
from edgeforge.quantize.scale_search import ScaleSettings, importance_qparams
from edgeforge.quantize.scheme import QuantizedWeight, WeightScheme, quantize
from edgeforge.quantize.smoothquant import smoothquant_scales
from edgeforge.registry import Registry

if TYPE_CHECKING:
    from edgeforge.quantize.recipe import Recipe

RuntimeInputs = Callable[[torch.Tensor], torch.Tensor] | None  # how the runtime rounds a linear's input


@dataclass(frozen=True)
class Observation:
    """What an algorithm needs from calibration: hessian, the mean of x xᵀ at each group's input; scales, the
    fp32 block's inputs to choose per-channel scales from (its ``fold`` hook runs); drift, the mean of
    (x_fp − x) xᵀ, x_fp the fp32 model's input at the same positions."""

    hessian: bool = False
    scales: bool = False
    drift: bool = False


@dataclass
class GroupStatistics:
    """What calibration measured at one group's input; the inverse Hessian is prepared once per group."""

    hessian: torch.Tensor | None = None
    drift: torch.Tensor | None = None
    _inverses: dict = field(default_factory=dict)

    def fp32_alignment(self, *, damp: float) -> torch.Tensor:
        """:func:`~edgeforge.quantize.gptq.fp32_alignment` of this group, computed once."""
        key = ("alignment", damp)
        if key not in self._inverses:
            self._inverses[key] = fp32_alignment(self.hessian, self.drift, damp=damp)
        return self._inverses[key]

    def inverse_hessian(self, *, damp: float, act_order: bool) -> InverseHessian:
        """GPTQ's damped, ordered inverse (the O(in³) part), shared by every linear and row chunk of the group."""
        key = (damp, act_order)
        if key not in self._inverses:
            self._inverses[key] = prepare_hessian(self.hessian, damp=damp, act_order=act_order)
        return self._inverses[key]


class Algorithm:
    """Base of a quantization algorithm config: round-to-nearest, no statistics, nothing folded."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    observation: ClassVar[Observation] = Observation()
    scales = ScaleSettings()  # where group scales come from (a recipe's [scales]); dataclass subclasses set it

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Algorithm:
        """The config a recipe asks for (its settings tables)."""
        return cls()

    def observe(self) -> Observation:
        """What the driver must measure at each group's input for this algorithm."""
        return self.observation

    def fold(self, weights: Sequence[torch.Tensor], rows: torch.Tensor, scheme: WeightScheme,
             runtime_inputs: RuntimeInputs, *, head: bool) -> torch.Tensor | None:
        """Per-input-channel scales [in] to fold between the producer and ``weights`` (None: nothing)."""
        return None

    def round(self, rows: torch.Tensor, scheme: WeightScheme, stats: GroupStatistics) -> QuantizedWeight:
        """Quantize ``rows`` [chunk, in] (float32) of one linear; rows are independent of each other. Here:
        to nearest, on min-max or ``scales``-searched grids."""
        return rounded_to_nearest(rows, scheme, stats, self.scales, clip_grid=None)


@dataclass(frozen=True)
class Rtn(Algorithm):
    """Round to nearest on the min-max grid, or on searched scales weighted by the weights' magnitude: data-free."""

    name: ClassVar[str] = "rtn"
    scales: ScaleSettings = ScaleSettings()

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Rtn:
        return cls(scales=recipe.scales)


@dataclass(frozen=True)
class Mse(Algorithm):
    """Round to nearest with int4 ranges clipped by an MSE grid search (weighted by the inputs' second
    moment when calibration ran), or on importance-searched scales (calibrated)."""

    name: ClassVar[str] = "mse"
    observation: ClassVar[Observation] = Observation(hessian=True)
    grid: int = 20
    scales: ScaleSettings = ScaleSettings()

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Mse:
        return cls(grid=recipe.mse.grid, scales=recipe.scales)

    @property
    def needs_calibration(self) -> bool:
        """The importance search is weighted by calibration's E[x²]; the clip search works without it."""
        return self.scales.importance

    def round(self, rows, scheme, stats):
        return rounded_to_nearest(rows, scheme, stats, self.scales, clip_grid=self.grid)


def clip_ratio(rows: torch.Tensor, scheme: WeightScheme, stats: GroupStatistics, *, grid: int) -> torch.Tensor | None:
    """Per-group MSE clip ratios for int4 weights (None for int8, which clipping does not help), weighted by
    the inputs' second moment (the Hessian's diagonal) when calibration measured it."""
    if scheme.bits != 4:
        return None
    moment = stats.hessian.diagonal().float() if stats.hessian is not None else None
    return mse_clip_search(rows, scheme, input_second_moment=moment, grid=grid)


def searched_qparams(rows: torch.Tensor, scheme: WeightScheme, stats: GroupStatistics,
                     scales: ScaleSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Importance-searched group qparams of ``rows``, weighted by the inputs' second moment (the Hessian's
    diagonal) when calibration measured it."""
    moment = stats.hessian.diagonal().float() if stats.hessian is not None else None
    return importance_qparams(rows, scheme, importance=moment, magnitude=scales.magnitude)


def rounded_to_nearest(rows: torch.Tensor, scheme: WeightScheme, stats: GroupStatistics, scales: ScaleSettings, *,
                       clip_grid: int | None) -> QuantizedWeight:
    """RTN on the grid the recipe asks for: importance-searched, else min-max clipped by the MSE search over
    ``clip_grid`` ratios (None: plain min-max)."""
    if scales.importance:
        scale, zero_point = searched_qparams(rows, scheme, stats, scales)
        return QuantizedWeight(quantize(rows, scale, zero_point, scheme), scale, zero_point)
    clip = None if clip_grid is None else clip_ratio(rows, scheme, stats, grid=clip_grid)
    return rtn_quantize(rows, scheme, clip_ratio=clip)


@dataclass(frozen=True)
class Gptq(Algorithm):
    """GPTQ rounding against the group's Hessian, from MSE-clipped int4 ranges or importance-searched scales;
    with ``fp32_alignment`` α > 0 towards W + α W M (:func:`~edgeforge.quantize.gptq.fp32_alignment`), the
    weight that also corrects the error upstream layers left in its input (α = 1: all of it)."""

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    grid: int = 20
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    fp32_alignment: float = 0.0
    scales: ScaleSettings = ScaleSettings()

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Gptq:
        settings = recipe.gptq
        return cls(grid=recipe.mse.grid, damp=settings.damp, block_size=settings.block_size,
                   act_order=settings.act_order, fp32_alignment=settings.fp32_alignment, scales=recipe.scales)

    def observe(self) -> Observation:
        return Observation(hessian=True, drift=self.fp32_alignment > 0)

    def round(self, rows, scheme, stats):
        if stats.hessian is None:
            return rounded_to_nearest(rows, scheme, stats, self.scales, clip_grid=self.grid)
        if self.fp32_alignment:  # the driver measured the drift (observe)
            rows = rows + self.fp32_alignment * (rows @ stats.fp32_alignment(damp=self.damp))
        inverse = stats.inverse_hessian(damp=self.damp, act_order=self.act_order)
        if self.scales.importance:  # static groups: the searched qparams of the weight before any update
            groups = {"qparams": searched_qparams(rows, scheme, stats, self.scales)}
        else:
            groups = {"clip_ratio": clip_ratio(rows, scheme, stats, grid=self.grid)}
        return gptq_quantize(rows, inverse, scheme, damp=self.damp, block_size=self.block_size,
                             act_order=self.act_order, **groups)


@dataclass(frozen=True)
class Awq(Algorithm):
    """AWQ: activation-aware scales searched per group (also the output head's), then MSE-clipped RTN."""

    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    observation: ClassVar[Observation] = Observation(hessian=True, scales=True)
    grid: int = 20
    awq_grid: int = 20
    scales: ScaleSettings = ScaleSettings()

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Awq:
        return cls(grid=recipe.mse.grid, awq_grid=recipe.awq.grid, scales=recipe.scales)

    def fold(self, weights, rows, scheme, runtime_inputs, *, head):
        return awq_search_scales(weights, rows, scheme, grid=self.awq_grid, quantize_inputs=runtime_inputs)

    def round(self, rows, scheme, stats):
        return rounded_to_nearest(rows, scheme, stats, self.scales, clip_grid=self.grid)


@dataclass(frozen=True)
class SmoothQuant(Algorithm):
    """SmoothQuant: activation outliers of a block's linears migrate into their weights (not the head's,
    as in the paper), then RTN."""

    name: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True
    observation: ClassVar[Observation] = Observation(scales=True)
    alpha: float = 0.5
    scales: ScaleSettings = ScaleSettings()

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> SmoothQuant:
        return cls(alpha=recipe.smoothquant.alpha, scales=recipe.scales)

    def fold(self, weights, rows, scheme, runtime_inputs, *, head):
        return None if head else smoothquant_scales(rows.abs().amax(dim=0), weights, alpha=self.alpha)


@dataclass(frozen=True)
class Composed(Algorithm):
    """One algorithm's scales (fold) with another's rounding, e.g. AWQ then GPTQ."""

    label: str
    folding: Algorithm
    rounding: Algorithm

    @property
    def name(self) -> str:
        return self.label

    @property
    def needs_calibration(self) -> bool:
        return self.folding.needs_calibration or self.rounding.needs_calibration

    def observe(self) -> Observation:
        folding, rounding = self.folding.observe(), self.rounding.observe()
        return Observation(hessian=folding.hessian or rounding.hessian, scales=folding.scales or rounding.scales,
                           drift=folding.drift or rounding.drift)

    def fold(self, weights, rows, scheme, runtime_inputs, *, head):
        return self.folding.fold(weights, rows, scheme, runtime_inputs, head=head)

    def round(self, rows, scheme, stats):
        return self.rounding.round(rows, scheme, stats)


@dataclass(frozen=True)
class Composition:
    """A registry entry for a :class:`Composed` algorithm: which algorithm folds, which rounds."""

    name: str
    folding: type[Algorithm]
    rounding: type[Algorithm]

    def from_recipe(self, recipe: Recipe) -> Composed:
        return Composed(self.name, self.folding.from_recipe(recipe), self.rounding.from_recipe(recipe))


AWQ_GPTQ = Composition("awq+gptq", Awq, Gptq)

# name -> an Algorithm class or a Composition (anything with ``from_recipe``), from entry points
ALGORITHMS: Registry = Registry("algorithms", "quantization algorithm")


def algorithm_for(recipe: Recipe) -> Algorithm:
    """The algorithm config ``recipe`` names, built from its settings; UnknownNameError lists the registered."""
    return ALGORITHMS.get(recipe.algorithm).from_recipe(recipe)
