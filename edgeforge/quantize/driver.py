"""Block-by-block quantization: checkpoint + recipe + calibration text -> quantized checkpoint directory.

The checkpoint's architecture (:mod:`edgeforge.models.architecture`) walks the model one block at a time
(tensors are read lazily), so peak memory is about one fp32 block, the calibration activations and the
quantized result, not the fp32 model. Inside a block the groups of linears that share an input are handled in
order. Each group's input is computed with the groups before it already quantized, so GPTQ corrects the error
that really reaches it ("true sequential"). The recipe's algorithm (:mod:`edgeforge.quantize.algorithms`)
says what it observes, may first choose per-channel scales folded into the op producing each group's input
(AWQ, SmoothQuant: an exact rewrite of the fp32 block), and rounds the weights.

Calibration sees the target runtime's arithmetic (``numerics``, see :mod:`edgeforge.quantize.activations`):
a finished linear computes as a QuantizedLinear with those numerics for everything downstream of it (later
groups, later blocks), so GPTQ's Hessians and AWQ/SmoothQuant's statistics are of the inputs the device
feeds each layer. With dynamic int8 activations AWQ's search and the sensitivity probe also round a layer's
own input as the runtime does; GPTQ's Hessian does not (its linear error model cannot see that rounding,
and on stories260K int4-gptq a Hessian of the rounded inputs gave KLD 0.0770 against 0.0750).

Where the algorithm measures the drift (GPTQ with ``fp32_alignment``), the fp32 model's hidden states walk
beside the quantized ones: each block first runs in fp32 on them (before anything in it is folded or rounded),
which gives every group's fp32 input at the same positions and the next block's fp32 hidden states.

This is our own driver rather than torchao's GPTQ/AWQ flows: those are prototypes that expect the
whole model in memory and hook every linear at once, which is what streaming must avoid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeforge import __version__
from edgeforge.checkpoints import Checkpoint
from edgeforge.checkpoints.tokenizers import TOKENIZER_FILES, tokenizer_policy
from edgeforge.errors import ConfigError, InputError
from edgeforge.fileio import atomic_directory
from edgeforge.models import architecture
from edgeforge.provenance import package_versions
from edgeforge.models.architecture import Absorb, Architecture, Block
from edgeforge.quantize.activations import (
    DEFAULT_NUMERICS,
    ActivationNumerics,
    quantize_activations_dynamic,
    static_activation_qparams,
)
from edgeforge.quantize.algorithms import GroupStatistics, Rtn
from edgeforge.quantize.calibration import CalibrationSet
from edgeforge.quantize.checkpoint import ShardWriter, layer_tensors, save_quantized
from edgeforge.quantize.fold import fold_group_scales
from edgeforge.quantize.gptq import DriftAccumulator, HessianAccumulator
from edgeforge.quantize.metrics import energy_sqnr_db
from edgeforge.quantize.modules import QuantizedLinear, runtime_weight_scale, set_module
from edgeforge.quantize.recipe import Recipe
from edgeforge.quantize.record import (CalibrationRecord, CheckpointSource, QuantizedCheckpoint, QuantizedLayer,
                                       RecipeRecord)
from edgeforge.quantize.rotation import rotated_checkpoint
from edgeforge.quantize.rtn import rtn_quantize
from edgeforge.quantize.scheme import ActivationScheme, QuantizedWeight, WeightScheme, dequantize

BATCH = 8  # calibration sequences per forward
PROBE_ROWS = 2048  # token rows kept per group for AWQ's search and the sensitivity table
ROW_CHUNK = 8192  # output rows quantized at a time: bounds the temporaries of a 128k-row head


@dataclass(frozen=True)
class LayerPlan:
    """What one layer gets, decided before any long work (pre-flight)."""

    name: str
    in_features: int
    scheme: WeightScheme | None  # None: kept in full precision
    note: str | None = None  # why the recipe's scheme was replaced (fallback)


@dataclass
class QuantizeResult:
    output_dir: Path
    record: QuantizedCheckpoint
    seconds: float


def plan_layers(model: Architecture, config, recipe: Recipe) -> dict[str, LayerPlan]:
    """Every quantizable layer of ``model`` (an architecture) with ``config``: its scheme, with fallbacks
    applied, in execution order."""
    plans = {}
    if recipe.embedding is not None:
        scheme, note = recipe.embedding, None
        if scheme.group_size and config.dim % scheme.group_size:
            scheme, note = WeightScheme(8, None, scheme.symmetric), (
                f"group size {scheme.group_size} does not divide width {config.dim}: int8 per-channel")
        plans[model.embedding] = LayerPlan(model.embedding, config.dim, scheme, note)
    for name, width in model.layer_widths(config).items():
        plans[name] = LayerPlan(name, width, *recipe.scheme_for(name, width))
    return plans


def require_calibration_tokenizer(checkpoint: Checkpoint, recipe: Recipe) -> None:
    """Pre-flight, before any weight is read: InputError when the recipe calibrates on text and the
    checkpoint has no tokenizer to encode it with."""
    if recipe.needs_calibration and checkpoint.tokenizer is None:
        from edgeforge.quantize.recipe import list_recipes, load_recipe

        where = ("in the GGUF's metadata" if checkpoint.format == "gguf" else
                 f"({TOKENIZER_FILES}) beside the checkpoint")
        data_free = [name for name, path in list_recipes().items() if not load_recipe(path).needs_calibration]
        raise InputError(f"no tokenizer {where}; recipe {recipe.name} ({recipe.algorithm}) calibrates on text, "
                         f"which needs one: add it, or take a recipe without calibration ({', '.join(data_free)})",
                         path=checkpoint.path)


def quantize_checkpoint(checkpoint: Checkpoint, recipe: Recipe, *, calibration: CalibrationSet | None,
                        output_dir: str | Path, numerics: ActivationNumerics = DEFAULT_NUMERICS,
                        progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize ``checkpoint`` with ``recipe`` and write the quantized checkpoint to ``output_dir``.

    ``numerics``: the run-time arithmetic of the target runtime (a target's ``activation_numerics``), which
    calibration sees and the manifest records; the checkpoint still exports to any target."""
    start = time.perf_counter()
    require_calibration_tokenizer(checkpoint, recipe)
    if recipe.needs_calibration and calibration is None:
        raise ConfigError(f"recipe {recipe.name} ({recipe.algorithm}) needs calibration text: pass --calib PATH")
    say = progress or (lambda message: None)
    model = architecture(checkpoint.architecture)
    plans = plan_layers(model, checkpoint.config, recipe)
    if recipe.rotation.any:
        checkpoint = rotated_checkpoint(checkpoint, model, **vars(recipe.rotation))
        rotated = [part for part, on in (("residual stream", recipe.rotation.residual),
                                         ("value heads", recipe.rotation.heads)) if on]
        say(f"rotation: {' and '.join(rotated)} (seed {recipe.rotation.seed}), folded into the weights")
    inputs = [checkpoint.path, *checkpoint.files, calibration.source if calibration is not None else None]
    with atomic_directory(output_dir, inputs=inputs) as tmp:
        weights = ShardWriter(tmp)
        for plan in plans.values():
            if plan.note:
                say(f"fallback {plan.name}: {plan.note}")
        stats = _BlockQuantizer(checkpoint, model, recipe, plans, calibration, weights, numerics).run(say)
        weights.close()
        record = QuantizedCheckpoint(
            architecture=checkpoint.architecture, config=model.quantized_config(checkpoint.config).to_dict(),
            source=CheckpointSource(str(checkpoint.path), checkpoint.format, checkpoint.content_hash()),
            recipe=RecipeRecord(**recipe.to_dict()),
            calibration=CalibrationRecord(**calibration.describe()) if calibration is not None else None,
            tokenizer=tokenizer_policy(checkpoint.tokenizer), activation_numerics=numerics.value,
            layers={name: QuantizedLayer(**layer) for name, layer in stats.items()},
            fallbacks={p.name: p.note for p in plans.values() if p.note},
            versions={"edgeforge": __version__, "torch": torch.__version__, **package_versions("torchao")})
        save_quantized(tmp, record=record,
                       fingerprints=calibration.document_fingerprints if calibration is not None else None,
                       tokenizer=checkpoint.tokenizer)
    return QuantizeResult(Path(output_dir), record, time.perf_counter() - start)


