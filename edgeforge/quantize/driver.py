"""Block-by-block quantization: checkpoint + recipe + calibration text -> quantized checkpoint directory.

One decoder block is read from the checkpoint at a time (tensors are read lazily), so peak memory
is about one fp32 block, the calibration activations and the quantized result, not the fp32 model.
Inside a block the four groups of linears that share an input are handled in order
(qkv, wo, gate/up, down). Each group's input is computed with the groups before it already
quantized, so GPTQ corrects the error that really reaches it ("true sequential").
AWQ and SmoothQuant first fold per-channel scales into the op producing each group's input
(an exact rewrite of the fp32 block), then the weights are rounded.

Calibration sees the target runtime's arithmetic (``numerics``, see :mod:`edgeforge.quantize.activations`):
a finished linear computes as a QuantizedLinear with those numerics for everything downstream of it (later
groups, later blocks), so GPTQ's Hessians and AWQ/SmoothQuant's statistics are of the inputs the device
feeds each layer. With dynamic int8 activations AWQ's search and the sensitivity probe also round a layer's
own input as the runtime does; GPTQ's Hessian does not (its linear error model cannot see that rounding,
and on stories260K int4-gptq a Hessian of the rounded inputs gave KLD 0.0770 against 0.0750).

This is our own driver rather than torchao's GPTQ/AWQ flows: those are prototypes that expect the
whole model in memory and hook every linear at once, which is what streaming must avoid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

from edgeforge import __version__
from edgeforge.checkpoints import Checkpoint, load_model
from edgeforge.checkpoints.tokenizers import TOKENIZER_FILES, tokenizer_policy
from edgeforge.errors import ConfigError, InputError, UnsupportedError
from edgeforge.fileio import atomic_directory
from edgeforge.models.llama import LlamaConfig, RMSNorm, TransformerBlock, rope_tables
from edgeforge.quantize.activations import (
    DEFAULT_NUMERICS,
    ActivationNumerics,
    quantize_activations_dynamic,
    static_activation_qparams,
)
from edgeforge.quantize.awq import awq_search_scales
from edgeforge.quantize.calibration import CalibrationSet
from edgeforge.quantize.checkpoint import KIND, SCHEMA_VERSION, ShardWriter, layer_tensors, save_quantized
from edgeforge.quantize.fold import fold_scales_into_linear, fold_scales_into_norm
from edgeforge.quantize.gptq import HessianAccumulator, InverseHessian, gptq_quantize, prepare_hessian
from edgeforge.quantize.metrics import sqnr_db
from edgeforge.quantize.modules import QuantizedLinear, runtime_weight_scale, set_module
from edgeforge.quantize.recipe import Recipe
from edgeforge.quantize.rtn import mse_clip_search, rtn_quantize
from edgeforge.quantize.scheme import ActivationScheme, QuantizedWeight, WeightScheme, dequantize
from edgeforge.quantize.smoothquant import smoothquant_scales

# (op producing the shared input, linears reading it), in block order
GROUPS = (
    ("attention_norm", ("attention.wq", "attention.wk", "attention.wv")),
    ("attention.wv", ("attention.wo",)),
    ("ffn_norm", ("feed_forward.w1", "feed_forward.w3")),
    ("feed_forward.w3", ("feed_forward.w2",)),
)
BATCH = 8  # calibration sequences per forward
PROBE_ROWS = 2048  # token rows kept per group for AWQ's search and the sensitivity table
ROW_CHUNK = 8192  # output rows quantized at a time: bounds the temporaries of a 128k-row head
CLIPPING = {"mse", "awq", "gptq", "awq+gptq"}  # int4 scales from an MSE clip search (AWQ's auto-clip)


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
    manifest: dict
    seconds: float


def plan_layers(config: LlamaConfig, recipe: Recipe) -> dict[str, LayerPlan]:
    """Every quantizable layer's scheme, with fallbacks applied, in execution order."""
    widths = {"attention.wq": config.dim, "attention.wk": config.dim, "attention.wv": config.dim,
              "attention.wo": config.n_heads * config.head_dim, "feed_forward.w1": config.dim,
              "feed_forward.w3": config.dim, "feed_forward.w2": config.hidden_dim}
    plans = {}
    if recipe.embedding is not None:
        scheme, note = recipe.embedding, None
        if scheme.group_size and config.dim % scheme.group_size:
            scheme, note = WeightScheme(8, None, scheme.symmetric), (
                f"group size {scheme.group_size} does not divide width {config.dim}: int8 per-channel")
        plans["tok_embeddings"] = LayerPlan("tok_embeddings", config.dim, scheme, note)
    for index in range(config.n_layers):
        for _, linears in GROUPS:
            for short in linears:
                name = f"layers.{index}.{short}"
                plans[name] = LayerPlan(name, widths[short], *recipe.scheme_for(name, widths[short]))
    plans["output"] = LayerPlan("output", config.dim, *recipe.scheme_for("output", config.dim))
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
    with atomic_directory(output_dir) as tmp:
        weights = ShardWriter(tmp)
        if checkpoint.architecture == "bert":
            config = checkpoint.config
            stats, plans = _quantize_encoder(checkpoint, recipe, calibration, weights, say)
        else:
            config = replace(checkpoint.config, tie_embeddings=False)
            plans = plan_layers(checkpoint.config, recipe)
            for plan in plans.values():
                if plan.note:
                    say(f"fallback {plan.name}: {plan.note}")
            stats = _BlockQuantizer(checkpoint, recipe, plans, calibration, weights, numerics).run(say)
        weights.close()
        manifest = {
            "kind": KIND, "schema_version": SCHEMA_VERSION, "architecture": checkpoint.architecture,
            "config": config.to_dict(),
            "source": {"path": str(checkpoint.path), "format": checkpoint.format, "sha256": checkpoint.content_hash()},
            "recipe": recipe.to_dict(),
            "calibration": calibration.describe() if calibration is not None else None,
            "tokenizer": tokenizer_policy(checkpoint.tokenizer),
            "activation_numerics": numerics.value,
            "layers": stats,
            "fallbacks": {p.name: p.note for p in plans.values() if p.note},
            "versions": {"edgeforge": __version__, "torch": torch.__version__, "torchao": _version("torchao")},
        }
        save_quantized(tmp, manifest=manifest,
                       fingerprints=calibration.document_fingerprints if calibration is not None else None,
                       tokenizer=checkpoint.tokenizer)
    return QuantizeResult(Path(output_dir), manifest, time.perf_counter() - start)


