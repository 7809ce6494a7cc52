"""verify: drift of a quantized stories260K / MiniLM against the fp32 reference, the reference cache,
gates (the recipe's bounds, max_kld_eager derived from the artifact's eager source) and exit codes,
the calibration-overlap refusal, and the JSON record."""

import json
import re
import shutil
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import edgeforge.verify.decoder as decoder_module
from edgeforge.checkpoints import DEFAULT_CHECKPOINT, load_model, open_checkpoint
from edgeforge.cli import main
from edgeforge.errors import ConfigError, InputError
from edgeforge.quantize import load_quantized_model, load_recipe, quantize_checkpoint
from edgeforge.quantize.calibration import build_calibration
from edgeforge.verify.drift import summarize_drift, token_stats, token_windows
from edgeforge.verify.models import open_for_eval
from edgeforge.verify.report import format_verify_report
from edgeforge.verify.reference import DEFAULT_TOP_K, decoder_reference, topk_token_stats
from edgeforge.verify.decoder import EAGER_KLD_SEMS, EAGER_KLD_SLACK, eager_kld_bound
from edgeforge.verify.verify import VerifyOptions, verify
from tests.conftest import SHARED

TEXT = SHARED / "data" / "tinystories-valid" / "tinystories_valid_head.txt"
WINDOWS = ["--seq-len", "128", "--windows", "4"]  # 508 scored tokens: fast, and enough for a verdict
LOOSE_GATES = ["--max-kld", "0.15", "--min-top1", "0.75"]  # RTN int4 of stories260K passes; a planted fault fails


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Calibration text (the first paragraphs), held-out evaluation text, and a re-typed copy of calibration
    paragraphs (a different file, the same documents)."""
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    folder = tmp_path_factory.mktemp("text")
    files = {"calib": paragraphs[:200], "eval": paragraphs[2000:2300], "retyped": paragraphs[:60]}
    for name, chosen in files.items():
        separator = "\n\n\n" if name == "retyped" else "\n\n"
        (folder / f"{name}.txt").write_text(separator.join(chosen) + "\n")
    return {name: folder / f"{name}.txt" for name in files}


@pytest.fixture(scope="module")
def int4(texts, tmp_path_factory):
    """stories260K int4 g32 weight-only (RTN: seconds, not GPTQ's tens) with a tiny calibration set recorded."""
    checkpoint = open_checkpoint(DEFAULT_CHECKPOINT)
    calibration = build_calibration(texts["calib"], checkpoint.tokenizer, samples=8, seq_len=64, seed=0)
    recipe = replace(load_recipe("int4-weight-only"), algorithm="rtn")
    directory = tmp_path_factory.mktemp("int4") / "q"
    quantize_checkpoint(checkpoint, recipe, calibration=calibration, output_dir=directory)
    return directory


@pytest.fixture(scope="module")
def int4_onnx(int4, tmp_path_factory):
    """The int4 checkpoint exported for onnx-cpu: an artifact whose eager source is where its manifest says."""
    from edgeforge.export import export

    return export(int4, "onnx-cpu", tmp_path_factory.mktemp("onnx") / "onnx", max_seq_len=128).path


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _verify_cli(model, data, *extra):
    return _cli("verify", model, "--reference", DEFAULT_CHECKPOINT, "--data", data, *WINDOWS, *extra)


def test_second_verify_reads_the_reference_from_the_cache(int4, texts, tmp_path, monkeypatch):
    runs = []

    def counting(*args, **kwargs):
        runs.append(1)
        return decoder_reference(*args, **kwargs)

    monkeypatch.setattr(decoder_module, "decoder_reference", counting)
    options = VerifyOptions(seq_len=128, windows=4, cache_dir=tmp_path / "cache")
    first = verify(int4, DEFAULT_CHECKPOINT, texts["eval"], options)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and not first.reference_cache.hit
    written = files[0].stat().st_mtime_ns
    second = verify(int4, DEFAULT_CHECKPOINT, texts["eval"], options)
    assert runs == [1], "the reference ran again although its results were cached"
    assert second.reference_cache == replace(first.reference_cache, hit=True)
    assert files[0].stat().st_mtime_ns == written and list((tmp_path / "cache").iterdir()) == files
    assert second.drift == first.drift
    assert files[0].stat().st_size < 4 * 128 * DEFAULT_TOP_K * 9 + 64 * 1024  # top-k summary, not [N, L, vocab] logits


def _float32_topk_slack(cache, window: int, test_logits: torch.Tensor) -> torch.Tensor:
    """How far the cache's float32 rounding can move each position's top-k KLD: every term p (a - b), with
    a = ln p and b = ln q each rounded to float32 (relative error up to eps/2, and p = exp(a) moved by a·eps/2
    relative with it), moves by at most p (|a| + |b| + |a| |a - b|) eps/2; summed over the top k, with a
    factor 2 for the second-order terms."""
    eps = torch.finfo(torch.float32).eps
    ref_top = cache["topk_logprobs"][window].double()
    test_top = torch.log_softmax(test_logits[:-1].double(), -1).gather(-1, cache["topk_ids"][window].long())
    terms = ref_top.exp() * (ref_top.abs() + test_top.abs() + ref_top.abs() * (ref_top - test_top).abs())
    return terms.sum(-1) * eps


def test_topk_kld_is_a_lower_bound_within_1e_3_of_exact(int4, texts):
    checkpoint = open_checkpoint(DEFAULT_CHECKPOINT)
    paragraphs = texts["eval"].read_text().split("\n\n")
    ids = [t for p in paragraphs[:80] for t in checkpoint.tokenizer.encode(p)]
    windows = token_windows(ids, 128, 8)
    reference, test = load_model(checkpoint), load_quantized_model(int4)
    with torch.inference_mode():
        ref_logits, test_logits = reference(windows), test(windows)
    # the cache summarises the very logits the exact statistics use: only the top-k bound differs
    cache = decoder_reference(lambda tokens: ref_logits, windows, top_k=DEFAULT_TOP_K, batch_size=len(windows))
    exact = [token_stats(ref_logits[i, :-1], test_logits[i, :-1], windows[i, 1:]) for i in range(8)]
    bound = [topk_token_stats(cache, i, test_logits[i]) for i in range(8)]
    for window, (e, b) in enumerate(zip(exact, bound)):
        slack = _float32_topk_slack(cache, window, test_logits[window])
        assert (b.kld <= e.kld + slack).all(), "a top-k + rest KLD exceeded the exact KLD"
    exact_stats, bound_stats = summarize_drift(exact), summarize_drift(bound)
    relative = (exact_stats.kld_mean - bound_stats.kld_mean) / exact_stats.kld_mean
    assert 0 <= relative < 1e-3, \
        f"top-{DEFAULT_TOP_K} KLD {bound_stats.kld_mean:.6f} vs exact {exact_stats.kld_mean:.6f}"
    assert bound_stats.ppl_ratio == pytest.approx(exact_stats.ppl_ratio, rel=1e-12)
    assert bound_stats.top1_agreement == exact_stats.top1_agreement


def test_identical_model_has_zero_kld_and_ppl_ratio_one(texts):
    report = verify(DEFAULT_CHECKPOINT, DEFAULT_CHECKPOINT, texts["eval"],
                    VerifyOptions(seq_len=128, windows=4, use_cache=False))
    assert report.reference_cache.path is None and not report.reference_cache.hit
    drift = report.drift
    assert drift.kld_mean_nats == 0.0 and drift.kld_max_nats == 0.0, drift
    assert drift.ppl_ratio == 1.0 and drift.top1_agreement == 1.0 and drift.rms_delta_p == 0.0
    assert report.verdict == "ungated" and report.verdict_line.startswith("UNGATED")


def test_planted_fault_fails_its_gate_with_exit_1(int4, texts, tmp_path):
    from safetensors.torch import load_file, save_file

    clean = _verify_cli(int4, texts["eval"], *LOOSE_GATES)
    assert clean.exit_code == 0, clean.output
    assert re.search(r"^PASS: kld_mean_nats \S+ <= max_kld 0.15; top1_agreement \S+ >= min_top1 0.75; "
                     r"ppl_ratio \S+ <= max_ppl_ratio \S+$", clean.stdout, re.MULTILINE), clean.stdout
    faulty = tmp_path / "faulty"
    shutil.copytree(int4, faulty)
    tensors = load_file(faulty / "model.safetensors")
    tensors["layers.2.attention.wo.scale"] *= 4
    save_file(tensors, faulty / "model.safetensors", metadata={"format": "pt"})
    result = _verify_cli(faulty, texts["eval"], *LOOSE_GATES)
    assert result.exit_code == 1, result.output
    verdict = result.stdout.strip().splitlines()[-1]
    assert re.match(r"FAIL: kld_mean_nats \S+ > max_kld 0.15; top1_agreement \S+ < min_top1 0.75", verdict), verdict
    assert "edgeforge: error:" in result.stderr and "Traceback" not in result.output


def test_recipe_gates_are_the_default(int4, texts):
    result = _verify_cli(int4, texts["eval"], "--max-kld", "1e-9")  # the option overrides max_kld only
    assert result.exit_code == 1, result.output
    assert re.search(r"^gates      min_top1, max_ppl_ratio from recipe int4-weight-only in \S+edgeforge.json$",
                     result.stdout, re.MULTILINE), result.stdout
    assert "gates      max_kld from the command line" in result.stdout
    verdict = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"FAIL: kld_mean_nats [0-9.]+ > max_kld 1e-09", verdict), verdict  # the recipe's gates passed
    assert "max_kld_eager" not in result.stdout  # a quantized checkpoint is its own eager model