class _BlockQuantizer:
    """Holds the calibration hidden states and walks the blocks; finished tensors go to ``out`` as they come."""

    def __init__(self, checkpoint: Checkpoint, model: Architecture, recipe: Recipe, plans: dict[str, LayerPlan],
                 calibration: CalibrationSet | None, out: ShardWriter, numerics: ActivationNumerics):
        self.checkpoint, self.model, self.plans = checkpoint, model, plans
        self.algorithm = recipe.algorithm_config
        self.activations = recipe.activations
        self.numerics = numerics
        self.out = out
        self.stats: dict[str, dict] = {}
        tokens = calibration.tokens if calibration is not None else None
        self.batches = list(tokens.split(BATCH)) if tokens is not None else []
        self.walk = model.walk(checkpoint, tokens.shape[1] if tokens is not None else 1)

    def run(self, say: Callable[[str], None]) -> dict[str, dict]:
        """Quantize everything; returns the per-layer stats."""
        self._quantize_embedding()
        with torch.no_grad():
            hidden = [self.walk.embed(batch) for batch in self.batches]
        reference = list(hidden) if self.algorithm.observe().drift else None  # the fp32 model's hidden states
        self.out.update({name: tensor.detach().float().clone() for name, tensor in self.walk.prologue().items()})
        total = self.checkpoint.config.n_layers
        for index, block in enumerate(self.walk.blocks()):
            started = time.perf_counter()
            with torch.no_grad():
                hidden, reference = self._quantize_block(block, hidden, reference)
            shorts = [short for group in block.groups for short in group.linears]
            errors = [f"{label} {_error_text(self.stats.get(block.prefix + short))}"
                      for short, label in zip(shorts, _labels(shorts))]
            say(f"[head] {' '.join(errors)} rel.err" if block.head else
                f"[{index + 1}/{total}] {block.label} {time.perf_counter() - started:.1f}s rel.err {', '.join(errors)}")
        return self.stats

    # -- pieces ---------------------------------------------------------------------------------

    def _quantize_embedding(self) -> None:
        name = self.model.embedding
        embedding = self.checkpoint.tensors.stored(f"{name}.weight")  # 128k rows: stay bf16, chunk to fp32
        plan = self.plans.get(name)
        if plan is None:
            self.out[f"{name}.weight"] = embedding.float()
            return
        weight = _concat([rtn_quantize(rows.float(), plan.scheme) for rows in embedding.split(ROW_CHUNK)])
        self.out.update(layer_tensors(name, weight, plan.scheme))
        stats = self._layer_stats(name, plan.scheme, embedding, weight, None)
        self.stats[name] = {**stats, "activations": "none", "algorithm": Rtn.name}

    def _quantize_block(self, block: Block, hidden: list[torch.Tensor],
                        reference: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Quantize ``block`` on the calibration hidden states; returns its outputs and, with ``reference`` (the
        fp32 model's hidden states), the fp32 block's."""
        fp32_inputs, reference = self._fp32_pass(block, reference) if reference is not None else (None, None)
        folds = self.algorithm.observe().scales and hidden
        multipliers, scales = self._fold_scales(block, hidden) if folds else ({}, {})
        if fp32_inputs is not None:  # a folded group reads x / s
            for stage, stage_scales in scales.items():
                fp32_inputs[stage] = [x / stage_scales for x in fp32_inputs[stage]]
        memos = [{} for _ in hidden]  # per batch, from the first group's input to the block's output
        for stage, group in enumerate(block.groups):
            multiplier = multipliers.get(stage)

            def inputs(stage=stage, multiplier=multiplier):
                for x, memo in zip(hidden, memos):
                    x = block.group_input(stage, x, memo)
                    yield x if multiplier is None else x * multiplier

            self._quantize_group(block, group.linears, inputs, multiplier,
                                 fp32_inputs[stage] if fp32_inputs is not None else None)
        rounded = {short for group in block.groups for short in group.linears
                   if self.plans[block.prefix + short].scheme is not None}
        for name, tensor in block.module.state_dict().items():  # norms, biases, kept linears
            owner, _, suffix = name.rpartition(".")
            if owner not in rounded or suffix == "bias":
                self.out[block.prefix + name] = tensor.detach().float().clone()
        outputs = [block.forward(x, memo) for x, memo in zip(hidden, memos)] if block.forward is not None else []
        return outputs, reference

    @staticmethod
    def _fp32_pass(block: Block, reference: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """The fp32 block, before anything in it is folded or rounded, on the fp32 model's hidden states: each
        group's input per batch (by stage) and the block's outputs."""
        inputs, outputs = [[] for _ in block.groups], []
        for x in reference:
            memo = {}
            for stage, stage_inputs in enumerate(inputs):
                stage_inputs.append(block.group_input(stage, x, memo))
            if block.forward is not None:
                outputs.append(block.forward(x, memo))
        return inputs, outputs

    def _fold_scales(self, block: Block,
                     hidden: list[torch.Tensor]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """AWQ / SmoothQuant: choose per-channel scales on the fp32 block and fold them in exactly; returns, by
        stage, the input multipliers of the groups whose producer cannot absorb them and every folded scale."""
        probes = [_probe_rows(block.group_input(stage, x, {}) for x in hidden) for stage in range(len(block.groups))]
        multipliers, folded = {}, {}
        for stage, (group, rows) in enumerate(zip(block.groups, probes)):
            schemes = [self.plans[block.prefix + short].scheme for short in group.linears]
            if group.absorb is Absorb.NONE or any(s is None for s in schemes):
                continue
            modules = [block.module.get_submodule(short) for short in group.linears]
            weights = [m.weight.float() for m in modules]
            scales = self.algorithm.fold(weights, rows, schemes[0], self._runtime_inputs(schemes[0]),
                                         head=block.head)
            if scales is None:
                continue
            new_weights, multiplier = fold_group_scales(block.module, group, weights, scales)
            for module, weight in zip(modules, new_weights):
                module.weight = torch.nn.Parameter(weight, requires_grad=False)
            folded[stage] = scales
            if multiplier is not None:
                multipliers[stage] = multiplier
        return multipliers, folded

    def _runtime_inputs(self, scheme: WeightScheme) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """How the runtime rounds the input of a linear with ``scheme`` (None: it does not)."""
        if self.activations is not ActivationScheme.DYNAMIC_INT8:
            return None
        group_size = scheme.group_size
        return lambda x: quantize_activations_dynamic(x, self.numerics, group_size=group_size)

    def _quantize_group(self, block: Block, linears: tuple[str, ...], inputs: Callable,
                        multiplier: torch.Tensor | None, fp32_inputs: list[torch.Tensor] | None) -> None:
        """Quantize linears sharing one input (``fp32_inputs``: the fp32 model's, per batch, where the algorithm
        measures the drift); each is then replaced by its QuantizedLinear, which computes as the runtime does for
        the groups and blocks after it."""
        active = [short for short in linears if self.plans[block.prefix + short].scheme is not None]
        if not active:
            return
        width = block.module.get_submodule(active[0]).in_features
        needs_hessian = self.algorithm.observe().hessian and self.batches
        hessian = HessianAccumulator(width) if needs_hessian else None
        drift = DriftAccumulator(width) if needs_hessian and fp32_inputs is not None else None
        low, high, probe = torch.tensor(float("inf")), torch.tensor(float("-inf")), []
        for batch, x in enumerate(inputs()):
            if hessian is not None:
                hessian.add(x)
            if drift is not None:
                drift.add(x, fp32_inputs[batch])
            low, high = torch.minimum(low, x.min()), torch.maximum(high, x.max())
            if sum(p.shape[0] for p in probe) < PROBE_ROWS:
                probe.append(x.reshape(-1, width))
        probe = torch.cat(probe)[:PROBE_ROWS] if probe else None
        fp32_probe = _probe_rows(fp32_inputs) if fp32_inputs is not None and probe is not None else None
        input_qparams = static_activation_qparams(low, high) \
            if self.activations is ActivationScheme.STATIC_INT8 else None
        statistics = GroupStatistics(hessian.hessian() if hessian is not None else None,
                                     drift.drift() if drift is not None else None)
        del hessian, drift  # their running sums are as large as the Hessian
        for short in active:
            name, linear = block.prefix + short, block.module.get_submodule(short)
            scheme = self.plans[name].scheme
            weight = linear.weight.detach()  # the output head stays in its stored dtype; chunks go to fp32
            # a chunk of rows at a time (every algorithm treats rows independently): a 128k-row head never
            # needs more than a chunk's worth of temporaries
            quantized = _concat([self.algorithm.round(rows.float(), scheme, statistics)
                                 for rows in weight.split(ROW_CHUNK)])
            self.out.update(layer_tensors(name, quantized, scheme, input_qparams, input_multiplier=multiplier))
            self.stats[name] = self._layer_stats(name, scheme, weight, quantized, probe, fp32_probe)
            bias = None if linear.bias is None else linear.bias.detach()
            set_module(block.module, short, QuantizedLinear(quantized, scheme, self.activations, input_qparams,
                                                            bias=bias, input_multiplier=multiplier,
                                                            numerics=self.numerics))

    def _layer_stats(self, name, scheme, weight, quantized: QuantizedWeight, probe, fp32_probe=None) -> dict:
        """Sensitivity of one layer: weight SQNR, and on calibration inputs the output error against fp32 next
        to plain RTN's: against the fp32 layer on the same inputs, or with ``fp32_probe`` (the fp32 model's inputs
        at the probe's positions) against the fp32 model's output. Accumulated over row chunks (the output head
        has 128k rows)."""
        x_q = None
        if probe is not None:
            runtime_inputs = self._runtime_inputs(scheme)
            x_q = runtime_inputs(probe) if runtime_inputs is not None else probe
        sums = dict.fromkeys(("weight", "weight_error", "output", "output_error", "rtn_error"), 0.0)
        for start in range(0, weight.shape[0], ROW_CHUNK):
            rows = slice(start, start + ROW_CHUNK)
            zero = None if quantized.zero_point is None else quantized.zero_point[rows]
            dequantized = dequantize(quantized.qdata[rows], runtime_weight_scale(quantized.scale[rows], self.numerics),
                                     zero)
            original = weight[rows].float()
            sums["weight"] += original.pow(2).sum().item()
            sums["weight_error"] += (original - dequantized).pow(2).sum().item()
            if x_q is not None:
                reference = (probe if fp32_probe is None else fp32_probe) @ original.T
                sums["output"] += reference.pow(2).sum().item()
                sums["output_error"] += (reference - x_q @ dequantized.T).pow(2).sum().item()
                rtn_qdata, rtn_scale, rtn_zero = rtn_quantize(original, scheme)
                rtn = dequantize(rtn_qdata, runtime_weight_scale(rtn_scale, self.numerics), rtn_zero)
                sums["rtn_error"] += (reference - x_q @ rtn.T).pow(2).sum().item()
        record = {"scheme": scheme.to_dict(), "activations": self.activations.value, "algorithm": self.algorithm.name,
                  "weight_sqnr_db": energy_sqnr_db(sums["weight"], sums["weight_error"])}
        if self.plans[name].note:
            record["fallback"] = self.plans[name].note
        if x_q is not None:
            record.update(rel_error=math.sqrt(sums["output_error"] / sums["output"]),
                          rel_error_rtn=math.sqrt(sums["rtn_error"] / sums["output"]),
                          output_sqnr_db=energy_sqnr_db(sums["output"], sums["output_error"]))
        return record


def _probe_rows(inputs) -> torch.Tensor:
    rows, count = [], 0
    for x in inputs:
        flat = x.reshape(-1, x.shape[-1])
        rows.append(flat)
        count += flat.shape[0]
        if count >= PROBE_ROWS:
            break
    return torch.cat(rows)[:PROBE_ROWS]


def _labels(names: list[str]) -> list[str]:
    """The shortest dotted suffix telling each name apart from the others ("wq"; "intermediate.dense")."""
    labels = []
    for name in names:
        parts = name.split(".")
        for count in range(1, len(parts) + 1):
            label = ".".join(parts[-count:])
            if sum(other == label or other.endswith("." + label) for other in names) == 1:
                break
        labels.append(label)
    return labels


def _error_text(layer_stats: dict | None) -> str:
    if layer_stats is None:
        return "kept"
    return f"{layer_stats['rel_error']:.4f}" if "rel_error" in layer_stats else "rtn"


def _concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack row chunks of a quantized weight back into one."""
    zero = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])
    return QuantizedWeight(torch.cat([p.qdata for p in parts]), torch.cat([p.scale for p in parts]), zero)
