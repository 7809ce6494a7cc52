"""Importance-weighted scale search: never worse than min-max or the MSE clip search per group, exact on a weight
already on a grid, representable zero points; its recipe key and the GPTQ static groups it feeds."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edgeforge.cli import main
from edgeforge.errors import ConfigError
from edgeforge.quantize import load_recipe
from edgeforge.quantize.algorithms import GroupStatistics
from edgeforge.quantize.gptq import gptq_quantize
from edgeforge.quantize.record import RecipeRecord
from edgeforge.quantize.rtn import mse_clip_search
from edgeforge.quantize.scale_search import element_weights, importance_qparams, weighted_group_error
from edgeforge.quantize.scheme import WeightScheme, compute_qparams, dequantize, quantize
from tests.tolerances import EPS32

SCHEMES = [WeightScheme(bits=4, group_size=32), WeightScheme(bits=4, group_size=32, symmetric=False)]
IDS = ["sym", "asym"]


def heavy_tailed_weight(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Gaussian weights with a few large entries per row, as trained linears have."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=gen)
    outliers = torch.rand(rows, columns, generator=gen) < 0.01
    return torch.where(outliers, weight * 6, weight)


def skewed_importance(columns: int, seed: int) -> torch.Tensor:
    """E[x²] spanning four orders of magnitude, with a few dominant channels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(2.5 * torch.randn(columns, generator=gen))


def group_error(weight, scale, zero_point, scheme, weights):
    return weighted_group_error(weight, quantize(weight, scale, zero_point, scheme), scale, zero_point, weights)


def rounding_slack(weight, scale, zero_point, scheme, weights) -> torch.Tensor:
    """Float32 rounding bound on a group's computed error Σ c (w - ŵ)²: each residual is off by at most
    eps (|w| + |ŵ|) from the subtraction and the dequantizing product, and the 32-term sum by γ_32 of its
    terms, so γ_{S+3} Σ c (|w| + |ŵ|)² bounds the difference between two computations of one exact value."""
    dequantized = dequantize(quantize(weight, scale, zero_point, scheme), scale, zero_point)
    span = weights * (weight.abs() + dequantized.abs()).pow(2)
    terms = weight.shape[1] // scale.shape[1] + 3  # group size + 3
    return terms * EPS32 / (1 - terms * EPS32) * span.reshape(*scale.shape, -1).sum(dim=-1)


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_search_is_no_worse_than_min_max_or_clip_search_in_every_group(scheme, magnitude):
    weight, importance = heavy_tailed_weight(96, 512, seed=1), skewed_importance(512, seed=2)
    weights = element_weights(weight, importance, magnitude=magnitude)
    scale, zero_point = importance_qparams(weight, scheme, importance=importance, magnitude=magnitude)
    searched = group_error(weight, scale, zero_point, scheme, weights)
    references = {"min-max": compute_qparams(weight, scheme),
                  "clip search": compute_qparams(weight, scheme, mse_clip_search(
                      weight, scheme, input_second_moment=importance, grid=20))}
    for label, (ref_scale, ref_zero) in references.items():
        reference = group_error(weight, ref_scale, ref_zero, scheme, weights)
        slack = rounding_slack(weight, ref_scale, ref_zero, scheme, weights)
        worse = searched > reference + slack
        assert not worse.any(), (f"{int(worse.sum())} groups worse than {label}, by up to "
                                 f"{(searched - reference)[worse].max().item():.3g}")
    minmax = group_error(weight, *references["min-max"], scheme, weights).sum()
    assert searched.sum() < 0.8 * minmax, f"weighted error {searched.sum():.4g} vs min-max {minmax:.4g}"


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_search_recovers_a_weight_that_sits_on_a_grid(scheme):
    gen = torch.Generator().manual_seed(3)
    rows, groups, size = 16, 8, 32
    qdata = torch.randint(scheme.qmin, scheme.qmax + 1, (rows, groups, size), generator=gen, dtype=torch.int8)
    # every group reaches an end of the integer range (otherwise its scale is not determined by its values):
    # symmetric rows alternate between reaching qmin and reaching only qmax, asymmetric ones reach both
    qdata[..., 0] = scheme.qmax
    if scheme.symmetric:
        qdata[0::2, :, 1] = scheme.qmin
        qdata[1::2] = qdata[1::2].clamp(min=-scheme.qmax)
        zero_point = None
    else:
        qdata[..., 1] = scheme.qmin
        zero_point = torch.randint(-4, 5, (rows, groups), generator=gen, dtype=torch.int8)
    scale = 0.01 + torch.rand(rows, groups, generator=gen)
    qdata = qdata.reshape(rows, groups * size)
    weight = dequantize(qdata, scale, zero_point)
    found_scale, found_zero = importance_qparams(weight, scheme, importance=skewed_importance(groups * size, seed=4))
    assert torch.equal(quantize(weight, found_scale, found_zero, scheme), qdata)
    if zero_point is not None:
        assert torch.equal(found_zero, zero_point)
    # the refit scale is a ratio of 32-term sums of exact products: within γ_64 of the true one
    assert torch.allclose(found_scale, scale, rtol=64 * EPS32, atol=0)