def test_overlapping_text_is_refused_with_exit_2_unless_allowed(int4, texts):
    same = _verify_cli(int4, texts["calib"])
    assert same.exit_code == 2, same.output
    assert "overlaps the model's calibration text: it is the calibration text" in same.stderr
    retyped = _verify_cli(int4, texts["retyped"])  # another file holding calibration documents
    assert retyped.exit_code == 2, retyped.output
    assert re.search(r"\d+ of \d+ evaluated documents were calibration documents \(.*calibration.json\)",
                     retyped.stderr), retyped.stderr
    allowed = _verify_cli(int4, texts["retyped"], "--allow-overlap", *LOOSE_GATES)
    assert allowed.exit_code == 0, allowed.output
    assert "allowed by --allow-overlap" in allowed.stdout and allowed.stdout.strip().endswith(
        allowed.stdout.strip().splitlines()[-1]) and allowed.stdout.strip().splitlines()[-1].startswith("PASS: ")


def test_short_boilerplate_documents_do_not_count_as_overlap():
    from edgeforge.errors import InputError
    from edgeforge.quantize.calibration import document_fingerprint
    from edgeforge.verify.lineage import Lineage
    from edgeforge.verify.measured import check_overlap

    story = "Once upon a time there was a little dog who liked to run in the park."
    lineage = Lineage(calibrated=True, calibration_sha256="0" * 64, fingerprints_source="calibration.json",
                      calibration_fingerprints=frozenset(map(document_fingerprint, ["The end.", story])))
    overlap = check_overlap(lineage, ["The  end.", "A different story about a cat and a very big red ball."], "1" * 64,
                            allow=False, data_path="eval.txt")
    assert (overlap.overlapping_documents, overlap.short_documents, overlap.evaluated_documents) == (0, 1, 2)
    with pytest.raises(InputError, match="1 of 2 evaluated documents were calibration documents"):
        check_overlap(lineage, ["The end.", story], "1" * 64, allow=False, data_path="eval.txt")


