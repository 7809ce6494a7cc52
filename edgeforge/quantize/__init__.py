"""Calibration-based int8/int4 quantization: recipes in, a quantized checkpoint directory out.

    from edgeforge.quantize import load_recipe, quantize_checkpoint, load_quantized_model
    from edgeforge.quantize.calibration import build_calibration
"""

from edgeforge.quantize.checkpoint import load_quantized_model, weight_files
from edgeforge.quantize.driver import QuantizeResult, plan_layers, quantize_checkpoint
from edgeforge.quantize.recipe import Recipe, list_recipes, load_recipe
from edgeforge.quantize.record import QuantizedCheckpoint, read_quantized

__all__ = ["QuantizeResult", "QuantizedCheckpoint", "Recipe", "list_recipes", "load_quantized_model", "load_recipe",
           "plan_layers", "quantize_checkpoint", "read_quantized", "weight_files"]
