"""Runtime-faithful numerics: an eager QuantizedLinear computes what XNNPACK and onnxruntime compute.

Each runtime quantizes a linear's input its own way at run time (see edgeforge.quantize.activations). With
the same integer codes on both sides, eager and runtime differ only by the float32 rounding of the same
sums: a bound that follows from float32 eps and K (tests.tolerances.matmul_error_bound), far below what
one int8 step of an activation moves. The old eager numerics (torchao's per-token qparams, float32 group
scales) land outside that bound wherever a runtime computes differently.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeforge.errors import ConfigError
from edgeforge.quantize.activations import ActivationNumerics, quantize_activations_dynamic
from edgeforge.quantize.modules import QuantizedLinear, runtime_weight_scale, set_activation_numerics
from edgeforge.quantize.rtn import rtn_quantize
from edgeforge.quantize.scheme import ActivationScheme, WeightScheme, dequantize
from tests.tolerances import matmul_error_bound

XNNPACK, MLAS = ActivationNumerics.XNNPACK, ActivationNumerics.MLAS_INT8_BLOCK
INT4_G32 = WeightScheme(bits=4, group_size=32)
INT8_PER_CHANNEL = WeightScheme(bits=8)
# (scheme, K): K = 100 is not a multiple of MLAS' 32-wide activation block for per-channel layers
PTE_LAYERS = {"int4-g32": (INT4_G32, 96), "int8-per-channel": (INT8_PER_CHANNEL, 100)}
ONNX_LAYERS = {**PTE_LAYERS, "int4-g32-asym": (WeightScheme(bits=4, group_size=32, symmetric=False), 64),
               "int8-per-channel-k1536": (INT8_PER_CHANNEL, 1536)}


def quantized_linear(scheme: WeightScheme, in_features: int, numerics: ActivationNumerics) -> QuantizedLinear:
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(40, in_features, generator=generator) * 0.05
    return QuantizedLinear(rtn_quantize(weight, scheme), scheme, ActivationScheme.DYNAMIC_INT8, numerics=numerics)


def real_model_like_inputs(in_features: int) -> torch.Tensor:
    """[1, 6, in]: unit-RMS tokens with three outlier channels (per-token peaks ~30x the RMS, as in a trained
    Llama's down_proj input), one all-negative token and one all-zero token."""
    generator = torch.Generator().manual_seed(in_features + 1)
    x = torch.randn(6, in_features, generator=generator)
    x[:, torch.randperm(in_features, generator=generator)[:3]] *= 30.0
    x[-2] = -x[-2].abs()
    x[-1] = 0.0
    return x.unsqueeze(0)


def float_rounding_bound(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """How far two float32 evaluations of the layer on the same integer codes may lie apart: each side sums
    K products of a dequantized input and weight term in its own order (error <= γ_K Σ|terms|). MLAS folds
    the weight's offset into a block sum, so its terms reach 2^bits weight steps: the weight term is bounded
    by that. Three extra roundings per term (activation scale, weight scale, their product); two sides."""
    dequantized_input = quantize_activations_dynamic(x, module.numerics, group_size=module.group_size)
    weight_step = runtime_weight_scale(module.scale, module.numerics)
    weight_bound = (2 ** module.scheme.bits) * weight_step.repeat_interleave(module.in_features // weight_step.shape[1],
                                                                             dim=1)
    return 2 * matmul_error_bound(dequantized_input, weight_bound, extra_roundings=3).float()


def torchao_numerics(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer as the eager model computed it before: torchao's per-token int8 activations (8da4w's
    reference), float32 scales."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    return _apply_int8_act_asym_per_token_quant_dequant(x) @ dequantize(module.qdata, module.scale,
                                                                        module.zero_point).T


def outside(candidate: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> int:
    return int(((candidate - reference).abs() > bound).sum())


# ---- XNNPACK (.pte) --------------------------------------------------------------------------------------

class TwoLinears(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.first(x), self.second(y)


@pytest.fixture(scope="module")
def pte_results(tmp_path_factory):
    """Both PTE_LAYERS lowered through the exporter's own path (edgeforge's integers in quantized_decomposed
    ops -> XNNPACK) into one .pte, run by executorch.runtime: {name: (eager module, input, runtime output)}."""
    from edgeforge.export.executorch.graph import structural_copy
    from edgeforge.export.executorch.layers import to_lowerable
    from edgeforge.export.executorch.lower import lower
    from edgeforge.export.executorch.session import load_method

    modules = {name: quantized_linear(scheme, k, XNNPACK) for name, (scheme, k) in PTE_LAYERS.items()}
    inputs = {name: real_model_like_inputs(k) for name, (_, k) in PTE_LAYERS.items()}
    model = to_lowerable(structural_copy(TwoLinears(*modules.values()))).eval()
    with torch.no_grad():
        program = torch.export.export(model, tuple(inputs.values()), strict=True)
    model_file = tmp_path_factory.mktemp("pte") / "two_linears.pte"
    model_file.write_bytes(lower(program, backend="xnnpack").buffer)
    outputs = load_method(model_file).execute(list(inputs.values()))
    return {name: (modules[name], inputs[name], output.clone()) for name, output in zip(PTE_LAYERS, outputs)}


def test_decomposed_linears_lower_to_the_same_program_as_torchao_tensors():
    """The fast-lowering form of the dynamic linears (quantized_decomposed ops) hands XNNPACK exactly what
    torchao's tensor subclass does: the two .pte files are the same bytes."""
    from edgeforge.export.executorch.graph import structural_copy
    from edgeforge.export.executorch.layers import to_lowerable
    from edgeforge.export.executorch.lower import lower

    modules = [quantized_linear(scheme, k, XNNPACK) for scheme, k in PTE_LAYERS.values()]
    inputs = tuple(real_model_like_inputs(k) for _, k in PTE_LAYERS.values())
    programs = []
    for decomposed in (True, False):
        model = to_lowerable(structural_copy(TwoLinears(*modules)), decomposed=decomposed).eval()
        with torch.no_grad():
            programs.append(lower(torch.export.export(model, inputs, strict=False), backend="xnnpack").buffer)
    assert programs[0] == programs[1]


@pytest.mark.parametrize("name", PTE_LAYERS)
def test_xnnpack_numerics_match_the_pte_to_float_rounding(pte_results, name):
    module, x, runtime = pte_results[name]
    with torch.no_grad():
        eager = module(x)
    bound = float_rounding_bound(module, x)
    assert outside(eager, runtime, bound) == 0, \
        f"max |eager - XNNPACK| {(eager - runtime).abs().max():.3g}, bound {bound.min():.3g}..{bound.max():.3g}"


def test_old_numerics_miss_xnnpack_bf16_group_scales(pte_results):
    module, x, runtime = pte_results["int4-g32"]
    old = torchao_numerics(module, x)
    assert outside(old, runtime, float_rounding_bound(module, x)) > 0, \
        "float32 group scales should be outside float rounding of XNNPACK's bf16 ones"


# ---- onnxruntime MatMulNBits (accuracy_level 4) ----------------------------------------------------------

def run_matmul_nbits(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """``module`` lowered alone by the ONNX exporter's linear() (one MatMulNBits node), run in onnxruntime."""
    import onnxruntime
    from onnx import TensorProto

    from edgeforge.export.onnx.layers import GraphBuilder, linear

    graph = GraphBuilder("one_linear")
    source = graph.add_input("x", TensorProto.FLOAT, list(x.shape))
    graph.add_output(linear(graph, source, module, "linear"), "y", TensorProto.FLOAT,
                     [*x.shape[:-1], module.out_features])
    model = graph.model(producer="test", metadata={})
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits"]
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("name", ONNX_LAYERS)
def test_mlas_numerics_match_matmul_nbits_to_float_rounding(name):
    scheme, in_features = ONNX_LAYERS[name]
    module, x = quantized_linear(scheme, in_features, MLAS), real_model_like_inputs(in_features)
    runtime = run_matmul_nbits(module, x)
    with torch.no_grad():
        eager = module(x)
    bound = float_rounding_bound(module, x)
    assert outside(eager, runtime, bound) == 0, \
        f"max |eager - onnxruntime| {(eager - runtime).abs().max():.3g}, bound {bound.min():.3g}..{bound.max():.3g}"
    old = torchao_numerics(module, x)
    assert outside(old, runtime, bound) > 0, "per-token asymmetric activations should be outside float rounding"


def test_one_checkpoint_computes_as_either_runtime():
    module = quantized_linear(INT4_G32, 96, XNNPACK)
    x = real_model_like_inputs(96)
    set_activation_numerics(nn.Sequential(module), MLAS)
    assert module.numerics is MLAS
    runtime = run_matmul_nbits(module, x)
    with torch.no_grad():
        assert outside(module(x), runtime, float_rounding_bound(module, x)) == 0


# ---- where the numerics come from: target, manifest, loader ----------------------------------------------

def test_targets_name_their_runtime_numerics(tmp_path):
    from edgeforge.export.targets import load_target

    assert load_target("host").activation_numerics is XNNPACK
    assert load_target("android-arm64-xnnpack").activation_numerics is XNNPACK
    assert load_target("onnx-cpu").activation_numerics is MLAS
    bad = tmp_path / "npu.toml"
    bad.write_text('format = "onnx"\nbackend = "cpu"\nschemes = ["8da4w"]\nlatency = "x"\n'
                   'activation_numerics = "per-token"\n')
    with pytest.raises(ConfigError, match="npu.toml: target key 'activation_numerics': unknown activation "
                                          "numerics 'per-token'; known: mlas-int8-block, xnnpack"):
        load_target(bad)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from edgeforge.models.llama import LlamaConfig
    from tests.writers import core_state, random_llama, write_hf

    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128,
                         max_seq_len=64)
    return write_hf(tmp_path_factory.mktemp("tiny") / "hf", config, core_state(random_llama(config)))


def test_quantize_records_the_target_numerics_and_the_loader_applies_them(tiny_checkpoint, tmp_path):
    from edgeforge.cli import main
    from edgeforge.quantize import load_quantized_model

    for target, expected in (("onnx-cpu", MLAS), (None, XNNPACK)):
        output = tmp_path / f"q-{target}"
        result = CliRunner().invoke(main, ["quantize", str(tiny_checkpoint), "--recipe", "int4-xnnpack",
                                           "-o", str(output), *(["--target", target] if target else [])],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads((output / "edgeforge.json").read_text())["activation_numerics"] == expected.value
        linears = [m for m in load_quantized_model(output).modules() if isinstance(m, QuantizedLinear)]
        assert linears and all(m.numerics is expected for m in linears)
    overridden = load_quantized_model(tmp_path / "q-onnx-cpu", numerics=XNNPACK)
    assert all(m.numerics is XNNPACK for m in overridden.modules() if isinstance(m, QuantizedLinear))
