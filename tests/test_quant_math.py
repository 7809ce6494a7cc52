"""Quantization math: scheme arithmetic, int4 packing, RTN/MSE clipping, GPTQ, AWQ, SmoothQuant, folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgeforge.errors import ConfigError, UnknownNameError, UnsupportedError
from edgeforge.quantize.activations import (
    ActivationNumerics,
    mlas_activation_block,
    quantize_activations_dynamic,
    quantize_activations_mlas,
    quantize_activations_static,
    quantize_activations_xnnpack,
    static_activation_qparams,
)
from edgeforge.quantize.awq import awq_search_scales
from edgeforge.quantize.fold import fold_scales_into_linear, fold_scales_into_norm
from edgeforge.quantize.gptq import HessianAccumulator, gptq_quantize
from edgeforge.quantize.metrics import energy_sqnr_db, relative_output_error, sqnr_db
from edgeforge.quantize.rtn import fake_quantize_weight, mse_clip_search, rtn_quantize
from edgeforge.quantize.scheme import (
    ActivationScheme,
    WeightScheme,
    check_group_size,
    compute_qparams,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from edgeforge.quantize.smoothquant import smoothquant_scales
from tests.tolerances import matmul_error_bound

INT4_G32 = WeightScheme(bits=4, group_size=32)
INT8_PER_CHANNEL = WeightScheme(bits=8)
SCHEMES = [INT4_G32, INT8_PER_CHANNEL, WeightScheme(bits=4, group_size=64, symmetric=False),
           WeightScheme(bits=8, group_size=32, symmetric=False)]


def scheme_id(scheme: WeightScheme) -> str:
    granularity = f"g{scheme.group_size}" if scheme.group_size else "pc"
    return f"int{scheme.bits}-{granularity}-{'sym' if scheme.symmetric else 'asym'}"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(samples: int, width: int, seed: int) -> torch.Tensor:
    """x = z @ A: a non-diagonal Hessian, as real activations have."""
    gen = generator(seed)
    return torch.randn(samples, width, generator=gen) @ torch.randn(width, width, generator=gen) / width**0.5


def inputs_with_outlier_channels(samples: int, width: int, seed: int) -> torch.Tensor:
    gen = generator(seed)
    inputs = torch.randn(samples, width, generator=gen)
    inputs[:, torch.randperm(width, generator=gen)[:4]] *= 50.0
    return inputs


def output_error(inputs: torch.Tensor, weight: torch.Tensor, approx_weight: torch.Tensor) -> float:
    return relative_output_error(inputs @ weight.T, inputs @ approx_weight.T)


# --- schemes ---------------------------------------------------------------------------------------

def test_weight_scheme_round_trips_through_dict():
    for scheme in SCHEMES:
        data = scheme.to_dict()
        assert data["kind"] == "weight_scheme" and data["version"] == 1, data
        assert WeightScheme.from_dict(data) == scheme


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stored_bytes_is_what_the_checkpoint_stores_for_a_layer(scheme):
    from edgeforge.quantize.checkpoint import layer_tensors

    weight = torch.randn(24, 64)
    stored = layer_tensors("layer", rtn_quantize(weight, scheme), scheme)
    assert scheme.stored_bytes(24, 64) == sum(t.numel() * t.element_size() for t in stored.values()), stored.keys()


def test_bits_per_weight_count_what_each_runtime_stores():
    """XNNPACK holds group-wise scales in bf16; MatMulNBits float32 scales, 4-bit packed zero points, and
    per-channel rows in blocks with the scale repeated (int8 activations: blocks of 32)."""
    dynamic, none = ActivationScheme.DYNAMIC_INT8, ActivationScheme.NONE
    xnnpack, mlas = ActivationNumerics.XNNPACK, ActivationNumerics.MLAS_INT8_BLOCK

    def bits(scheme, numerics, activations, width=576):
        return 8 * scheme.stored_bytes(64, width, numerics.weight_storage(scheme, width, activations)) / (64 * width)

    assert bits(WeightScheme(4, 32), xnnpack, dynamic) == 4.5 and bits(WeightScheme(4, 32), mlas, dynamic) == 5.0
    assert bits(WeightScheme(4, 128, symmetric=False), mlas, none, width=512) == 4 + 32 / 128 + 4 / 128
    assert bits(WeightScheme(4, 64, symmetric=False), mlas, none, width=576) == 4 + 32 / 64 + 40 / 576  # 9 zp, 5 B
    assert bits(WeightScheme(8), xnnpack, dynamic) == 8 + 32 / 576 and bits(WeightScheme(8), mlas, dynamic) == 9.0
    assert bits(WeightScheme(8), mlas, none) == 8.5 and bits(WeightScheme(8), mlas, none, width=1536) == 8.125
    assert bits(WeightScheme(8), mlas, ActivationScheme.STATIC_INT8) == 8 + 32 / 576  # Q/DQ: one scale per row


@pytest.mark.parametrize("fields", [{"bits": 3}, {"bits": 4, "group_size": 0}, {"bits": 8, "group_size": 32.0},
                                    {"bits": 4, "symmetric": "yes"}, {"bits": 4, "granularity": "row"}, {}])
def test_weight_scheme_rejects_bad_fields(fields):
    with pytest.raises(ConfigError):
        WeightScheme.from_dict(fields)


def test_activation_scheme_names():
    assert ActivationScheme.from_name("dynamic_int8") is ActivationScheme.DYNAMIC_INT8
    with pytest.raises(UnknownNameError, match="dynamic_int8"):
        ActivationScheme.from_name("int8_dynamic")


def test_group_size_that_does_not_divide_names_width_and_group():
    with pytest.raises(UnsupportedError) as raised:
        check_group_size(172, INT4_G32, "layers.0.feed_forward.w2")
    message = str(raised.value)
    assert "layers.0.feed_forward.w2" in message and "172" in message and "32" in message, message
    with pytest.raises(UnsupportedError, match="172"):
        compute_qparams(torch.randn(8, 172), INT4_G32)
    assert check_group_size(172, INT8_PER_CHANNEL, "w2") == 172


# --- quantize / dequantize / pack ------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_dequantized_weight_is_within_half_a_step(scheme):
    weight = torch.randn(16, 128, generator=generator(0)) * 0.05
    scale, zero_point = compute_qparams(weight, scheme)
    qdata = quantize(weight, scale, zero_point, scheme)
    assert qdata.dtype == torch.int8 and scheme.qmin <= qdata.min() and qdata.max() <= scheme.qmax
    step = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
    excess = ((weight - dequantize(qdata, scale, zero_point)).abs() - step / 2).max().item()
    assert excess <= 1e-6 * weight.abs().max().item(), f"error exceeds scale/2 by {excess}"


def test_int4_pack_unpack_round_trip_is_exact():
    qdata = torch.randint(-8, 8, (6, 64), generator=generator(1), dtype=torch.int8)
    qdata[0, :2] = torch.tensor([-8, 7], dtype=torch.int8)
    qdata[1, -2:] = torch.tensor([7, -8], dtype=torch.int8)
    packed = pack_int4(qdata)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert packed[0, 0].item() == 0xF0, f"even column goes to the low nibble as q + 8, got {packed[0, 0].item():#04x}"
    assert torch.equal(unpack_int4(packed), qdata)


def test_int4_pack_rejects_out_of_range_and_odd_width():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(UnsupportedError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


# --- agreement with torchao (what ExecuTorch's 8da4w/8da8w consumes) -------------------------------

@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_qparams_and_values_match_torchao(scheme):
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    weight = torch.randn(16, 128, generator=generator(2))
    weight[3] = weight[3].abs()  # a row with no negative values exercises the zero-point clamp
    block = (1, scheme.group_size or weight.shape[1])
    mapping = MappingType.SYMMETRIC if scheme.symmetric else MappingType.ASYMMETRIC
    ao_scale, ao_zero = choose_qparams_affine(weight, mapping, block, torch.int8, quant_min=scheme.qmin,
                                              quant_max=scheme.qmax, zero_point_dtype=torch.int8, keepdim=True)
    scale, zero_point = compute_qparams(weight, scheme)
    assert torch.equal(scale, ao_scale), f"max scale difference {(scale - ao_scale).abs().max().item()}"
    if scheme.symmetric:
        assert zero_point is None and not ao_zero.any()
    else:
        assert torch.equal(zero_point, ao_zero)
    ao_q = quantize_affine(weight, block, ao_scale, ao_zero, torch.int8, scheme.qmin, scheme.qmax)
    qdata = quantize(weight, scale, zero_point, scheme)
    assert torch.equal(qdata, ao_q), f"{(qdata != ao_q).sum().item()} values differ"
    ao_dq = dequantize_affine(ao_q, block, ao_scale, ao_zero, torch.int8, scheme.qmin, scheme.qmax)
    assert torch.equal(dequantize(qdata, scale, zero_point), ao_dq)


def test_xnnpack_activations_are_per_token_asymmetric_int8_on_a_grid_through_zero():
    activations = torch.randn(2, 7, 96, generator=generator(3)) * 3 + 0.5
    activations[0, 0] = 0.0  # an all-zero token
    activations[0, 1] = activations[0, 1].abs() + 1  # all positive: the range still reaches down to 0
    dequantized = quantize_activations_xnnpack(activations)
    low, high = activations.amin(-1, keepdim=True).clamp(max=0), activations.amax(-1, keepdim=True).clamp(min=0)
    step = (high - low) / 255
    assert torch.equal(dequantized[0, 0], torch.zeros(96))
    assert (dequantized - activations).abs().le(step / 2 * (1 + 1e-5)).all()  # half a step, on each token's grid
    codes = dequantized[0, 1:] / step[0, 1:]
    assert (codes - codes.round()).abs().max() < 1e-3  # the grid holds 0 exactly: codes are whole steps from it


def test_xnnpack_activations_agree_with_torchao_per_token_up_to_last_bit_roundings():
    """torchao's 8da4w reference takes the same grid with scale (max - min) / 255 and multiplies by its
    reciprocal; XNNPACK multiplies by 255 / (max - min): a code differs only where x sits on a rounding tie."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    activations = torch.randn(4, 16, 96, generator=generator(31)) * 3 + 0.5
    ours, torchao = quantize_activations_xnnpack(activations), _apply_int8_act_asym_per_token_quant_dequant(activations)
    step = (activations.amax(-1, keepdim=True).clamp(min=0) - activations.amin(-1, keepdim=True).clamp(max=0)) / 255
    assert ((ours - torchao).abs() <= step * (1 + 1e-5)).all()
    assert ((ours - torchao).abs() > step / 2).float().mean() < 0.01