def test_cli_json_record_has_the_documented_fields(int4, texts, tmp_path):
    out = tmp_path / "verify.json"
    result = _verify_cli(int4, texts["eval"], *LOOSE_GATES, "--json", out)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert {"kind", "schema_version", "created", "verdict", "verdict_line", "artifact", "reference", "data", "settings",
            "drift", "embedding", "samples", "eager", "gates", "gates_source", "overlap", "reference_cache", "timing",
            "notes", "versions"} <= set(record)
    assert record["kind"] == "edgeforge.verify" and record["schema_version"] == 1 and record["verdict"] == "pass"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["created"])
    assert record["artifact"]["kind"] == "quantized" and record["artifact"]["scheme"] == "4w"
    assert all(len(record[part]["sha256"]) == 64 for part in ("artifact", "reference", "data"))
    assert record["settings"] == {"seq_len_tokens": 128, "windows": 4, "scored_tokens": 508, "top_k": DEFAULT_TOP_K}
    assert 0 < record["reference_cache"]["rest_mass_mean"] < 1e-3
    drift = record["drift"]
    for key in ("kld_mean_nats", "kld_mean_nats_sem", "kld_median_nats", "kld_p90_nats", "kld_p99_nats",
                "kld_max_nats", "ppl_ref", "ppl_test", "ppl_ratio", "ppl_ratio_sem", "top1_agreement",
                "top1_agreement_sem", "rms_delta_p", "rms_delta_p_sem"):
        assert isinstance(drift[key], float), key
    assert drift["token_count"] == 508 and len(record["samples"]["window_kld_mean_nats"]) == 4
    assert [g["gate"] for g in record["gates"]] == ["max_kld", "min_top1", "max_ppl_ratio"]
    assert [drift[g["statistic"]] for g in record["gates"]] == [g["value"] for g in record["gates"]]  # one name
    assert all(g["passed"] for g in record["gates"]) and [g["source"] for g in record["gates"]] == ["option"] * 2 + ["recipe"]
    assert record["eager"] is None  # a quantized checkpoint is its own eager model
    assert record["overlap"]["method"] == "fingerprints" and record["overlap"]["overlapping_documents"] == 0
    assert record["versions"]["edgeforge"] and record["versions"]["torch"]
    only_json = _verify_cli(int4, texts["eval"], *LOOSE_GATES, "--json", "-")
    assert json.loads(only_json.stdout)["drift"] == drift  # stdout is the record alone


