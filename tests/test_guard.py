"""The two-tier export guard: tier 1 against the eager model, tier 2 (``fp32-drift``) against fp32.

Real weights: 4 layers and 4096 ids of SmolLM2-135M (tests/realweights.py). Data-free 8da4w artifacts of it
pass the guard; with the eager model rounding as it did before it followed each runtime's numerics (float32
group scales for XNNPACK, per-token activations for onnxruntime) the one-tier guard refused them (cosine
0.996-0.997 against eager), tier 1 still does, and tier 2 accepts them with its figures in the manifest.
Planted miscompiles (int8 weight-only through XNNPACK, swapped nibbles, scales x4) are refused by both
tiers. The statistics are checked against float64 arithmetic done by hand.
"""

import json
import math
import shutil
from dataclasses import asdict, replace

import pytest
import torch

from edgeforge.errors import GateFailed
from edgeforge.export import Target, export, guard, load_target, open_source
from edgeforge.export.guard import DRIFT_FLOOR_SHARE, DRIFT_Z, judge_drift
from edgeforge.export.tolerance import scheme_tolerance
from edgeforge.quantize.metrics import kl_divergence_nats
from edgeforge.quantize import load_quantized_model

# ---- the statistics ----


def test_kl_divergence_is_the_float64_sum_over_the_vocabulary():
    reference = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    candidate = torch.tensor([[1.5, 1.0, -1.0], [3.0, 0.0, -3.0]])

    def softmax(row):
        total = sum(math.exp(x) for x in row)
        return [math.exp(x) / total for x in row]

    expected = [sum(p * math.log(p / q) for p, q in zip(softmax(r.tolist()), softmax(c.tolist())))
                for r, c in zip(reference, candidate)]
    got = kl_divergence_nats(reference.double().log_softmax(-1), candidate.double().log_softmax(-1))
    assert got.dtype == torch.float64
    # float32 inputs are exact in float64; the sums of 3 terms lose at most a few float64 eps
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=8 * 2.0**-52), got
    same = reference.double().log_softmax(-1)
    assert kl_divergence_nats(same, same).abs().max() <= 4 * 2.0**-52


def test_judge_drift_bounds_the_paired_excess_by_its_sem_plus_a_share_of_eager_drift():
    eager = torch.tensor([0.10, 0.20, 0.30, 0.40])
    artifact = torch.tensor([0.12, 0.19, 0.33, 0.44])  # differences 0.02, -0.01, 0.03, 0.04
    hits_eager = torch.tensor([True, True, False, True])
    hits_artifact = torch.tensor([True, False, False, True])  # shortfall 0, 1, 0, 0
    report = judge_drift(artifact, eager, hits_artifact, hits_eager, tokens="text")

    differences = [a - e for a, e in zip(artifact.tolist(), eager.tolist())]  # the float32 values, in float64
    mean = sum(differences) / 4
    sem = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3 / 4)
    eager_mean = sum(eager.tolist()) / 4
    assert report.kld_excess_mean == pytest.approx(mean, rel=1e-12)  # float64 sums of 4 terms
    assert report.kld_excess_sem == pytest.approx(sem, rel=1e-12)
    assert report.kld_excess_bound == pytest.approx(DRIFT_Z * sem + DRIFT_FLOOR_SHARE * eager_mean, rel=1e-12)
    shortfall_sem = math.sqrt((3 * 0.25**2 + 0.75**2) / 3 / 4)
    assert report.top1_shortfall_mean == 0.25 and report.top1_shortfall_sem == pytest.approx(shortfall_sem)
    assert report.top1_shortfall_bound == pytest.approx(DRIFT_Z * shortfall_sem + DRIFT_FLOOR_SHARE * 0.25)
    assert report.passed and report.positions == 4 and report.top1_eager == 0.75


def test_judge_drift_refuses_a_consistent_excess_and_a_consistent_top1_loss():
    generator = torch.Generator().manual_seed(0)
    eager = 0.2 + 0.05 * torch.rand(256, generator=generator)
    hits = torch.ones(256, dtype=torch.bool)
    worse = judge_drift(eager * 1.5, eager, hits, hits, tokens="random")  # 50% more drift everywhere
    assert not worse.passed and worse.kld_excess_mean > worse.kld_excess_bound
    fewer_hits = hits.clone()
    fewer_hits[::4] = False  # a quarter of fp32's top tokens lost, kld unchanged
    assert not judge_drift(eager, eager, fewer_hits, hits, tokens="random").passed
    assert judge_drift(eager, eager, hits, hits, tokens="random").passed  # the same model passes


# ---- real weights: SmolLM2-135M's first layers (conftest: smollm2_slice, smollm2_slice_int4) ----