def test_mlas_activations_are_symmetric_int8_per_block_of_k():
    activations = torch.randn(3, 100, generator=generator(32))
    activations[:, 5] = 400.0  # an outlier in the first block only
    dequantized = quantize_activations_mlas(activations, 32)
    for start in range(0, 100, 32):  # 100 = 3 blocks of 32 and a last block of 4
        block = activations[:, start:start + 32]
        step = block.abs().amax(-1, keepdim=True) / 127
        error = (dequantized[:, start:start + 32] - block).abs()
        assert (error <= step / 2 * (1 + 1e-5)).all(), f"block at {start}: error {error.max()} vs step {step.max()}"
    assert torch.equal(quantize_activations_mlas(-activations, 32), -dequantized)
    assert torch.equal(quantize_activations_mlas(torch.zeros(2, 40), 32), torch.zeros(2, 40))


def test_mlas_activation_block_follows_the_matmul_nbits_block():
    assert mlas_activation_block(576, 32) == 32 and mlas_activation_block(1536, 128) == 128
    assert mlas_activation_block(576, None) == 32 and mlas_activation_block(576, 576) == 32  # one group: per channel
    assert mlas_activation_block(24, None) == 16
    x = torch.randn(5, 64, generator=generator(33))
    assert torch.equal(quantize_activations_dynamic(x, ActivationNumerics.MLAS_INT8_BLOCK, group_size=None),
                       quantize_activations_mlas(x, 32))
    assert torch.equal(quantize_activations_dynamic(x, ActivationNumerics.XNNPACK, group_size=32),
                       quantize_activations_xnnpack(x))
    with pytest.raises(UnknownNameError, match="unknown activation numerics 'torchao'"):
        ActivationNumerics.from_name("torchao")