@pytest.mark.parametrize("extra, problem", [
    (["--min-cosine", "0.9"], "--min-cosine does not apply to a llama model"),
    (["--seq-len", "1024"], "--seq-len 1024 exceeds the model's context 512"),
    (["--windows", "100000"], "asked for 100000 windows of 128 tokens"),
])
def test_bad_options_exit_2_with_one_line(int4, texts, extra, problem):
    result = _cli("verify", int4, "--reference", DEFAULT_CHECKPOINT, "--data", texts["eval"], "--seq-len", "128",
                  *extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("edgeforge: error:")]
    assert len(errors) == 1 and problem in errors[0] and "Traceback" not in result.output, result.stderr


def test_quantized_reference_is_refused(int4, texts):
    result = _cli("verify", int4, "--reference", int4, "--data", texts["eval"])
    assert result.exit_code == 2 and "must be a full-precision checkpoint" in result.stderr, result.output


def test_minilm_int8_embeddings_stay_close_to_fp32(minilm_dir, minilm_int8, texts, tmp_path):
    fp32, int8 = minilm_dir, minilm_int8
    out = tmp_path / "verify.json"
    result = _cli("verify", int8, "--reference", fp32, "--data", texts["eval"], "--sentences", "32", "--seq-len", "64",
                  "--json", out)
    assert result.exit_code == 0, result.output
    embedding = json.loads(out.read_text())["embedding"]
    assert embedding["sentence_count"] == 32 and embedding["neighbours"] == 10
    assert embedding["cosine_mean"] > 0.99 and embedding["cosine_min"] > 0.99, embedding
    assert 0.5 <= embedding["recall_at_k"] <= 1.0, embedding
    assert "Recall@10" in result.stdout and result.stdout.strip().splitlines()[-1] == \
        f"PASS: cosine_mean {embedding['cosine_mean']:.4g} >= min_cosine 0.995"


