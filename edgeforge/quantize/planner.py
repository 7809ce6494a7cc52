"""The budget planner: per-layer weight schemes that meet a size budget (``--budget-bits``) or a drift bound
(``--max-kld``), chosen among what the target runs and written as a recipe's explicit per-layer rules.

- Options: the target's weight schemes under the base recipe's activations (8da4w/8da8w, or 4w/8w): int4 in
  groups of 32, 64, 128 or per channel, int8 per channel (an int8 group scale costs more bits than it buys back
  against an int4 option), the base recipe's symmetry; a group size that does not divide a layer is no option
  for it. The base recipe keeps the algorithm, activations, calibration, embedding and head.
- Sensitivity, from one walk of the fp32 model over calibration windows: for every block linear and option the
  output error e = tr((W - Ŵ) H (W - Ŵ)ᵀ), H = E[x xᵀ] of its input, Ŵ rounded by MSE-clipped round-to-nearest
  (cheap for every option; the base algorithm, e.g. GPTQ, rounds the chosen plan). Measured probes on held-out
  calibration windows turn errors into KLD: each block (or run of blocks, past MAX_PROBES) alone at the base
  recipe's scheme (weights only) gives its k_b = KLD_b / Σ e, and every block at the most precise option with
  the runtime's activation rounding gives the part the weights do not explain. A plan's estimated KLD is that
  part + Σ k_b e_l: additive, and blind to the head's and embedding's rounding and to errors compounding
  across blocks (on stories260K it came out at about half the measured figure), which is why the result is
  measured.
- Choice: an exact multiple-choice knapsack over stored bytes (dynamic programming in units of the byte sizes'
  common divisor), which gives the best estimate at every size at once: the curve.
- After quantizing, the eager quantized model is measured on other held-out calibration windows; with
  ``--max-kld`` an estimate found optimistic is corrected (measured / estimated after one round, a line
  through the last two rounds' figures after more) and the plan redone, at most MAX_ROUNDS times.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
import torch

from edgeforge.checkpoints import Checkpoint
from edgeforge.checkpoints.loading import expected_shapes
from edgeforge.errors import ConfigError, GateFailed, UnsupportedError
from edgeforge.fileio import write_json_atomic, write_text_atomic
from edgeforge.models import architecture
from edgeforge.models.architecture import DECODER
from edgeforge.quantize.activations import ActivationNumerics
from edgeforge.quantize.algorithms import GroupStatistics, Mse
from edgeforge.quantize.calibration import CalibrationSet, held_out_windows
from edgeforge.quantize.checkpoint import load_quantized_model
from edgeforge.quantize.driver import BATCH, QuantizeResult, quantize_checkpoint
from edgeforge.quantize.gptq import HessianAccumulator
from edgeforge.quantize.metrics import kl_divergence_nats
from edgeforge.quantize.modules import QuantizedLinear, runtime_weight_scale, set_module
from edgeforge.quantize.recipe import LayerRule, Recipe
from edgeforge.quantize.record import MANIFEST, bits_per_weight, is_block_layer, scheme_label
from edgeforge.quantize.rotation import rotated_checkpoint
from edgeforge.quantize.scheme import ActivationScheme, WeightScheme, dequantize

INT4_GROUPS = (32, 64, 128, None)
PLAN_SAMPLES = 16  # calibration windows the sensitivity walk reads (the Hessians' inputs)
PROBE_WINDOWS = 2  # held-out windows each probe runs
MAX_PROBES = 10  # probes of blocks at the base scheme (consecutive blocks share one past this)
CHECK_WINDOWS = 4  # other held-out windows the finished checkpoint is measured on
MAX_ROUNDS = 3  # --max-kld: quantize, measure, tighten at most this often
MAX_UNITS = 1 << 18  # knapsack resolution cap: beyond it byte costs are rounded up (never over budget)
CURVE_POINTS = 16
PLAN_RECIPE = "plan-recipe.toml"


@dataclass(frozen=True)
class Request:
    """What the plan must meet: stored bits per weight over the block linears, or a mean KLD (nats)."""

    budget_bits: float | None = None
    max_kld: float | None = None

    def __post_init__(self):
        given = [(flag, value) for flag, value in (("--budget-bits", self.budget_bits), ("--max-kld", self.max_kld))
                 if value is not None]
        if len(given) != 1:
            raise ConfigError("give one of --budget-bits and --max-kld")
        flag, value = given[0]
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a positive number, got {value}")

    @property
    def text(self) -> str:
        return f"--budget-bits {self.budget_bits:g}" if self.budget_bits is not None else f"--max-kld {self.max_kld:g}"


def scheme_name(scheme: WeightScheme) -> str:
    """"int4 g32", "int8 per-channel", "int4 g64 asym"."""
    label = f"int{scheme.bits} " + (f"g{scheme.group_size}" if scheme.group_size else "per-channel")
    return label if scheme.symmetric else label + " asym"


def target_options(target, recipe: Recipe) -> tuple[WeightScheme, ...]:
    """The weight schemes the planner may give a block linear on ``target`` with ``recipe``'s activations."""
    options = []
    for bits, groups in ((4, INT4_GROUPS), (8, (None,))):
        if scheme_label(bits, recipe.activations.value) in target.schemes:
            options += [WeightScheme(bits, group, recipe.weights.symmetric) for group in groups]
    if not options:
        wanted = " or ".join(scheme_label(bits, recipe.activations.value) for bits in (4, 8))
        raise UnsupportedError(f"target {target.name} runs neither {wanted} ({', '.join(target.schemes)}): "
                               f"nothing to plan with recipe {recipe.name}")
    return tuple(options)