def test_static_activation_quant_stays_within_half_a_step_inside_the_range():
    activations = torch.rand(64, 32, generator=generator(4)) * 6 - 2  # [-2, 4)
    scale, zero_point = static_activation_qparams(-2.0, 4.0)
    error = (quantize_activations_static(activations, scale, zero_point) - activations).abs().max().item()
    assert error <= scale.item() / 2 + 1e-6, f"error {error} vs scale {scale.item()}"
    clamped = quantize_activations_static(torch.tensor([100.0]), scale, zero_point).item()
    assert clamped == pytest.approx(4.0, abs=scale.item()), clamped


# --- RTN and MSE clipping --------------------------------------------------------------------------

def test_mse_clip_search_never_increases_the_weighted_error():
    weight = torch.randn(32, 128, generator=generator(5))
    weight[:, 5] *= 8  # outliers make clipping worthwhile
    second_moment = torch.rand(128, generator=generator(6)) + 0.1
    ratios = mse_clip_search(weight, INT4_G32, input_second_moment=second_moment, norm=2.0)
    assert ratios.shape == (32, 4) and ratios.min() >= 0.5 and ratios.max() <= 1.0

    def weighted_error(approx):
        return ((weight - approx).pow(2) * second_moment).sum().item()

    clipped = weighted_error(fake_quantize_weight(weight, INT4_G32, clip_ratio=ratios))
    plain = weighted_error(fake_quantize_weight(weight, INT4_G32))
    assert clipped < plain, f"clipped {clipped} vs min-max {plain}"