def _quantize_encoder(checkpoint: Checkpoint, recipe: Recipe, calibration: CalibrationSet | None, out: ShardWriter,
                      say: Callable[[str], None]):
    """Sentence encoders (small: loaded whole): round-to-nearest of every linear and the word embedding if the
    recipe says, after SmoothQuant when the recipe asks for it."""
    if recipe.algorithm not in ("rtn", "mse", "smoothquant") or recipe.activations is ActivationScheme.STATIC_INT8:
        raise UnsupportedError(f"recipe {recipe.name}: sentence encoders take rtn, mse or smoothquant recipes "
                               f"without static activations, e.g. embedding-int8")
    model = load_model(checkpoint)
    multipliers = _encoder_smoothing(model, recipe, calibration) if recipe.algorithm == "smoothquant" else {}
    stats, plans = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            scheme, note = recipe.scheme_for(name, module.in_features)
        elif name == "embeddings.word_embeddings":
            scheme, note = recipe.embedding, None
        else:
            continue
        plans[name] = LayerPlan(name, module.weight.shape[1], scheme, note)
        if scheme is None:
            continue
        weight = module.weight.detach()
        multiplier = multipliers.get(name)
        smoothed = weight / multiplier if multiplier is not None else weight
        clip = mse_clip_search(smoothed, scheme, grid=recipe.mse.grid) if recipe.algorithm == "mse" else None
        quantized = rtn_quantize(smoothed, scheme, clip_ratio=clip)
        out.update(layer_tensors(name, quantized, scheme, input_multiplier=multiplier))
        stats[name] = {"scheme": scheme.to_dict(), "algorithm": recipe.algorithm,
                       "activations": "none" if name.startswith("embeddings") else recipe.activations.value,
                       "weight_sqnr_db": sqnr_db(smoothed, dequantize(*quantized))}
    for name, tensor in model.state_dict().items():
        if name.removesuffix(".weight") not in stats:
            out[name] = tensor.detach().clone()
    say(f"quantized {len(stats)} layers of the {checkpoint.architecture} encoder"
        + (f", {len(multipliers)} smoothed (alpha {recipe.smoothquant.alpha})" if multipliers else ""))
    return stats, plans