def test_onnx_artifact_is_verified_in_onnxruntime_with_its_sources_lineage(int4, int4_onnx, texts):
    eager = verify(int4, DEFAULT_CHECKPOINT, texts["eval"], VerifyOptions(seq_len=128, windows=4))
    report = verify(int4_onnx, DEFAULT_CHECKPOINT, texts["eval"], VerifyOptions(seq_len=128, windows=4))
    assert report.artifact.kind == "artifact" and report.artifact.format == "onnx"
    assert report.reference_cache.hit, "the eager run's reference results were not reused"
    assert report.overlap.method == "fingerprints"  # export copied the source's fingerprints into the artifact
    assert report.overlap.source == str(int4_onnx / "calibration.json")
    assert [g.gate for g in report.gates] == ["max_kld", "min_top1", "max_ppl_ratio", "max_kld_eager"]
    assert report.gates_source.startswith("recipe int4")
    assert not report.notes, report.notes  # the reference is the checkpoint the artifact was made from
    assert report.drift.kld_mean_nats == pytest.approx(eager.drift.kld_mean_nats, rel=0.1)  # runtime vs eager
    with pytest.raises(ConfigError, match="exceeds the model's context 128"):
        verify(int4_onnx, DEFAULT_CHECKPOINT, texts["eval"], VerifyOptions(seq_len=256, windows=1))
    runtime, eager_model = open_for_eval(int4_onnx), open_for_eval(int4)  # the one forward() of both kinds
    tokens = torch.tensor([[1, 403, 29, 11, 70, 5]])
    for step in (slice(0, 5), slice(5, 6)):  # a prefill, then a decode step through each KV cache
        positions = torch.arange(step.start, step.stop)
        cosine = torch.nn.functional.cosine_similarity(runtime.forward(tokens[:, step], positions),
                                                       eager_model.forward(tokens[:, step], positions), dim=-1)
        assert cosine.min() > 0.9999, cosine


def test_eager_kld_bound_is_the_eager_kld_plus_slack_plus_three_paired_sems():
    # window differences 0.01, 0.01, 0.04: mean 0.02, sample sd sqrt(6e-4 / 2), sem = sd / sqrt(3) = 0.01
    bound = eager_kld_bound([0.10, 0.20, 0.30], [0.11, 0.21, 0.34])
    assert bound.windows == 3 and bound.eager_kld == pytest.approx(0.2, rel=1e-12)
    assert bound.paired_sem == pytest.approx(0.01, rel=1e-12)
    assert (EAGER_KLD_SLACK, EAGER_KLD_SEMS) == (0.05, 3.0)  # the values docs/gates.md justifies
    assert bound.threshold == pytest.approx(0.2 * 1.05 + 3 * 0.01, rel=1e-12)
    single = eager_kld_bound([0.5], [0.9])  # one window: no spread to measure, the slack alone
    assert single.paired_sem == 0.0 and single.threshold == pytest.approx(0.525, rel=1e-12)
    with pytest.raises(InputError, match="they must pair up"):
        eager_kld_bound([0.1, 0.2], [0.1])