# --- GPTQ ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gptq_layer():
    inputs = correlated_inputs(1024, 256, seed=7)
    weight = torch.randn(64, 256, generator=generator(8)) / 16
    accumulator = HessianAccumulator(256)
    for batch in inputs.split(300):
        accumulator.add(batch)
    assert accumulator.sample_count == 1024
    return inputs, weight, accumulator.hessian()


@pytest.mark.parametrize("act_order", [True, False], ids=["act_order", "in_order"])
@pytest.mark.parametrize("scheme", [INT4_G32, INT8_PER_CHANNEL, WeightScheme(bits=4, group_size=64, symmetric=False)],
                         ids=scheme_id)
def test_gptq_output_error_is_below_rtn(gptq_layer, scheme, act_order):
    inputs, weight, hessian = gptq_layer
    gptq_weight = dequantize(*gptq_quantize(weight, hessian, scheme, act_order=act_order, block_size=64))
    gptq_error = output_error(inputs, weight, gptq_weight)
    rtn_error = output_error(inputs, weight, fake_quantize_weight(weight, scheme))
    assert gptq_error < 0.9 * rtn_error, f"GPTQ {gptq_error:.5f} vs RTN {rtn_error:.5f}"


def test_gptq_dynamic_groups_and_clipping_beat_rtn(gptq_layer):
    inputs, weight, hessian = gptq_layer
    ratios = mse_clip_search(weight, INT4_G32, input_second_moment=hessian.diagonal().float())
    for static_groups in (True, False):
        result = gptq_quantize(weight, hessian, INT4_G32, act_order=False, static_groups=static_groups,
                               clip_ratio=ratios, block_size=48)
        gptq_error = output_error(inputs, weight, dequantize(*result))
        rtn_error = output_error(inputs, weight, fake_quantize_weight(weight, INT4_G32, clip_ratio=ratios))
        assert gptq_error < 0.9 * rtn_error, (
            f"static_groups={static_groups}: GPTQ {gptq_error:.5f} vs RTN {rtn_error:.5f}")


def test_fp32_alignment_gives_the_least_squares_weight_for_the_quantized_inputs():
    """W + W M maps the inputs x onto the fp32 model's W x_fp as well as any float weight can (undamped: the
    least-squares solution); with x = x_fp there is nothing to correct."""
    from edgeforge.quantize.gptq import DriftAccumulator, fp32_alignment

    generator = torch.Generator().manual_seed(0)
    fp32_inputs = torch.randn(4096, 24, generator=generator)
    inputs = fp32_inputs + 0.1 * torch.randn(4096, 24, generator=generator)  # upstream rounding's error
    weight = torch.randn(16, 24, generator=generator)
    hessian, drift = HessianAccumulator(24), DriftAccumulator(24)
    hessian.add(inputs)
    drift.add(inputs, fp32_inputs)
    target = weight + weight @ fp32_alignment(hessian.hessian(), drift.drift(), damp=0.0)
    best = torch.linalg.lstsq(inputs.double(), (fp32_inputs @ weight.T).double()).solution.T.float()
    assert torch.allclose(target, best, atol=1e-4), (target - best).abs().max()
    assert (inputs @ target.T - fp32_inputs @ weight.T).norm() < (inputs @ weight.T - fp32_inputs @ weight.T).norm()
    same = DriftAccumulator(24)
    same.add(inputs, inputs)
    assert fp32_alignment(hessian.hessian(), same.drift(), damp=0.01).abs().max() == 0


