"""The budget planner on stories260K: budgets met, refusals before calibration, a reproducible recipe file, the
estimate's curve, and plans no worse than a uniform recipe of the same size."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edgeforge.checkpoints import DEFAULT_CHECKPOINT, open_checkpoint
from edgeforge.cli import main
from edgeforge.export.targets import load_target
from edgeforge.quantize import load_recipe, read_quantized
from edgeforge.quantize.activations import DEFAULT_NUMERICS
from edgeforge.quantize.calibration import build_calibration, with_calibration
from edgeforge.quantize.planner import Knapsack, Planner, Request, Sensitivity
from tests.conftest import SHARED

TEXT = SHARED / "data" / "tinystories-valid" / "tinystories_valid_head.txt"
SMALL = ("--samples", 16, "--seq-len", 64)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(paragraphs[:2000]))
    return path


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def planned(calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "q"
    result = _cli("quantize", "--target", "host", "--budget-bits", 5.0, "--calib", calib, *SMALL, "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def test_plan_meets_its_budget_and_records_explicit_rules(planned):
    record = read_quantized(planned)
    plan = record.plan
    assert 4.95 <= plan["bits_per_weight"] <= 5.0, plan["bits_per_weight"]
    assert record.block_bits_per_weight() == pytest.approx(plan["bits_per_weight"], rel=1e-12)
    schemes = {layer.weight_scheme for name, layer in record.layers.items() if name.startswith("layers.")}
    assert len(schemes) > 1, "a 5-bit budget on stories260K mixes schemes"
    rules = record.recipe.rules
    assert len(rules) == 35 and all(rule["match"].startswith("^layers\\.") for rule in rules)
    assert plan["measured_kld"] > 0 and plan["met"] and plan["rounds"] == 1


def test_plan_recipe_file_reproduces_the_quantized_tensors_bit_for_bit(planned, calib, tmp_path):
    again = tmp_path / "again"
    result = _cli("quantize", "--recipe", planned / "plan-recipe.toml", "--target", "host", "--calib", calib,
                  "-o", again)
    assert result.exit_code == 0, result.stderr
    first, second = load_file(planned / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, different
    assert read_quantized(again).plan is None


def test_estimated_curve_never_rises_with_bits(planned):
    curve = sorted(read_quantized(planned).plan["curve"], key=lambda point: point["bits_per_weight"])
    assert len(curve) > 2 and curve[0]["estimated_kld"] > curve[-1]["estimated_kld"]
    rises = [(a, b) for a, b in zip(curve, curve[1:]) if b["estimated_kld"] > a["estimated_kld"]]
    assert not rises, rises


def test_plan_at_a_uniform_recipes_size_is_estimated_no_worse(calib):
    """int4-gptq (g32, int8 where 32 does not divide) as every layer's scheme vs the plan at exactly its size."""
    checkpoint = open_checkpoint(DEFAULT_CHECKPOINT)
    recipe = with_calibration(load_recipe("int4-gptq"), samples=16, seq_len=64)
    calibration = build_calibration(calib, checkpoint.tokenizer, samples=16, seq_len=64)
    planner = Planner(checkpoint, recipe, load_target("host"), Request(budget_bits=8.0))
    uniform = {name: recipe.scheme_for(name, width)[0] for name, (_, width) in planner.shapes.items()}
    windows = calibration.tokens[-2:]  # any calibration text will do for the estimate
    knapsack = Knapsack(planner, Sensitivity(planner, calibration.tokens, windows, DEFAULT_NUMERICS, print))
    plan, estimated = knapsack.choose(Request(budget_bits=planner.bits(uniform)), (1.0, 0.0))
    assert planner.bits(plan) <= planner.bits(uniform)
    # both are float64 sums of 35 non-negative terms (plus the same offset): rounding moves each by < 1e-14
    assert estimated <= knapsack.estimate(uniform) * (1 + 1e-12), (estimated, knapsack.estimate(uniform))
    assert plan != uniform