class Planner:
    """Checks a request against what the target can store (pre-flight, nothing read but shapes), then plans,
    quantizes and measures (:meth:`quantize`)."""

    def __init__(self, checkpoint: Checkpoint, recipe: Recipe, target, request: Request):
        if architecture(checkpoint.architecture).family != DECODER:
            raise UnsupportedError(f"{request.text} plans by KL divergence, which needs a decoder; "
                                   f"{checkpoint.architecture} is not one", path=checkpoint.path)
        if recipe.activations is ActivationScheme.STATIC_INT8:
            raise UnsupportedError(f"{request.text}: recipe {recipe.name} calibrates static activation ranges, "
                                   f"which the planner's probes do not; take a dynamic or weight-only recipe")
        self.checkpoint, self.recipe, self.target, self.request = checkpoint, recipe, target, request
        self.options = target_options(target, recipe)
        shapes = expected_shapes(checkpoint.architecture, checkpoint.config)
        names = [n for n in architecture(checkpoint.architecture).layer_widths(checkpoint.config) if is_block_layer(n)]
        self.shapes = {name: shapes[f"{name}.weight"] for name in names}
        # a group as wide as the layer is its per-channel option
        self.choices = {name: sorted((o for o in self.options
                                      if not o.group_size or (width % o.group_size == 0 and o.group_size < width)),
                                     key=lambda o, shape=(out, width): self.stored_bytes(o, shape))
                        for name, (out, width) in self.shapes.items()}
        smallest = self.bits({name: options[0] for name, options in self.choices.items()})
        if request.budget_bits is not None and request.budget_bits < smallest:
            used = Counter(scheme_name(options[0]) for options in self.choices.values())
            raise ConfigError(f"{request.text}: the smallest target {target.name} can store is {smallest:.3f} bits "
                              f"per weight ({', '.join(f'{k} on {n}' for k, n in used.most_common())} block "
                              f"linears)")

    def stored_bytes(self, scheme: WeightScheme, shape: tuple[int, int]) -> int:
        """Bytes the target's artifact stores for a ``scheme`` weight of ``shape``."""
        return self.target.activation_numerics.stored_bytes(scheme, shape, self.recipe.activations)

    def bits(self, schemes: dict[str, WeightScheme]) -> float:
        """Stored bits per weight of the block linears under ``schemes``."""
        return bits_per_weight({name: (self.shapes[name], scheme, self.recipe.activations)
                                for name, scheme in schemes.items()}, self.target.activation_numerics)

    def quantize(self, calibration: CalibrationSet | None, output_dir: str | Path, *, numerics: ActivationNumerics,
                 progress: Callable[[str], None] | None = None) -> QuantizeResult:
        """Measure sensitivities, choose, quantize with the base recipe's algorithm into ``output_dir`` (with the
        plan in its manifest and ``plan-recipe.toml`` beside it) and measure the result."""
        start = time.perf_counter()
        say = progress or (lambda message: None)
        if calibration is None:
            raise ConfigError(f"{self.request.text} measures each layer's sensitivity on calibration text: "
                              f"pass --calib PATH")
        settings = self.recipe.calibration
        held_out = held_out_windows(calibration.source, self.checkpoint.tokenizer, samples=settings.samples,
                                    seq_len=settings.seq_len, seed=settings.seed,
                                    count=PROBE_WINDOWS + CHECK_WINDOWS, length=settings.seq_len)
        probe_windows, check_windows = held_out[:PROBE_WINDOWS], held_out[PROBE_WINDOWS:]
        sensitivity = Sensitivity(self, calibration.tokens[:PLAN_SAMPLES], probe_windows, numerics, say)
        estimate = Knapsack(self, sensitivity)
        fit, rounds = (1.0, 0.0), []  # measured ≈ fit[0] * estimated + fit[1], from the rounds measured so far
        for round_index in range(1, MAX_ROUNDS + 1):
            schemes, estimated = estimate.choose(self.request, fit)
            recipe = self.plan_recipe(schemes)
            say(f"plan: {self.bits(schemes):.3f} bits per weight, estimated KLD {fit[0] * estimated + fit[1]:.4f} "
                f"({_summary(schemes)})")
            result = quantize_checkpoint(self.checkpoint, recipe, calibration=calibration, output_dir=output_dir,
                                         numerics=numerics, progress=progress)
            measured, sem = sensitivity.measure(load_quantized_model(output_dir), check_windows)
            say(f"measured KLD {measured:.4f} ± {sem:.4f} on {len(check_windows)} held-out calibration windows")
            met = self.request.max_kld is None or measured <= self.request.max_kld
            if met or schemes == estimate.largest or round_index == MAX_ROUNDS:
                break
            rounds.append((estimated, measured))
            fit = _refit(rounds)
        plan = self._record(schemes, estimated, fit, measured, sem, len(check_windows), round_index, met, estimate)
        record = dataclasses.replace(result.record, plan=plan)
        write_text_atomic(Path(output_dir) / PLAN_RECIPE, recipe_toml(recipe))
        write_json_atomic(Path(output_dir) / MANIFEST, record.to_dict())
        if not met:
            raise GateFailed(f"{self.request.text}: the plan measured KLD {measured:.4f} ± {sem:.4f} on held-out "
                             f"calibration windows after {round_index} round(s) "
                             f"({self.bits(schemes):.3f} bits per weight), kept in {output_dir}")
        return dataclasses.replace(result, record=record, seconds=time.perf_counter() - start)

    def plan_recipe(self, schemes: dict[str, WeightScheme]) -> Recipe:
        """The base recipe with one explicit rule per block linear (ahead of the base's own rules); its default
        scheme, which names the scheme family (8da4w, ...) the tolerances go by, is the narrowest one used."""
        narrowest = min(scheme.bits for scheme in schemes.values())
        common = Counter(s for s in schemes.values() if s.bits == narrowest).most_common(1)[0][0]
        rules = tuple(LayerRule(f"^{re.escape(name)}$", scheme) for name, scheme in schemes.items())
        description = (f"{self.recipe.name} planned for {self.target.name} with {self.request.text}: "
                       f"{self.bits(schemes):.3f} bits per weight over the block linears")
        return dataclasses.replace(self.recipe, name=Path(PLAN_RECIPE).stem, description=description,
                                   weights=common, rules=rules + self.recipe.rules)

    def _record(self, schemes, estimated, fit, measured, sem, windows, rounds, met, estimate) -> dict:
        return {"request": {"budget_bits": self.request.budget_bits, "max_kld": self.request.max_kld},
                "target": self.target.name, "base_recipe": self.recipe.name,
                "options": [scheme_name(o) for o in self.options],
                "bits_per_weight": self.bits(schemes), "layers": _summary(schemes),
                "estimated_kld": fit[0] * estimated + fit[1], "estimate_fit": list(fit),
                "measured_kld": measured, "measured_kld_sem": sem,
                "measured_on": f"{windows} held-out calibration windows of {self.recipe.calibration.seq_len} tokens",
                "met": met, "rounds": rounds, "curve": estimate.curve(fit),
                "uniform": estimate.uniform(fit), "recipe_file": PLAN_RECIPE}