def test_gptq_is_deterministic(gptq_layer):
    _, weight, hessian = gptq_layer
    first = gptq_quantize(weight, hessian, INT4_G32)
    second = gptq_quantize(weight.clone(), hessian.clone(), INT4_G32)
    assert torch.equal(first.qdata, second.qdata) and torch.equal(first.scale, second.scale)


def test_gptq_rounds_dead_input_channels_to_nearest(gptq_layer):
    inputs, weight, _ = gptq_layer
    inputs = inputs.clone()
    inputs[:, [3, 100]] = 0.0
    hessian = inputs.T.double() @ inputs.double() / inputs.shape[0]
    result = gptq_quantize(weight, hessian, INT4_G32)
    rtn = rtn_quantize(weight, INT4_G32)
    assert torch.equal(result.qdata[:, [3, 100]], rtn.qdata[:, [3, 100]])
    gptq_error = output_error(inputs, weight, dequantize(*result))
    rtn_error = output_error(inputs, weight, dequantize(*rtn))
    assert gptq_error < rtn_error, f"GPTQ {gptq_error:.5f} vs RTN {rtn_error:.5f}"


def test_gptq_rejects_act_order_with_dynamic_groups(gptq_layer):
    _, weight, hessian = gptq_layer
    with pytest.raises(ConfigError, match="static groups"):
        gptq_quantize(weight, hessian, INT4_G32, act_order=True, static_groups=False)


def test_gptq_refuses_a_singular_hessian_without_damping():
    inputs = torch.randn(256, 64, generator=generator(20))
    inputs[:, 1] = inputs[:, 0]  # two identical input channels: H is singular
    hessian = inputs.T.double() @ inputs.double() / 256
    with pytest.raises(UnsupportedError, match="raise damp"):
        gptq_quantize(torch.randn(8, 64), hessian, INT4_G32, damp=0.0)


@pytest.mark.parametrize("call", [
    lambda: HessianAccumulator(8).hessian(),
    lambda: gptq_quantize(torch.randn(4, 32), torch.eye(32), INT4_G32, damp=-0.1),
    lambda: gptq_quantize(torch.randn(4, 32), torch.eye(32), INT4_G32, block_size=0),
    lambda: mse_clip_search(torch.randn(4, 32), INT4_G32, grid=0),
    lambda: mse_clip_search(torch.randn(4, 32), INT4_G32, min_ratio=1.5),
    lambda: awq_search_scales([torch.randn(4, 32)], torch.randn(8, 32), INT4_G32, grid=0),
    lambda: smoothquant_scales(torch.ones(32), [torch.randn(4, 32)], alpha=1.5),
], ids=["no-samples", "negative-damp", "zero-block", "zero-grid", "ratio-above-one", "awq-zero-grid", "alpha"])
def test_algorithm_options_are_validated(call):
    with pytest.raises(ConfigError):
        call()


# --- AWQ, SmoothQuant, folding ---------------------------------------------------------------------

def awq_error(weights, inputs, scales, scheme) -> float:
    stacked = torch.cat(weights)
    quantized = fake_quantize_weight(stacked * scales, scheme)
    return ((inputs @ stacked.T - (inputs / scales) @ quantized.T).pow(2).mean()).item()


def test_awq_is_never_worse_than_no_scaling():
    inputs = torch.randn(512, 128, generator=generator(9))
    weights = [torch.randn(48, 128, generator=generator(seed)) for seed in (10, 11)]
    scales = awq_search_scales(weights, inputs, INT4_G32)
    searched = awq_error(weights, inputs, scales, INT4_G32)
    unscaled = awq_error(weights, inputs, torch.ones(128), INT4_G32)
    assert searched <= unscaled, f"AWQ {searched} vs s=1 {unscaled}"


def test_awq_helps_on_outlier_channels():
    inputs = inputs_with_outlier_channels(512, 128, seed=12)
    weights = [torch.randn(48, 128, generator=generator(seed)) for seed in (13, 14, 15)]
    scales = awq_search_scales(weights, inputs, INT4_G32)
    searched = awq_error(weights, inputs, scales, INT4_G32)
    unscaled = awq_error(weights, inputs, torch.ones(128), INT4_G32)
    assert searched < 0.9 * unscaled, f"AWQ {searched} vs s=1 {unscaled}"


