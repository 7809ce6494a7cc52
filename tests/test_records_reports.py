"""The verify, bench and forge records: JSON round trips of real stories260K runs, files of the older shape
still load, a renamed field is a one-line error naming the file, gates name the field they read, and
docs/report-schema.md is the one the records generate."""

import json

import pytest

from edgeforge.checkpoints import DEFAULT_CHECKPOINT
from edgeforge.errors import InputError
from edgeforge.pipeline import BUNDLED_TEXT
from edgeforge.report.schema import SCHEMA_DOC, report_schema
from edgeforge.verify.bench import BenchReport, BenchSettings, bench
from edgeforge.verify.report import VerifyReport
from edgeforge.verify.verify import VerifyOptions, verify

TEXT = BUNDLED_TEXT / "evaluation.txt"


@pytest.fixture(scope="module")
def verified(stories_int4) -> VerifyReport:
    return verify(stories_int4, DEFAULT_CHECKPOINT, TEXT, VerifyOptions(seq_len=128, windows=4, use_cache=False))


def _through_json(record) -> dict:
    return json.loads(json.dumps(record.to_dict()))


def test_verify_report_round_trips_through_json(verified):
    data = _through_json(verified)
    again = VerifyReport.from_dict(data, path="verify.json")
    assert again == verified
    assert again.to_dict() == data
    assert data["verdict"] == again.verdict == "pass" and data["gates"][0]["passed"] is True


def test_gates_name_the_drift_field_they_read(verified):
    assert [gate.statistic for gate in verified.gates] == ["kld_mean_nats", "top1_agreement", "ppl_ratio"]
    assert all(getattr(verified.drift, gate.statistic) == gate.value for gate in verified.gates)
    assert verified.verdict_line.startswith("PASS: kld_mean_nats ")


def test_bench_report_round_trips_through_json(stories_int4):
    settings = BenchSettings(prompt_lengths=(4,), decode_tokens=2, repetitions=1, warmup=0, threads=1,
                             bandwidth_bytes=32 << 20)
    record = bench(stories_int4, settings=settings)
    data = _through_json(record)
    again = BenchReport.from_dict(data, path="bench.json")
    assert again == record and again.to_dict() == data
    assert again.candidate.decode_test.name == "tg2" and again.reference.decode_test.speedup is None
    assert data["bandwidth"]["ceiling_gb_s"] == max(data["bandwidth"]["read_samples_gb_s"])


def test_a_verify_file_of_the_shape_before_the_records_still_loads(verified):
    """Before: the eager gate's statistic was called kld_mean, and timing had no eager_seconds without eager."""
    data = _through_json(verified)
    for gate in data["gates"]:
        gate["statistic"] = gate["statistic"].replace("kld_mean_nats", "kld_mean")
    del data["timing"]["eager_seconds"]
    old = VerifyReport.from_dict(data, path="old-verify.json")
    assert old.timing.eager_seconds is None and old.gates[0].statistic == "kld_mean"
    assert old.verdict == "pass" and old.verdict_line.startswith("PASS: kld_mean ")


@pytest.mark.parametrize("broken", ["renamed", "missing"])
def test_a_renamed_or_missing_field_is_a_one_line_error_naming_the_file(verified, tmp_path, broken):
    data = _through_json(verified)
    value = data["drift"].pop("kld_mean_nats")
    if broken == "renamed":
        data["drift"]["kld_mean"] = value
    path = tmp_path / "verify.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as error:
        VerifyReport.from_dict(json.loads(path.read_text()), path=path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "drift: field 'kld_mean_nats' is missing" in message, message
    assert "\n" not in message and error.value.exit_code == 2


def test_another_kind_is_refused_naming_the_file(verified):
    with pytest.raises(InputError, match=r"^bench.json: not a edgeforge.bench record \(kind 'edgeforge.verify'\)"):
        BenchReport.from_dict(verified.to_dict(), path="bench.json")


def test_report_schema_doc_is_generated_from_the_records():
    assert SCHEMA_DOC.read_text() == report_schema(), "stale: run python -m edgeforge.report.schema"
    for heading in ("`edgeforge.verify` (version 1): VerifyReport", "`edgeforge.bench` (version 1): BenchReport",
                    "`edgeforge.report` (version 1): ForgeReport", "## Drift", "## GateResult"):
        assert heading in SCHEMA_DOC.read_text(), heading


def test_gates_doc_names_the_field_each_gate_reads():
    from edgeforge.verify.verify import GATES

    page = (SCHEMA_DOC.parent / "gates.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| `")}
    for gate, (statistic, op) in GATES.items():
        row = rows[f"`{gate}` / `--{gate.replace('_', '-')}`"]
        section = "embedding" if statistic.startswith("cosine") else "drift"
        assert f"| `{section}.{statistic}`" in row and row.endswith(f"| value {op} threshold |"), row