def _refit(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    """(scale, shift) with measured ≈ scale * estimated + shift: through the last two rounds (a secant step;
    the part no probe saw, such as the head's and embedding's rounding, is a shift), else a ratio."""
    (e1, m1), (e2, m2) = ((0.0, 0.0), *rounds)[-2:]
    scale = (m2 - m1) / (e2 - e1) if e2 != e1 else math.inf
    if len(rounds) == 1 or not 0 < scale < math.inf:
        return (m2 / e2 if e2 > 0 else math.inf), 0.0
    return scale, m2 - scale * e2


def _summary(schemes: dict[str, WeightScheme]) -> str:
    return ", ".join(f"{n} x {k}" for k, n in Counter(scheme_name(s) for s in schemes.values()).most_common())


class Sensitivity:
    """Per layer and option, the estimated KLD a layer adds (k_b e_l), plus the part weights do not explain."""

    def __init__(self, planner: Planner, tokens: torch.Tensor, probe_windows: torch.Tensor,
                 numerics: ActivationNumerics, say: Callable[[str], None]):
        recipe, checkpoint = planner.recipe, planner.checkpoint
        self.numerics, self.activations = numerics, recipe.activations
        model = architecture(checkpoint.architecture)
        if recipe.rotation.any:  # measured on the weights the driver will round
            checkpoint = rotated_checkpoint(checkpoint, model, **vars(recipe.rotation))
        self.walk = model.walk(checkpoint, tokens.shape[1])
        rounding = Mse.from_recipe(recipe)
        probe_schemes = {name: recipe.scheme_for(name, width)[0] for name, (_, width) in planner.shapes.items()}
        self.blocks, self.errors, probe_weights, self.inputs = [], {}, {}, []
        with torch.no_grad():
            hidden = [self.walk.embed(batch) for batch in tokens.split(BATCH)]
            x = self.walk.embed(probe_windows)
            for block in self.walk.blocks():
                self.blocks.append(block)
                if block.head:
                    break
                memos = [{} for _ in hidden]
                for stage, group in enumerate(block.groups):
                    width = block.module.get_submodule(group.linears[0]).in_features
                    accumulator = HessianAccumulator(width)
                    for batch, memo in zip(hidden, memos):
                        accumulator.add(block.group_input(stage, batch, memo))
                    statistics = GroupStatistics(accumulator.hessian())
                    for short in group.linears:
                        name = block.prefix + short
                        weight = block.module.get_submodule(short).weight.float()
                        quantized = {o: rounding.round(weight, o, statistics)
                                     for o in {*planner.choices[name], probe_schemes[name]} - {None}}
                        self.errors[name] = {o: self._output_error(weight, q, statistics.hessian)
                                             for o, q in quantized.items()}
                        probe_weights[name] = {"probe": quantized.get(probe_schemes[name]),
                                               "top": quantized[planner.choices[name][-1]]}
                hidden = [block.forward(batch, memo) for batch, memo in zip(hidden, memos)]
                self.inputs.append(x)
                x = block.forward(x, {})
                say(f"sensitivity {block.label}: {len(self.errors)} layers x {len(planner.options)} options")
            self.reference = self._logits(0, x=None, head_input=x)
            self.factors = {}
            span = -(-(len(self.blocks) - 1) // MAX_PROBES)  # consecutive blocks probed together
            for start in range(0, len(self.blocks) - 1, span):
                blocks = self.blocks[start:start + span]
                names = [block.prefix + s for block in blocks for g in block.groups for s in g.linears]
                swap = {n: (probe_weights[n]["probe"], probe_schemes[n], ActivationScheme.NONE) for n in names
                        if probe_weights[n]["probe"] is not None}
                kld = self._probe(start, swap)
                energy = sum(self.errors[n][probe_schemes[n]] for n in swap)
                self.factors.update({n: kld / energy if energy > 0 else 0.0 for n in names})
                say(f"probe {blocks[0].label}..{blocks[-1].label} at the base scheme: KLD {kld:.5f}")
            top = {n: (w["top"], planner.choices[n][-1], self.activations) for n, w in probe_weights.items()}
            explained = sum(self.factors[n] * self.errors[n][planner.choices[n][-1]] for n in top)
            self.offset = max(self._probe(0, top) - explained, 0.0)
            say(f"probe every block at its most precise option: KLD beyond the weights' {self.offset:.5f}")

    def layer_kld(self, name: str, scheme: WeightScheme) -> float:
        return self.factors[name] * self.errors[name][scheme]

    def _output_error(self, weight, quantized, hessian) -> float:
        runtime = dequantize(quantized.qdata, runtime_weight_scale(quantized.scale, self.numerics),
                             quantized.zero_point)
        delta = weight - runtime
        return float(((delta @ hessian) * delta).sum())

    def _logits(self, start: int, x: torch.Tensor | None, head_input: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from block ``start`` on (fp32 except what is swapped in), or the head alone on ``head_input``."""
        if head_input is None:
            for block in self.blocks[start:-1]:
                x = block.forward(x, {})
            head_input = x
        head = self.blocks[-1]
        weight = head.module.get_submodule(head.groups[0].linears[0]).weight  # may be stored in bf16
        return torch.nn.functional.linear(head.group_input(0, head_input, {}), weight.float())

    def _probe(self, start: int, swap: dict) -> float:
        """Mean KLD against fp32 on the probe windows with ``swap`` (name -> weight, scheme, activations) in."""
        modules = {block.prefix: block.module for block in self.blocks[:-1]}
        originals = {}
        for name, (weight, scheme, activations) in swap.items():
            prefix, short = _split(name, modules)
            originals[name] = modules[prefix].get_submodule(short)
            set_module(modules[prefix], short, QuantizedLinear(weight, scheme, activations, numerics=self.numerics))
        try:
            with torch.no_grad():
                logits = self._logits(start, self.inputs[start])
        finally:
            for name, module in originals.items():
                prefix, short = _split(name, modules)
                set_module(modules[prefix], short, module)
        return float(torch.cat([_token_kld(r, t) for r, t in zip(self.reference, logits)]).mean())

    def measure(self, quantized: torch.nn.Module, windows: torch.Tensor) -> tuple[float, float]:
        """Mean KLD (and its standard error over windows) of ``quantized`` against fp32 on ``windows``."""
        per_window = []
        with torch.no_grad():
            for window in windows.split(1):
                reference = self._logits(0, self.walk.embed(window))
                per_window.append(float(_token_kld(reference[0], quantized(window)[0]).mean()))
        values = torch.tensor(per_window, dtype=torch.float64)
        sem = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
        return float(values.mean()), sem


def _split(name: str, modules: dict) -> tuple[str, str]:
    prefix = next(p for p in modules if name.startswith(p))
    return prefix, name[len(prefix):]


def _token_kld(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return kl_divergence_nats(reference.double().log_softmax(-1), logits.double().log_softmax(-1))


class Knapsack:
    """Minimum estimated KLD for every total size: dp over layers in byte units (a common divisor of the
    options' byte differences, or coarser with costs rounded up past MAX_UNITS)."""

    def __init__(self, planner: Planner, sensitivity: Sensitivity):
        self.planner, self.offset = planner, sensitivity.offset
        self.names = list(planner.choices)
        base = {n: planner.stored_bytes(planner.choices[n][0], planner.shapes[n]) for n in self.names}
        extra = {n: [planner.stored_bytes(o, planner.shapes[n]) - base[n] for o in planner.choices[n]]
                 for n in self.names}
        self.kld = {n: [sensitivity.layer_kld(n, o) for o in planner.choices[n]] for n in self.names}
        self.weights = sum(out * width for out, width in planner.shapes.values())
        self.base_bytes = sum(base.values())
        unit = reduce(math.gcd, (c for costs in extra.values() for c in costs), 0) or 1
        span = sum(costs[-1] for costs in extra.values())
        self.unit = max(unit, -(-span // MAX_UNITS))
        self.costs = {n: [-(-c // self.unit) for c in extra[n]] for n in self.names}
        self.capacity = sum(costs[-1] for costs in self.costs.values())
        best = np.zeros(self.capacity + 1)
        self.argmins = []
        for name in self.names:
            new = np.full_like(best, np.inf)
            argmin = np.zeros(best.shape, dtype=np.int8)
            for index, (cost, kld) in enumerate(zip(self.costs[name], self.kld[name])):
                candidate = np.full_like(best, np.inf)
                candidate[cost:] = best[:len(best) - cost] + kld
                better = candidate < new
                new[better], argmin[better] = candidate[better], index
            best = new
            self.argmins.append(argmin)
        self.best = best  # non-increasing: best[c] is over every plan of at most c units
        self.largest = self._plan(self.capacity)

    def _units(self, bits: float) -> int:
        return min(math.floor((bits * self.weights / 8 - self.base_bytes) / self.unit), self.capacity)

    def _plan(self, units: int) -> dict[str, WeightScheme]:
        chosen = {}
        for name, argmin in zip(reversed(self.names), reversed(self.argmins)):
            index = int(argmin[units])
            chosen[name] = self.planner.choices[name][index]
            units -= self.costs[name][index]
        return {name: chosen[name] for name in self.names}

    def choose(self, request: Request, fit: tuple[float, float]) -> tuple[dict[str, WeightScheme], float]:
        """The plan for ``request``, estimates corrected by ``fit`` (scale, shift), and its uncorrected estimate."""
        if request.budget_bits is not None:
            units = self._units(request.budget_bits)
        else:
            bound = (request.max_kld - fit[1]) / fit[0] - self.offset
            reachable = np.nonzero(self.best <= bound)[0]
            units = int(reachable[0]) if len(reachable) else self.capacity
        return self._plan(units), self.offset + float(self.best[units])

    def curve(self, fit: tuple[float, float]) -> list[dict]:
        """Estimated KLD against bits per weight for budgets from the smallest to the largest plan."""
        low, high = 8 * self.base_bytes / self.weights, 8 * (self.base_bytes + self.capacity * self.unit) / self.weights
        points = []
        for step in range(CURVE_POINTS):
            units = self._units(low + (high - low) * step / (CURVE_POINTS - 1)) if step < CURVE_POINTS - 1 \
                else self.capacity
            points.append({"bits_per_weight": self.planner.bits(self._plan(units)),
                           "estimated_kld": fit[0] * (self.offset + float(self.best[units])) + fit[1]})
        return points

    def estimate(self, schemes: dict[str, WeightScheme]) -> float:
        """The estimated KLD of giving each block linear ``schemes[name]`` (one of its options)."""
        return self.offset + sum(self.kld[n][self.planner.choices[n].index(s)] for n, s in schemes.items())

    def uniform(self, fit: tuple[float, float]) -> list[dict]:
        """Every option that fits every block linear, given to all of them: its size and estimated KLD."""
        rows = []
        for option in self.planner.options:
            if all(option in self.planner.choices[n] for n in self.names):
                schemes = dict.fromkeys(self.names, option)
                rows.append({"scheme": scheme_name(option), "bits_per_weight": self.planner.bits(schemes),
                             "estimated_kld": fit[0] * self.estimate(schemes) + fit[1]})
        return rows


def recipe_toml(recipe: Recipe) -> str:
    """``recipe`` as a recipe TOML file that :func:`edgeforge.quantize.recipe.load_recipe` reads back."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in
             (("description", recipe.description), ("algorithm", recipe.algorithm),
              ("activations", recipe.activations.value), ("fallback", recipe.fallback))]
    for key in ("weights", "embedding", "output"):
        scheme = getattr(recipe, key)
        if scheme is not None:
            lines += ["", f"[{key}]", *_scheme_lines(scheme)]
    for field in dataclasses.fields(recipe):  # the settings tables: [calibration], [gptq], ...
        settings = getattr(recipe, field.name)
        if dataclasses.is_dataclass(settings) and not isinstance(settings, WeightScheme):
            lines += ["", f"[{field.name}]", *(f"{k} = {_toml_value(v)}" for k, v in vars(settings).items())]
    if recipe.gates:
        lines += ["", "[gates]", *(f"{k} = {_toml_value(v)}" for k, v in recipe.gates.items())]
    for rule in recipe.rules:
        lines += ["", "[[override]]", f"match = '{rule.pattern}'",
                  *(_scheme_lines(rule.scheme) if rule.scheme is not None else ["keep = true"])]
    return "\n".join(lines) + "\n"


def _scheme_lines(scheme: WeightScheme) -> list[str]:
    lines = [f"bits = {scheme.bits}", f"symmetric = {_toml_value(scheme.symmetric)}"]
    return lines + ([f"group_size = {scheme.group_size}"] if scheme.group_size else [])


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