def test_folding_into_norm_preserves_the_output():
    gen = generator(16)
    hidden, norm_weight = torch.randn(8, 64, generator=gen), torch.rand(64, generator=gen) + 0.5
    weights = [torch.randn(32, 64, generator=gen) for _ in range(3)]
    scales = torch.rand(64, generator=gen) * 4 + 0.1
    folded_norm, folded_weights = fold_scales_into_norm(norm_weight, weights, scales)
    normed = F.rms_norm(hidden, (64,), norm_weight)
    for weight, folded in zip(weights, folded_weights):
        expected = normed @ weight.T
        actual = F.rms_norm(hidden, (64,), folded_norm) @ folded.T
        # both sides are float32 dot products of the same terms, each factor rounded up to twice more
        # (the norm's output, the folded weight): the bound holds on any CPU and summation order
        bound = 2 * matmul_error_bound(normed, weight, extra_roundings=4)
        assert ((actual - expected).abs() <= bound).all(), f"max difference {(actual - expected).abs().max().item()}"


def test_folding_into_previous_linear_preserves_the_feed_forward():
    gen = generator(17)
    hidden = torch.randn(8, 32, generator=gen)
    w1, w3 = torch.randn(96, 32, generator=gen) / 6, torch.randn(96, 32, generator=gen) / 6
    w2 = torch.randn(32, 96, generator=gen) / 10
    scales = torch.rand(96, generator=gen) * 4 + 0.1
    folded_w3, (folded_w2,) = fold_scales_into_linear(w3, [w2], scales)
    gate, up = F.silu(hidden @ w1.T), hidden @ w3.T
    expected = (gate * up) @ w2.T
    actual = (gate * (hidden @ folded_w3.T)) @ folded_w2.T
    # the up projection's error on each side (the fold rounds each w3 row once more), carried through
    # w2, plus the second product's own rounding on each side
    up_error = 2 * matmul_error_bound(hidden, w3, extra_roundings=2)
    bound = (gate.abs().double() * up_error) @ w2.abs().double().T \
        + 2 * matmul_error_bound(gate * up, w2, extra_roundings=3)
    assert ((actual - expected).abs() <= bound).all(), f"max difference {(actual - expected).abs().max().item()}"
    with pytest.raises(UnsupportedError, match="grouped-query"):
        fold_scales_into_linear(torch.randn(48, 32), [w2], scales)


def test_smoothquant_lowers_w8a8_error_on_outlier_channels():
    inputs = inputs_with_outlier_channels(256, 128, seed=18)
    weight = torch.randn(64, 128, generator=generator(19)) / 12
    reference = inputs @ weight.T

    def w8a8_error(scaled_inputs, scaled_weight):
        approx = quantize_activations_xnnpack(scaled_inputs) @ fake_quantize_weight(scaled_weight, INT8_PER_CHANNEL).T
        return relative_output_error(reference, approx)

    scales = smoothquant_scales(inputs.abs().amax(dim=0), [weight], alpha=0.5)
    _, (smoothed_weight,) = fold_scales_into_norm(torch.ones(128), [weight], scales)
    smoothed, plain = w8a8_error(inputs / scales, smoothed_weight), w8a8_error(inputs, weight)
    assert smoothed < 0.5 * plain, f"SmoothQuant {smoothed:.5f} vs plain w8a8 {plain:.5f}"


# --- metrics ---------------------------------------------------------------------------------------

def test_error_metrics():
    reference = torch.tensor([3.0, 4.0])
    assert sqnr_db(reference, reference) == float("inf")
    assert relative_output_error(reference, reference) == 0.0
    assert sqnr_db(reference, torch.tensor([3.0, 4.5])) == pytest.approx(20.0)
    assert relative_output_error(reference, torch.tensor([3.0, 4.5])) == pytest.approx(0.1)
    assert energy_sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert energy_sqnr_db(1.0, 0.0) == float("inf") and energy_sqnr_db(0.0, 1.0) == float("-inf")


def test_sqnr_from_energies_summed_over_row_chunks_is_the_sqnr_of_the_whole():
    torch.manual_seed(0)
    reference = torch.randn(64, 48)
    approx = fake_quantize_weight(reference, WeightScheme(4, 16))
    signal = sum(rows.double().pow(2).sum().item() for rows in reference.split(10))
    noise = sum((r - a).double().pow(2).sum().item() for r, a in zip(reference.split(10), approx.split(10)))
    assert energy_sqnr_db(signal, noise) == pytest.approx(sqnr_db(reference, approx), rel=1e-12)
