"""Quantization commands: quantize, recipes."""

from __future__ import annotations

import json

import click

from edgeforge.cli import main, _checkpoint_argument, _open, _progress, _emit_json


@main.command()
@_checkpoint_argument()
@click.option("--recipe", "-r", help="Recipe name (see `edgeforge recipes`) or path to a recipe TOML (with "
                                    "--budget-bits/--max-kld the base recipe, default int4-gptq).")
@click.option("--calib", type=click.Path(path_type=str),
              help="Calibration text: a .txt file (blank-line separated), a .jsonl with a 'text' field, or a folder of .txt.")
@click.option("--samples", type=click.IntRange(1), help="Calibration samples (default: the recipe's).")
@click.option("--seq-len", type=click.IntRange(2), help="Tokens per calibration sample (default: the recipe's).")
@click.option("--seed", type=int, help="Seed for drawing calibration samples (default: the recipe's).")
@click.option("--target", "-t", help="Target (see `edgeforge targets`) whose runtime arithmetic calibration sees, "
                                     "e.g. onnx-cpu (default: XNNPACK's, as the ExecuTorch targets run).")
@click.option("--budget-bits", type=float, help="Choose per-layer schemes among the target's for at most this "
                                                "many stored bits per weight over the block linears, e.g. 5.5.")
@click.option("--max-kld", type=float, help="Choose the smallest per-layer plan whose KLD, measured on held-out "
                                            "calibration windows, is at most this (nats), e.g. 0.04.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Quantized checkpoint directory to write.")
@click.option("--json", "json_path", metavar="FILE", help="Write the checkpoint's record and timing as JSON to FILE ('-' for stdout).")
def quantize(checkpoint, recipe, calib, samples, seq_len, seed, target, budget_bits, max_kld, output,
             json_path) -> None:
    """Quantize a checkpoint with a recipe and calibration text, block by block.

    Example: edgeforge quantize ./Llama-3.2-1B --recipe int4-gptq --calib wiki.txt --target onnx-cpu -o llama-int4
    """
    from edgeforge.quantize import load_recipe, quantize_checkpoint
    from edgeforge.quantize.activations import DEFAULT_NUMERICS
    from edgeforge.quantize.calibration import calibration_for, with_calibration

    from edgeforge.errors import ConfigError
    from edgeforge.export.targets import load_target
    from edgeforge.quantize.planner import Planner, Request

    planning = budget_bits is not None or max_kld is not None
    request = Request(budget_bits, max_kld) if planning else None
    if recipe is None and not planning:
        raise ConfigError("pass --recipe (or --budget-bits/--max-kld to plan one)")
    if planning and target is None:
        raise ConfigError("--budget-bits/--max-kld choose among a target's schemes: pass --target")
    loaded_target = load_target(target) if target is not None else None
    numerics = loaded_target.activation_numerics if loaded_target is not None else DEFAULT_NUMERICS
    ckpt = _open(checkpoint)
    chosen = with_calibration(load_recipe(recipe or "int4-gptq"), samples=samples, seq_len=seq_len, seed=seed)
    planner = Planner(ckpt, chosen, loaded_target, request) if planning else None  # refuses before calibration
    calibration = calibration_for(ckpt, chosen, calib) if calib else None
    if planner is not None:
        result = planner.quantize(calibration, output, numerics=numerics, progress=_progress)
    else:
        result = quantize_checkpoint(ckpt, chosen, calibration=calibration, output_dir=output, numerics=numerics,
                                     progress=_progress)
    click.echo(format_quantize_summary(result))
    _emit_json({"output_dir": str(result.output_dir), "seconds": round(result.seconds, 3), **result.record.to_dict()},
               json_path)


def format_quantize_summary(result) -> str:
    """Per-layer sensitivity table plus totals."""
    record = result.record
    rows = [f"{'layer':<28} {'scheme':<14} {'rel.err':>8} {'rtn':>8} {'sqnr dB':>8}"]
    for name, layer in record.layers.items():
        scheme = layer.weight_scheme
        label = f"int{scheme.bits} " + (f"g{scheme.group_size}" if scheme.group_size else "per-ch")
        if not scheme.symmetric:
            label += " asym"
        sqnr = layer.output_sqnr_db if layer.output_sqnr_db is not None else layer.weight_sqnr_db
        rows.append(f"{name:<28} {label:<14} {_num(layer.rel_error):>8} {_num(layer.rel_error_rtn):>8} "
                    f"{_num(sqnr, '.1f'):>8}")
    recipe = record.recipe
    rows.append(f"recipe {recipe.name} ({recipe.algorithm}, activations {recipe.activations} as "
                f"{record.activation_numerics} rounds them), "
                f"{len(record.fallbacks)} fallback(s), {result.seconds:.1f} s -> {result.output_dir}")
    if record.plan is not None:
        plan = record.plan
        rows.append(f"plan for {plan['target']}: {plan['bits_per_weight']:.3f} bits per weight over the block "
                    f"linears ({plan['layers']}), KLD estimated {plan['estimated_kld']:.4f}, measured "
                    f"{plan['measured_kld']:.4f} ± {plan['measured_kld_sem']:.4f} on {plan['measured_on']}; "
                    f"recipe {plan['recipe_file']}")
    return "\n".join(rows)


def _num(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the recipes as JSON.")
def recipes(as_json: bool) -> None:
    """List the bundled quantization recipes, then the registered algorithms a recipe may name."""
    from edgeforge.quantize import list_recipes, load_recipe
    from edgeforge.quantize.algorithms import ALGORITHMS

    loaded = [load_recipe(path) for path in list_recipes().values()]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in loaded], indent=2))
        return
    width = max(len(recipe.name) for recipe in loaded)
    for recipe in loaded:
        weights = recipe.weights
        scheme = f"w{weights.bits}" + (f" g{weights.group_size}" if weights.group_size else " per-ch")
        rotated = "rotated" if recipe.rotation.any else ""
        click.echo(f"{recipe.name:<{width}} {recipe.algorithm:<12} {scheme:<10} act {recipe.activations.value:<13} "
                   f"{rotated:<7} {recipe.description}")
    click.echo(f"algorithms: {', '.join(ALGORITHMS.names())}")