def test_artifact_is_held_to_its_eager_source_which_is_run_once_and_cached(int4_onnx, texts, tmp_path):
    options = VerifyOptions(seq_len=128, windows=4, cache_dir=tmp_path / "cache")
    first = verify(int4_onnx, DEFAULT_CHECKPOINT, texts["eval"], options)
    gate = first.gates[-1]
    assert (gate.gate, gate.statistic, gate.source, gate.passed) == ("max_kld_eager", "kld_mean_nats", "eager", True)
    eager = first.eager
    assert not eager.cache_hit and len(eager.window_kld_mean_nats) == 4 and first.timing.eager_seconds > 0
    # 4w: onnxruntime runs the eager float arithmetic; logits agree to float32 rounding summed over the layers
    # (~1e-6 of their scale), which moves a KLD of ~0.1 by far less than 1e-4 of itself
    assert first.drift.kld_mean_nats == pytest.approx(eager.kld_mean_nats, rel=1e-4)
    assert gate.threshold >= eager.kld_mean_nats * (1 + EAGER_KLD_SLACK)
    second = verify(int4_onnx, DEFAULT_CHECKPOINT, texts["eval"], options)
    assert second.eager == replace(eager, cache_hit=True) and second.timing.eager_seconds == 0
    text = format_verify_report(second)
    assert re.search(r"^eager      \S+ \(its quantized checkpoint\) on the same windows: KLD [0-9.]+ ± [0-9.]+, "
                     r"top-1 [0-9.]+%, PPL ratio [0-9.]+ \(cached\)$", text, re.MULTILINE), text
    assert re.search(r"^gates      max_kld_eager = eager source's KLD \S+ x 1.05 \+ 3 x paired sem \S+ \(4 windows\)$",
                     text, re.MULTILINE), text


def test_a_lowering_fault_in_one_layer_fails_max_kld_eager_with_exit_1(int4_onnx, texts, tmp_path):
    """One layer's scales x4 in the ONNX file only, as a lowering bug would leave them; the eager source is intact."""
    import onnx
    from onnx import numpy_helper

    faulty = tmp_path / "faulty"
    shutil.copytree(int4_onnx, faulty)
    graph = onnx.load(str(faulty / "model.onnx"))
    scales = next(t for t in graph.graph.initializer if t.name == "layers.2.attention.wo.scales")
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * 4, scales.name))
    onnx.save(graph, str(faulty / "model.onnx"))
    result = _verify_cli(faulty, texts["eval"])
    assert result.exit_code == 1, result.output
    verdict = result.stdout.strip().splitlines()[-1]  # KLD ~0.7: inside the int4 bounds, 2x its eager source's
    assert re.fullmatch(r"FAIL: kld_mean_nats [0-9.]+ > max_kld_eager [0-9.]+ \(the artifact drifts beyond its own "
                        r"quantized checkpoint run eagerly: a fault in the lowering or the runtime, not the "
                        r"quantization\)", verdict), verdict
    assert "edgeforge: error:" in result.stderr and "Traceback" not in result.output


def test_an_artifact_whose_eager_source_changed_or_went_keeps_the_recipe_bounds_with_a_note(int4, texts, tmp_path):
    from safetensors.torch import load_file, save_file

    from edgeforge.export import export

    source = tmp_path / "q"
    shutil.copytree(int4, source)
    artifact = export(source, "onnx-cpu", tmp_path / "onnx", max_seq_len=128).path
    skipped = _verify_cli(artifact, texts["eval"], "--no-eager")
    assert skipped.exit_code == 0 and "max_kld_eager" not in skipped.stdout and "eager " not in skipped.stdout, \
        skipped.output
    tensors = load_file(source / "model.safetensors")
    tensors["layers.0.attention.wo.scale"] *= 2
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    changed = _verify_cli(artifact, texts["eval"])
    assert changed.exit_code == 0, changed.output
    assert re.search(rf"^note       the quantized checkpoint {re.escape(str(source))} changed since this artifact was "
                     r"exported from it \(sha256 \w{12}, recorded \w{12}\): max_kld_eager not applied$",
                     changed.stdout, re.MULTILINE), changed.stdout
    assert changed.stdout.strip().splitlines()[-1].startswith("PASS: kld_mean_nats") and "max_kld_eager" not in \
        changed.stdout.strip().splitlines()[-1]
    shutil.rmtree(source)
    gone = _verify_cli(artifact, texts["eval"])
    assert gone.exit_code == 0, gone.output
    assert "note       the quantized checkpoint this artifact was exported from is not where its manifest says: " \
           "max_kld_eager not applied, only the recipe's bounds" in gone.stdout, gone.stdout