def test_budget_no_option_can_meet_is_refused_before_calibration(tmp_path):
    out = tmp_path / "q"
    # the calibration file does not exist: reading it would fail with another message
    result = _cli("quantize", "--target", "host", "--budget-bits", 3.0, "--calib", tmp_path / "missing.txt",
                  "-o", out)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    # int4 g32 with XNNPACK's bf16 scales stores as much as per channel on a 64-wide input: both are 4.5 bits
    assert ("--budget-bits 3: the smallest target host can store is 4.424 bits per weight (int4 g32 on 30, int4 "
            "per-channel on 5 block linears)") in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".q.*"))


@pytest.mark.parametrize("extra, message", [
    (("--budget-bits", -1), "--budget-bits must be a positive number, got -1.0"),
    (("--budget-bits", "nan"), "--budget-bits must be a positive number, got nan"),
    (("--max-kld", 0), "--max-kld must be a positive number, got 0.0"),
    (("--max-kld", "inf"), "--max-kld must be a positive number, got inf"),
    (("--budget-bits", 5, "--max-kld", 0.1), "give one of --budget-bits and --max-kld"),
])
def test_nonsense_requests_are_refused_in_one_line(extra, message, calib, tmp_path):
    result = _cli("quantize", "--target", "host", *extra, "--calib", calib, "-o", tmp_path / "q")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {message}"] or message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


def test_planning_needs_a_target_and_calibration_text(calib, tmp_path):
    result = _cli("quantize", "--budget-bits", 5, "--calib", calib, "-o", tmp_path / "q")
    assert result.exit_code == 2 and "pass --target" in result.stderr, result.stderr
    result = _cli("quantize", "--target", "host", "--budget-bits", 5, "-o", tmp_path / "q")
    assert result.exit_code == 2 and "calibration text: pass --calib PATH" in result.stderr, result.stderr
    assert not (tmp_path / "q").exists()


def test_max_kld_is_met_as_measured_on_held_out_calibration_windows(calib, tmp_path):
    out = tmp_path / "q"
    result = _cli("quantize", "--target", "onnx-cpu", "--recipe", "int4-weight-only", "--max-kld", 0.03,
                  "--calib", calib, *SMALL, "-o", out, "--json", tmp_path / "q.json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads((tmp_path / "q.json").read_text())["plan"]
    assert plan["met"] and plan["measured_kld"] <= 0.03, plan
    assert "held-out calibration windows" in plan["measured_on"]
    assert plan["bits_per_weight"] < max(point["bits_per_weight"] for point in plan["curve"])


def test_max_kld_out_of_reach_fails_with_the_measured_figure(calib, tmp_path):
    result = _cli("quantize", "--target", "host", "--max-kld", 1e-7, "--calib", calib, *SMALL, "-o", tmp_path / "q")
    assert result.exit_code == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "--max-kld 1e-07: the plan measured KLD" in line and "Traceback" not in result.stderr, line
    assert not math.isnan(read_quantized(tmp_path / "q").plan["measured_kld"])


def test_verify_reports_the_achieved_bits_per_weight_next_to_the_drift(planned, tmp_path):
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("\n\n".join(paragraphs[2500:2600]))  # disjoint from the calibration paragraphs
    result = _cli("verify", planned, "--reference", DEFAULT_CHECKPOINT, "--data", evaluation, "--windows", 2,
                  "--seq-len", 64, "--no-cache", "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.stderr
    bits = read_quantized(planned).plan["bits_per_weight"]
    record = json.loads((tmp_path / "v.json").read_text())
    assert record["artifact"]["bits_per_weight"] == pytest.approx(bits, rel=1e-12)
    assert f"size       {bits:.3f} bits per weight over the block linears" in result.stdout, result.stdout


def test_report_page_shows_the_plans_curve(planned):
    from edgeforge.report.html import plan_curve

    html = plan_curve(read_quantized(planned).plan)
    assert html.count("<img") == 1 and "bits per weight, KLD measured" in html
    assert plan_curve(None) == ""