def test_symmetric_search_has_no_zero_point_and_asymmetric_zero_points_are_representable():
    weight, importance = heavy_tailed_weight(64, 256, seed=5), skewed_importance(256, seed=6)
    weight[:8] = weight[:8].abs() + 0.5  # all-positive groups push the zero point to its end
    weight[8:16] = -weight[8:16].abs() - 0.5
    _, zero_point = importance_qparams(weight, SCHEMES[0], importance=importance)
    assert zero_point is None
    scale, zero_point = importance_qparams(weight, SCHEMES[1], importance=importance)
    assert zero_point.dtype == torch.int8 and zero_point.shape == scale.shape
    low, high = int(zero_point.min()), int(zero_point.max())
    # MatMulNBits stores z + 8 in a nibble: 0..15
    assert -8 <= low and high <= 7, f"zero points in [{low}, {high}]"
    assert low == -8 and high == 7, "the all-positive and all-negative groups should reach both ends"
    assert bool((scale > 0).all())


def test_gptq_static_groups_take_the_searched_qparams():
    gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(512, 64, generator=gen) * torch.exp(torch.randn(64, generator=gen))
    hessian = inputs.T @ inputs / inputs.shape[0]
    weight = heavy_tailed_weight(24, 64, seed=8)
    for scheme in SCHEMES:
        qparams = importance_qparams(weight, scheme, importance=hessian.diagonal())
        result = gptq_quantize(weight, hessian, scheme, qparams=qparams)
        assert torch.equal(result.scale, qparams[0])
        assert (result.zero_point is None) == (qparams[1] is None)
        if qparams[1] is not None:
            assert torch.equal(result.zero_point, qparams[1])


def write_recipe(path, scales: str, algorithm: str = "gptq"):
    path.write_text(f'algorithm = "{algorithm}"\nactivations = "dynamic_int8"\n[weights]\nbits = 4\ngroup_size = 32\n'
                    f'[scales]\n{scales}\n')
    return path


def test_scales_recipe_key_round_trips_into_the_algorithm_and_manifest(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "searched.toml", 'search = "importance"\nmagnitude = false'))
    assert recipe.scales.importance and not recipe.scales.magnitude
    assert recipe.algorithm_config.scales == recipe.scales
    record = RecipeRecord(**recipe.to_dict())
    assert record.scales == {"search": "importance", "magnitude": False}
    assert load_recipe("int4-gptq").to_dict()["scales"] == {"search": "range", "magnitude": True}
    # an RTN-style algorithm rounds on the searched grid, weighted by the Hessian's diagonal
    importance = skewed_importance(64, seed=9)
    rows, scheme = heavy_tailed_weight(8, 64, seed=10), recipe.weights
    mse = load_recipe(write_recipe(tmp_path / "mse.toml", 'search = "importance"\nmagnitude = false', "mse"))
    quantized = mse.algorithm_config.round(rows, scheme, GroupStatistics(hessian=torch.diag(importance)))
    scale, _ = importance_qparams(rows, scheme, importance=importance, magnitude=False)
    assert torch.equal(quantized.scale, scale)
    assert torch.equal(quantized.qdata, quantize(rows, scale, None, scheme))

def test_bad_scale_search_is_a_one_line_error_naming_the_file(tmp_path):
    recipe = write_recipe(tmp_path / "bad.toml", 'search = "imatrix"')
    with pytest.raises(ConfigError, match=r"bad\.toml: recipe key 'scales\.search' must be one of range, "
                                          r"importance, got 'imatrix'"):
        load_recipe(recipe)
    write_recipe(recipe, 'magnitude = "yes"')
    with pytest.raises(ConfigError, match=r"bad\.toml: recipe key 'scales\.magnitude' must be true or false"):
        load_recipe(recipe)
    write_recipe(recipe, 'search = "imatrix"')
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["quantize", "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.toml" in lines[0] and "scales.search" in lines[0], result.output
    assert "Traceback" not in result.output and not out.exists()
