"""bench: a record with every figure filled, raw samples per repetition, an impossible share flagged,
the CLI table on stdout, and one-line errors for bad options.

Runs are tiny (short prompts, 2 repetitions, a 64 MiB bandwidth working set, 1 thread): they check the
plumbing and the record, not the speed of anything.
"""

import json
import math
from dataclasses import replace

import pytest
from click.testing import CliRunner

from edgeforge.checkpoints import DEFAULT_CHECKPOINT, open_checkpoint
from edgeforge.cli import main
from edgeforge.verify.machine import cpu_model
from edgeforge.verify.bench import BenchSettings, bandwidth_ceiling, bench, decode_bytes_per_token, format_bench

REPETITIONS = 2
TINY = BenchSettings(prompt_lengths=(4, 8), decode_tokens=4, repetitions=REPETITIONS, warmup=1, threads=1,
                     bandwidth_bytes=64 * 2**20)


@pytest.fixture(scope="module")
def record(stories_int4):
    return bench(stories_int4, settings=TINY)


def _positive_numbers(value, where="record"):
    """Every number in the JSON form is finite and, except spreads and shares, positive."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("iqr", "stddev", "q1", "min") or key.startswith(("speedup", "share")):
                continue
            _positive_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _positive_numbers(item, f"{where}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        assert math.isfinite(value) and value > 0 or where.endswith((".depth", ".seed", ".warmup")) or \
            "prompt_token_ids" in where or ".cores" in where or \
            where.endswith((".warmup_s", ".cooldown_s", ".gate_wait_s")) or ".load_average" in where, \
            f"{where} = {value}"  # waits not asked for are 0; an idle machine's load average may be 0


def test_bench_quantized_checkpoint_against_fp32_reference(record, stories_int4):
    candidate, reference = record.candidate, record.reference
    assert candidate.scheme == "8da4w" and candidate.path == str(stories_int4)
    assert reference.scheme == "fp32" and reference.path == str(DEFAULT_CHECKPOINT), "reference from the manifest"
    assert candidate.format == reference.format == "eager", "the opener's one word for models run in torch"
    assert candidate.threads_note.startswith("torch.set_num_threads(1), CPU affinity"), "the local runner pins"
    assert [t.name for t in candidate.tests] == ["pp4", "pp8", "tg4"] == [t.name for t in reference.tests]
    for model in record.models:
        assert model.load_s > 0 and model.peak_rss_bytes >= model.rss_after_load_bytes > 0
        assert model.size_bytes > 0 and model.parameters > 0 and model.ceiling.bytes_per_token > 0
        assert model.ceiling.ceiling_tok_s > 0 and model.ceiling.share_raw > 0
        for test in model.tests:
            assert test.tok_s.median > 0 and test.tok_s.n == REPETITIONS
            assert (test.ttft_ms is not None) == test.name.startswith("pp")
    assert all(t.speedup.median > 0 and t.speedup.n == REPETITIONS for t in candidate.tests)
    assert all(t.speedup is None for t in reference.tests)
    # int4 weights + fp32 scales + one row of the untied embedding read far fewer bytes than fp32
    assert candidate.ceiling.bytes_per_token < reference.ceiling.bytes_per_token / 3
    assert record.machine.cpu_model and record.machine.timestamp.endswith("Z")
    assert record.machine.versions["torch"] and record.settings.threads == 1
    # stories260K's weights (0.2-1 MB) are read far faster than 64 MiB: they sit in cache, and bench says so
    assert {p["bytes"] for p in record.bandwidth.probes} == {m.ceiling.bytes_per_token for m in record.models}


def test_json_record_keeps_raw_samples_per_repetition(record):
    data = json.loads(json.dumps(record.to_dict()))
    assert data["kind"] == "edgeforge.bench"
    for model in data["models"]:
        for test in model["tests"]:
            assert len(test["samples_s"]) == len(test["samples_tok_s"]) == REPETITIONS, test["name"]
    assert len(data["bandwidth"]["read_samples_gb_s"]) >= REPETITIONS
    assert [len(ids) for ids in data["prompt_token_ids"]] == [4, 8]
    _positive_numbers(data)


def test_share_above_the_ceiling_is_flagged_not_reported(record):
    impossible = bandwidth_ceiling(bytes_per_token=1_000_000, bandwidth_gb_s=1e-6, decode_tok_s=50.0)
    assert impossible.ceiling_tok_s == pytest.approx(1e-3)
    assert not impossible.valid and impossible.share is None and impossible.share_raw > 1
    assert "invalid" in impossible.note and "byte count or the timing is wrong" in impossible.note
    cached = bandwidth_ceiling(bytes_per_token=1_000_000, bandwidth_gb_s=1e-6, decode_tok_s=50.0, at_size_gb_s=40.0)
    assert not cached.valid and cached.fits_in_cache and "served from cache" in cached.note
    plausible = bandwidth_ceiling(bytes_per_token=1_000_000, bandwidth_gb_s=10.0, decode_tok_s=5000.0,
                                  at_size_gb_s=11.0)
    assert plausible.valid and plausible.share == pytest.approx(0.5) and plausible.note is None
    resident = bandwidth_ceiling(bytes_per_token=1_000_000, bandwidth_gb_s=10.0, decode_tok_s=5000.0,
                                 at_size_gb_s=60.0)
    assert resident.valid and resident.share == pytest.approx(0.5) and "no roofline" in resident.note

    flagged = replace(record, models=[replace(record.candidate, ceiling=impossible), record.reference])
    text = format_bench(flagged)
    assert "reached: INVALID" in text and "invalid:" in text


def test_bytes_per_token_counts_one_row_of_an_untied_embedding():
    checkpoint = open_checkpoint(DEFAULT_CHECKPOINT)
    config = checkpoint.config  # tied: the head reads the whole table, once
    assert decode_bytes_per_token(config, None, architecture_name="llama") == checkpoint.parameter_count * 4
    untied = replace(config, tie_embeddings=False)  # a separate head, and one embedding row per token
    untied_bytes = decode_bytes_per_token(untied, None, architecture_name="llama")
    assert untied_bytes == (checkpoint.parameter_count + config.dim) * 4


PI4_CORE = "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n" \
           "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n\n"


def test_cpu_model_names_arm_cores_which_report_no_model_name():
    pi4 = "".join(PI4_CORE.format(n=n, part="0xd08") for n in range(4)) + "Hardware\t: BCM2835\nModel\t: Raspberry Pi 4"
    assert cpu_model(pi4) == "4x Cortex-A72"
    little_big = "".join(PI4_CORE.format(n=n, part=part) for n, part in enumerate(["0xd05"] * 6 + ["0xd0b"] * 2))
    assert cpu_model(little_big) == "6x Cortex-A55 + 2x Cortex-A76"
    assert cpu_model(PI4_CORE.format(n=0, part="0xfff")) == "1x implementer 0x41 part 0xfff"
    assert cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n") == "AMD EPYC 7B13"
    assert cpu_model("Hardware\t: Tensor G3\n") == "Tensor G3" and cpu_model("") is None


def test_cli_prints_the_table_and_writes_json(tmp_path):
    args = ["bench", str(DEFAULT_CHECKPOINT), "--prompt-lengths", "4", "--decode-tokens", "2", "-r", "1",
            "--warmup", "0", "-t", "1", "--bandwidth-mib", "32", "--json", str(tmp_path / "bench.json")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| model") and "t/s median ± IQR" in lines[0]
    assert any("| pp4 " in line for line in lines) and any("| tg2 @ d4 " in line for line in lines)
    assert "decode reads" in result.stdout and "measured bandwidth" in result.stdout and "TTFT" in result.stdout
    assert "no reference" in result.stdout, "an fp32 checkpoint is its own reference"
    assert "loading" in result.stderr and "loading" not in result.stdout, "progress goes to stderr"
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["models"]) == 1 and data["models"][0]["tests"][0]["samples_s"][0] > 0


@pytest.mark.parametrize("args, fragment", [
    (["--prompt-lengths", "4,x"], "--prompt-lengths takes comma-separated integers"),
    (["--prompt-lengths", "600"], "holds 512 positions; the tests need"),
    (["--prompt-lengths", "16,16"], "prompt lengths must be distinct"),
])
def test_bad_lengths_are_one_line_errors(args, fragment):
    result = CliRunner().invoke(main, ["bench", str(DEFAULT_CHECKPOINT), *args])
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr and "Traceback" not in result.stderr


def test_missing_reference_is_a_one_line_error(tmp_path, stories_int4):
    manifest = json.loads((stories_int4 / "edgeforge.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    for file in stories_int4.iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    manifest["source"]["path"] = str(tmp_path / "gone.bin")
    (moved / "edgeforge.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["bench", str(moved)])
    assert result.exit_code == 2 and "pass --reference" in result.stderr and "gone.bin" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["host", "onnx-cpu"])
def test_bench_exported_artifact_in_its_runtime(tmp_path, stories_int4, target):
    from edgeforge.export import export

    artifact = export(stories_int4, target, tmp_path / "artifact", max_seq_len=64, check=False)  # not the guard's test
    record = bench(artifact.path, settings=TINY)
    assert any("export guard did not run" in caveat for caveat in record.caveats)
    candidate = record.candidate
    assert candidate.format == artifact.format and candidate.backend.startswith(artifact.format)
    assert record.reference.path == str(DEFAULT_CHECKPOINT), "traced through the artifact and quantized manifests"
    assert str(stories_int4) in candidate.bytes_basis and candidate.ceiling.bytes_per_token > 0
    assert all(t.tok_s.median > 0 and len(t.samples_s) == REPETITIONS for t in candidate.tests)
    assert candidate.peak_rss_bytes > candidate.rss_after_import_bytes