@pytest.mark.slow
def test_pte_artifact_is_verified_in_executorch(texts, tmp_path):
    from edgeforge.errors import UnknownNameError
    from edgeforge.export import export
    from edgeforge.export.artifact import exporter_for

    try:
        exporter_for("pte")
    except UnknownNameError:
        pytest.skip("the ExecuTorch exporter is not registered in this checkout yet")
    checkpoint = open_checkpoint(DEFAULT_CHECKPOINT)  # XNNPACK runs 8da4w (dynamic int8 activations), not 4w
    calibration = build_calibration(texts["calib"], checkpoint.tokenizer, samples=8, seq_len=64, seed=0)
    quantized = tmp_path / "8da4w"
    quantize_checkpoint(checkpoint, replace(load_recipe("int4-gptq"), algorithm="rtn"), calibration=calibration,
                        output_dir=quantized)
    # check=False: the guard's top-1 >= 0.97 over 96 positions trips on near-ties of this RTN model (0.958 at
    # min cosine 0.9999); verify below is the check under test.
    artifact = export(quantized, "host", tmp_path / "pte", max_seq_len=128, check=False)
    eager = verify(quantized, DEFAULT_CHECKPOINT, texts["eval"], VerifyOptions(seq_len=128, windows=4))
    report = verify(artifact.path, DEFAULT_CHECKPOINT, texts["eval"], VerifyOptions(seq_len=128, windows=4))
    assert report.artifact.format == "pte" and report.reference_cache.hit
    assert report.drift.kld_mean_nats == pytest.approx(eager.drift.kld_mean_nats, rel=0.1)
    assert report.gates[-1].gate == "max_kld_eager" and report.verdict == "pass", report.verdict_line


def test_artifact_from_the_broken_int8_weight_only_xnnpack_lowering_fails_verify(texts, tmp_path):
    """The miscompile the export guard stops (XNNPACK drops weight-only scales), exported with the guard
    bypassed through a target that claims to run 8w: verify, run on the artifact itself, fails it."""
    from edgeforge.export import export, load_target
    from edgeforge.models.llama import LlamaConfig
    from tests.conftest import STORIES
    from tests.writers import core_state, random_llama, write_hf

    config = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=128, max_seq_len=128)
    reference = write_hf(tmp_path / "fp32", config, core_state(random_llama(config)))
    shutil.copyfile(STORIES / "tok512.model", reference / "tok512.model")
    quantize_checkpoint(open_checkpoint(reference), load_recipe("int8-weight-only"), calibration=None,
                        output_dir=tmp_path / "q")
    claims_8w = replace(load_target("host"), name="claims-8w", schemes=("8w",))
    export(tmp_path / "q", claims_8w, tmp_path / "pte", max_seq_len=128, check=False)
    result = _cli("verify", tmp_path / "pte", "--reference", reference, "--data", texts["eval"], *WINDOWS)
    assert result.exit_code == 1, result.output
    # a random model's distributions are nearly flat, so no absolute bound separates it: its eager source does
    assert re.search(r"kld_mean_nats [0-9.]+ > max_kld_eager [0-9.]+ \(the artifact drifts beyond its own quantized",
                     result.stdout.strip().splitlines()[-1]), result.stdout
    eager = _cli("verify", tmp_path / "q", "--reference", reference, "--data", texts["eval"], *WINDOWS)
    assert eager.exit_code == 0, eager.output  # the same quantized weights, run eager, are fine