MAX_SEQ_LEN = 128
XNNPACK_8W = Target(name="xnnpack-8w", format="pte", backend="xnnpack", schemes=("fp32", "8w"),
                    latency="here")  # lets 8w past the scheme check, as in test_export_pte


@pytest.fixture(scope="module")
def host_int4(smollm2_slice_int4, tmp_path_factory):
    """The int4 slice exported to a .pte for this machine, through the guard as export runs it."""
    return export(smollm2_slice_int4, "host", tmp_path_factory.mktemp("pte") / "artifact", max_seq_len=MAX_SEQ_LEN)


def onnx_with_per_token_eager() -> Target:
    """onnx-cpu with the eager model rounding activations per token, asymmetric, as XNNPACK does (and as it did
    for every target before it followed the runtime's numerics); MLAS rounds per block, symmetric."""
    from edgeforge.quantize.activations import ActivationNumerics

    return replace(load_target("onnx-cpu"), activation_numerics=ActivationNumerics.XNNPACK)


def assert_fp32_drift_passed(record: guard.GuardResult) -> None:
    """The guard record of an artifact tier 1 refused (below the one-tier guard's tolerance) and tier 2 passed."""
    assert record.test == "fp32-drift" and record.passed, record
    min_cosine, min_top1 = scheme_tolerance("8da4w")
    assert record.min_cosine < min_cosine or record.top1_agreement < min_top1, record
    drift = record.fp32_drift
    assert drift.passed and drift.tokens == "text", drift
    assert drift.positions == guard.DRIFT_WINDOWS * guard.DRIFT_WINDOW
    assert drift.kld_excess_mean <= drift.kld_excess_bound < 0.25 * drift.kld_eager_mean, drift
    assert drift.top1_shortfall_mean <= drift.top1_shortfall_bound, drift


@pytest.mark.slow  # the .pte export of 4 layers (XNNPACK lowering): 4-6 min on a busy 2-core machine
def test_real_weights_int4_pte_passes_the_guard(host_int4):
    record = host_int4.record.guard
    assert record.passed and record.test in ("eager", "fp32-drift"), record
    assert (record.fp32_drift is None) == (record.test == "eager")


@pytest.mark.slow
def test_fp32_drift_accepts_the_pte_that_an_eager_model_with_float32_scales_refuses(host_int4, smollm2_slice_int4,
                                                                                   monkeypatch):
    """The eager model as it was before it followed XNNPACK's bf16 group scales (commit bd81c75): the one-tier
    guard refused this .pte (cosine 0.996), yet its drift from fp32 is the eager model's."""
    from edgeforge.export.source import open_fp32_reference
    from edgeforge.quantize import modules

    monkeypatch.setattr(modules, "runtime_weight_scale", lambda scale, numerics: scale)
    source = open_source(smollm2_slice_int4)
    record = guard.check_decoder(host_int4.open(), source.model, scheme=source.scheme, max_seq_len=MAX_SEQ_LEN,
                                 fp32_model=lambda: open_fp32_reference(source), tokenizer=source.tokenizer)
    assert_fp32_drift_passed(record)


def test_fp32_drift_accepts_the_onnx_artifact_an_eager_model_with_per_token_rounding_refuses(smollm2_slice_int4,
                                                                                            tmp_path):
    """onnx-cpu with the eager model rounding activations as before it followed MLAS (per token, asymmetric;
    MLAS rounds per block, symmetric): the one-tier guard refused it (cosine 0.997-0.998); tier 2 passes it, and the
    manifest and the export summary say which test decided."""
    from edgeforge.cli.export import format_export_summary

    artifact = export(smollm2_slice_int4, onnx_with_per_token_eager(), tmp_path / "artifact", max_seq_len=MAX_SEQ_LEN)
    record = artifact.record.guard
    assert_fp32_drift_passed(record)
    assert json.loads((artifact.path / "edgeforge.json").read_text())["guard"] == asdict(record)
    summary = format_export_summary(artifact.path, artifact.record)
    assert f"passed on drift from fp32 (against eager: min cosine {record.min_cosine:.5f}" in summary, summary