def _encoder_smoothing(model: torch.nn.Module, recipe: Recipe, calibration: CalibrationSet) -> dict[str, torch.Tensor]:
    """SmoothQuant for a post-norm encoder: linear name -> input multiplier 1/s.

    In BERT a LayerNorm's output feeds the residual stream as well as the next linears, so s cannot be
    folded into it exactly; the linears keep 1/s as an explicit per-channel multiply (one cheap op).
    Linears that read the same tensor (query/key/value) share one s, from their weights together."""
    absmax: dict[str, torch.Tensor] = {}
    first_inputs: dict[str, torch.Tensor] = {}  # kept alive to the end, so two live tensors never share an id

    def observe(name):
        def hook(module, args):
            x = args[0].detach()
            channel_max = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
            absmax[name] = torch.maximum(absmax[name], channel_max) if name in absmax else channel_max
            first_inputs.setdefault(name, args[0])
        return hook

    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    handles = [module.register_forward_pre_hook(observe(name)) for name, module in linears.items()]
    try:
        with torch.no_grad():
            for batch in calibration.tokens.split(BATCH):
                model(batch, torch.ones_like(batch))
    finally:
        for handle in handles:
            handle.remove()
    readers: dict[int, list[str]] = {}  # one input tensor -> the linears reading it
    for name, x in first_inputs.items():
        readers.setdefault(id(x), []).append(name)
    multipliers = {}
    for names in readers.values():
        scales = smoothquant_scales(absmax[names[0]], [linears[n].weight for n in names],
                                    alpha=recipe.smoothquant.alpha)
        multipliers.update(dict.fromkeys(names, 1 / scales))
    return multipliers


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class _BlockQuantizer:
    """Holds the calibration hidden states and walks the blocks; finished tensors go to ``out`` as they come."""

    def __init__(self, checkpoint: Checkpoint, recipe: Recipe, plans: dict[str, LayerPlan],
                 calibration: CalibrationSet | None, out: ShardWriter, numerics: ActivationNumerics):
        self.checkpoint, self.recipe, self.plans = checkpoint, recipe, plans
        self.config: LlamaConfig = checkpoint.config
        self.algorithm = recipe.algorithm
        self.activations = recipe.activations
        self.numerics = numerics
        self.out = out
        self.stats: dict[str, dict] = {}
        tokens = calibration.tokens if calibration is not None else None
        self.batches = list(tokens.split(BATCH)) if tokens is not None else []
        seq_len = tokens.shape[1] if tokens is not None else 1
        self.cos, self.sin = rope_tables(self.config, seq_len)

    def run(self, say: Callable[[str], None]) -> dict[str, dict]:
        """Quantize everything; returns the per-layer stats."""
        embedding = self.checkpoint.tensors.stored("tok_embeddings.weight")  # 128k rows: stay bf16, chunk to fp32
        hidden = [F.embedding(batch, embedding).float() for batch in self.batches]
        self._quantize_embedding(embedding)
        del embedding
        total = self.config.n_layers
        for index in range(total):
            started = time.perf_counter()
            block = self._load_block(index)
            with torch.no_grad():
                hidden = self._quantize_block(block, index, hidden)
            summary = ", ".join(f"{name.split('.')[-1]} {_error_text(self.stats.get(f'layers.{index}.{name}'))}"
                                for _, names in GROUPS for name in names)
            say(f"[{index + 1}/{total}] layers.{index} {time.perf_counter() - started:.1f}s rel.err {summary}")
        with torch.no_grad():
            self._quantize_head(hidden)
        say(f"[head] output {_error_text(self.stats.get('output'))} rel.err")
        return self.stats

    # -- pieces ---------------------------------------------------------------------------------

    def _load_block(self, index: int) -> TransformerBlock:
        with torch.device("meta"):
            block = TransformerBlock(self.config)
        prefix = f"layers.{index}."
        block.load_state_dict({name: self.checkpoint.tensors[prefix + name] for name in block.state_dict()},
                              assign=True)
        return block.eval()

    def _quantize_embedding(self, embedding: torch.Tensor) -> None:
        plan = self.plans.get("tok_embeddings")
        if plan is None:
            self.out["tok_embeddings.weight"] = embedding.float()
            return
        weight = _concat([rtn_quantize(rows.float(), plan.scheme) for rows in embedding.split(ROW_CHUNK)])
        self.out.update(layer_tensors("tok_embeddings", weight, plan.scheme))
        stats = self._layer_stats("tok_embeddings", plan.scheme, embedding, weight, None)
        self.stats["tok_embeddings"] = {**stats, "activations": "none", "algorithm": "rtn"}

    def _stage_inputs(self, block: TransformerBlock, hidden: list[torch.Tensor], stage: int):
        """Per batch, the input of GROUPS[stage] given the block's current weights (and h after attention)."""
        for x in hidden:
            if stage == 0:
                yield block.attention_norm(x)
                continue
            attn_in = _attention_context(block, block.attention_norm(x), self.cos, self.sin)
            if stage == 1:
                yield attn_in
                continue
            h = x + block.attention.wo(attn_in)
            z = block.ffn_norm(h)
            yield z if stage == 2 else F.silu(block.feed_forward.w1(z)) * block.feed_forward.w3(z)

    def _quantize_block(self, block: TransformerBlock, index: int, hidden: list[torch.Tensor]):
        if self.algorithm in ("awq", "awq+gptq", "smoothquant") and hidden:
            self._fold_scales(block, index, hidden)
        for stage, (_, linears) in enumerate(GROUPS):
            modules = {f"layers.{index}.{short}": block.get_submodule(short) for short in linears}
            self._quantize_group(modules, lambda s=stage: self._stage_inputs(block, hidden, s), block=block)
        for norm in ("attention_norm", "ffn_norm"):  # AWQ/SmoothQuant may have rescaled them
            self.out[f"layers.{index}.{norm}.weight"] = block.get_submodule(norm).weight.detach().clone()
        return [block(x, self.cos, self.sin) for x in hidden]

    def _fold_scales(self, block: TransformerBlock, index: int, hidden: list[torch.Tensor]) -> None:
        """AWQ / SmoothQuant: choose per-channel scales on the fp32 block and fold them in exactly."""
        n_heads, n_kv = self.config.n_heads, self.config.n_kv_heads
        probes = [_probe_rows(self._stage_inputs(block, hidden, stage)) for stage in range(len(GROUPS))]
        for (producer, linears), rows in zip(GROUPS, probes):
            if producer == "attention.wv" and n_heads != n_kv:
                continue  # grouped-query attention: wv rows feed several wo columns, nothing exact to fold
            modules = [block.get_submodule(short) for short in linears]
            weights = [m.weight for m in modules]
            schemes = [self.plans[f"layers.{index}.{short}"].scheme for short in linears]
            if any(s is None for s in schemes):
                continue
            if self.algorithm == "smoothquant":
                scales = smoothquant_scales(rows.abs().amax(dim=0), weights, alpha=self.recipe.smoothquant.alpha)
            else:
                scales = awq_search_scales(weights, rows, schemes[0], grid=self.recipe.awq.grid,
                                           quantize_inputs=self._runtime_inputs(schemes[0]))
            producer_module = block.get_submodule(producer)
            if producer.endswith("norm"):
                new_producer, new_weights = fold_scales_into_norm(producer_module.weight, weights, scales)
            else:
                new_producer, new_weights = fold_scales_into_linear(producer_module.weight, weights, scales)
            producer_module.weight = torch.nn.Parameter(new_producer, requires_grad=False)
            for module, weight in zip(modules, new_weights):
                module.weight = torch.nn.Parameter(weight, requires_grad=False)

    def _runtime_inputs(self, scheme: WeightScheme) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """How the runtime rounds the input of a linear with ``scheme`` (None: it does not)."""
        if self.activations is not ActivationScheme.DYNAMIC_INT8:
            return None
        group_size = scheme.group_size
        return lambda x: quantize_activations_dynamic(x, self.numerics, group_size=group_size)

    def _quantize_group(self, modules: dict[str, torch.nn.Linear], inputs: Callable,
                        block: TransformerBlock | None = None) -> None:
        """Quantize linears sharing one input; in ``block`` each is then replaced by its QuantizedLinear, which
        computes as the runtime does for the groups and blocks after it."""
        plans = {name: self.plans[name] for name in modules}
        active = {name: m for name, m in modules.items() if plans[name].scheme is not None}
        if not active:
            for name, module in modules.items():
                self.out[f"{name}.weight"] = module.weight.detach().float().clone()
            return
        needs_hessian = self.algorithm in CLIPPING
        width = next(iter(modules.values())).in_features
        hessian = HessianAccumulator(width) if needs_hessian and self.batches else None
        low, high, probe = torch.tensor(float("inf")), torch.tensor(float("-inf")), []
        for x in inputs():
            if hessian is not None:
                hessian.add(x)
            low, high = torch.minimum(low, x.min()), torch.maximum(high, x.max())
            if sum(p.shape[0] for p in probe) < PROBE_ROWS:
                probe.append(x.reshape(-1, width))
        probe = torch.cat(probe)[:PROBE_ROWS] if probe else None
        input_qparams = static_activation_qparams(low, high) \
            if self.activations is ActivationScheme.STATIC_INT8 else None
        h = hessian.hessian() if hessian is not None else None
        del hessian  # its running sum is as large as h
        inverse = None
        if h is not None and self.algorithm in ("gptq", "awq+gptq"):  # one O(in³) inverse for the whole group
            inverse = prepare_hessian(h, damp=self.recipe.gptq.damp, act_order=self.recipe.gptq.act_order)
        for name, module in modules.items():
            scheme = plans[name].scheme
            if scheme is None:
                self.out[f"{name}.weight"] = module.weight.detach().float().clone()
                continue
            weight = module.weight.detach()  # the output head stays in its stored dtype; chunks go to fp32
            quantized = self._round(weight, scheme, h, inverse)
            self.out.update(layer_tensors(name, quantized, scheme, input_qparams))
            self.stats[name] = self._layer_stats(name, scheme, weight, quantized, probe)
            if block is not None:  # later groups and blocks read this layer's output as the runtime computes it
                set_module(block, name.split(".", 2)[2], QuantizedLinear(quantized, scheme, self.activations,
                                                                        input_qparams, numerics=self.numerics))

    def _round(self, weight: torch.Tensor, scheme: WeightScheme, hessian: torch.Tensor | None,
               inverse: InverseHessian | None) -> QuantizedWeight:
        """Quantize ``weight`` a chunk of rows at a time (every method here treats rows independently), so a
        128k-row head never needs more than a chunk's worth of temporaries."""
        return _concat([self._round_rows(rows, scheme, hessian, inverse) for rows in weight.split(ROW_CHUNK)])

    def _round_rows(self, rows: torch.Tensor, scheme: WeightScheme, hessian: torch.Tensor | None,
                    inverse: InverseHessian | None) -> QuantizedWeight:
        rows = rows.float()
        clip = None
        if self.algorithm in CLIPPING and scheme.bits == 4:
            moment = hessian.diagonal().float() if hessian is not None else None
            clip = mse_clip_search(rows, scheme, input_second_moment=moment, grid=self.recipe.mse.grid)
        if inverse is None:
            return rtn_quantize(rows, scheme, clip_ratio=clip)
        settings = self.recipe.gptq
        return gptq_quantize(rows, inverse, scheme, damp=settings.damp, block_size=settings.block_size,
                             act_order=settings.act_order, clip_ratio=clip)

    def _layer_stats(self, name, scheme, weight, quantized: QuantizedWeight, probe) -> dict:
        """Sensitivity of one layer: weight SQNR, and on calibration inputs the output error against fp32 next
        to plain RTN's. Accumulated over row chunks (the output head has 128k rows)."""
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
                reference = probe @ original.T
                sums["output"] += reference.pow(2).sum().item()
                sums["output_error"] += (reference - x_q @ dequantized.T).pow(2).sum().item()
                rtn_qdata, rtn_scale, rtn_zero = rtn_quantize(original, scheme)
                rtn = dequantize(rtn_qdata, runtime_weight_scale(rtn_scale, self.numerics), rtn_zero)
                sums["rtn_error"] += (reference - x_q @ rtn.T).pow(2).sum().item()
        record = {"scheme": scheme.to_dict(), "activations": self.activations.value, "algorithm": self.algorithm,
                  "weight_sqnr_db": _db(sums["weight"], sums["weight_error"])}
        if self.plans[name].note:
            record["fallback"] = self.plans[name].note
        if x_q is not None:
            record.update(rel_error=math.sqrt(sums["output_error"] / sums["output"]),
                          rel_error_rtn=math.sqrt(sums["rtn_error"] / sums["output"]),
                          output_sqnr_db=_db(sums["output"], sums["output_error"]))
        return record

    def _quantize_head(self, hidden: list[torch.Tensor]) -> None:
        """The final norm and output head (a separate copy even when the source ties it to the embedding)."""
        tensors = self.checkpoint.tensors
        final_norm = RMSNorm(self.config.dim, self.config.norm_eps)
        final_norm.weight = torch.nn.Parameter(tensors["norm.weight"], requires_grad=False)
        head = torch.nn.Linear(self.config.dim, self.config.vocab_size, bias=False)
        head_name = "output.weight" if "output.weight" in tensors else "tok_embeddings.weight"
        head.weight = torch.nn.Parameter(tensors.stored(head_name), requires_grad=False)
        plan = self.plans["output"]
        if self.algorithm in ("awq", "awq+gptq") and plan.scheme is not None and hidden:
            rows = _probe_rows(final_norm(x) for x in hidden)
            scales = awq_search_scales([head.weight], rows, plan.scheme, grid=self.recipe.awq.grid,
                                       quantize_inputs=self._runtime_inputs(plan.scheme))
            new_norm, (new_head,) = fold_scales_into_norm(final_norm.weight, [head.weight.float()], scales)
            final_norm.weight = torch.nn.Parameter(new_norm, requires_grad=False)
            head.weight = torch.nn.Parameter(new_head, requires_grad=False)
        self._quantize_group({"output": head}, lambda: (final_norm(x) for x in hidden))
        self.out["norm.weight"] = final_norm.weight.detach().clone()


def _attention_context(block: TransformerBlock, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """The attention output before ``wo`` (what ``wo`` reads)."""
    captured = []
    handle = block.attention.wo.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        block.attention(x, cos, sin)
    finally:
        handle.remove()
    return captured[0]


def _probe_rows(inputs) -> torch.Tensor:
    rows, count = [], 0
    for x in inputs:
        flat = x.reshape(-1, x.shape[-1])
        rows.append(flat)
        count += flat.shape[0]
        if count >= PROBE_ROWS:
            break
    return torch.cat(rows)[:PROBE_ROWS]


def _error_text(layer_stats: dict | None) -> str:
    if layer_stats is None:
        return "kept"
    return f"{layer_stats['rel_error']:.4f}" if "rel_error" in layer_stats else "rtn"


def _db(signal: float, noise: float) -> float:
    """10·log10(signal energy / noise energy): the SQNR of sums of squares (inf when exact)."""
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def _concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack row chunks of a quantized weight back into one."""
    zero = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])
    return QuantizedWeight(torch.cat([p.qdata for p in parts]), torch.cat([p.scale for p in parts]), zero)