def test_fp32_drift_refuses_when_the_fp32_source_is_missing_or_changed(smollm2_slice, smollm2_slice_int4, tmp_path):
    """Tier 2 needs the model the checkpoint was quantized from: gone or changed, the guard refuses and says so
    (an eager model that rounds unlike MLAS makes tier 1 fail, as above)."""
    quantized = tmp_path / "q"
    shutil.copytree(smollm2_slice_int4, quantized)
    manifest_path = quantized / "edgeforge.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"]["path"] = str(tmp_path / "gone")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(GateFailed, match=r"fp32-drift test cannot run: .*gone: the fp32 checkpoint this model was "
                                         r"quantized from is missing") as refusal:
        export(quantized, onnx_with_per_token_eager(), tmp_path / "missing", max_seq_len=MAX_SEQ_LEN)
    assert refusal.value.exit_code == 1 and not (tmp_path / "missing").exists()

    manifest["source"]["path"], manifest["source"]["sha256"] = str(smollm2_slice), "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(GateFailed, match=r"fp32-drift test cannot run: .*sha256 [0-9a-f]{12}\.\.\., not the "
                                         r"000000000000\.\.\. this model was quantized from"):
        export(quantized, onnx_with_per_token_eager(), tmp_path / "changed", max_seq_len=MAX_SEQ_LEN)
    assert not (tmp_path / "changed").exists()


# ---- planted miscompiles: refused by both tiers ----

def test_swapped_nibbles_are_refused_by_both_tiers(smollm2_slice_int4, tmp_path, monkeypatch):
    """A lowering bug in ONNX's int4 packing: the two nibbles of each byte swapped."""
    from edgeforge.export.onnx import layers as onnx_layers
    from edgeforge.quantize.scheme import pack_int4

    def swapped_nibbles(qdata):
        packed = pack_int4(qdata)
        return (packed >> 4) | (packed << 4)

    monkeypatch.setattr(onnx_layers, "pack_int4", swapped_nibbles)
    with pytest.raises(GateFailed) as refusal:
        export(smollm2_slice_int4, "onnx-cpu", tmp_path / "artifact", max_seq_len=MAX_SEQ_LEN)
    assert_refused_by_both_tiers(refusal.value, "8da4w")
    assert not (tmp_path / "artifact").exists()


def test_scales_four_times_too_large_in_one_layer_are_refused_by_both_tiers(smollm2_slice_int4, tmp_path,
                                                                             monkeypatch):
    """A lowering bug in one layer's scales: layer 1's down projection written with 4x its scales."""
    from edgeforge.export.onnx import layers as onnx_layers

    write = onnx_layers.nbits_tensors
    wrong = load_quantized_model(smollm2_slice_int4).layers[1].feed_forward.w2.qdata

    def four_times_the_scales(module, block_size):
        tensors = write(module, block_size)
        if module.qdata.shape == wrong.shape and torch.equal(module.qdata, wrong):
            tensors["scales"] = tensors["scales"] * 4
        return tensors

    monkeypatch.setattr(onnx_layers, "nbits_tensors", four_times_the_scales)
    with pytest.raises(GateFailed) as refusal:
        export(smollm2_slice_int4, "onnx-cpu", tmp_path / "artifact", max_seq_len=MAX_SEQ_LEN)
    assert_refused_by_both_tiers(refusal.value, "8da4w")


@pytest.mark.slow
def test_int8_weight_only_through_xnnpack_is_refused_by_both_tiers_on_real_weights(smollm2_slice, tmp_path):
    """XNNPACK's weight-only int8 linear drops the scale: far from eager and from fp32 (fast on a random model
    in test_export_pte)."""
    from edgeforge.checkpoints import open_checkpoint
    from edgeforge.quantize import load_recipe, quantize_checkpoint

    quantized = tmp_path / "q8"
    quantize_checkpoint(open_checkpoint(smollm2_slice), load_recipe("int8-weight-only"), calibration=None,
                        output_dir=quantized)
    with pytest.raises(GateFailed) as refusal:
        export(quantized, XNNPACK_8W, tmp_path / "artifact", max_seq_len=MAX_SEQ_LEN)
    assert_refused_by_both_tiers(refusal.value, "8w")


def assert_refused_by_both_tiers(refusal: GateFailed, scheme: str) -> None:
    message = str(refusal)
    assert refusal.exit_code == 1
    assert f"disagree with the eager {scheme} model (min cosine" in message, message
    assert "the fp32-drift test refuses it too: mean KLD to fp32" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("target", ["host", "onnx-cpu"])
def test_full_smollm2_int4_passes_the_guard(target, shared, tmp_path):
    """All 30 layers and the whole vocabulary: data-free 8da4w for each runtime passes, by either test."""
    from edgeforge.checkpoints import open_checkpoint
    from edgeforge.quantize import load_recipe, quantize_checkpoint
    from tests.realweights import smollm2_slice

    full = smollm2_slice(layers=30, vocab=49_152)
    quantized = tmp_path / "q"
    quantize_checkpoint(open_checkpoint(full), load_recipe("int4-xnnpack"), calibration=None, output_dir=quantized)
    record = export(quantized, target, tmp_path / "artifact", max_seq_len=MAX_SEQ_LEN).record.guard
    assert record.passed, record
    if record.test == "fp32-drift":
        assert_fp32_drift_passed(record)
