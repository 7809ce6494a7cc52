"""`forge`: the whole pipeline on the bundled model, its reports, and resuming after a kill."""

import json
import os
import signal
import subprocess
import sys

import pytest

from click.testing import CliRunner

from edgeforge.cli import main
from edgeforge.pipeline import ForgeSettings, forge
from edgeforge.report import ForgeReport

FAST = dict(recipe="int4-xnnpack", target="onnx-cpu", eval_windows=4, eval_seq_len=128, repetitions=1,
            bandwidth_bytes=64 << 20)


def test_forge_writes_reports_and_reuses_unchanged_stages(tmp_path):
    out = tmp_path / "forge"
    result = forge(ForgeSettings(**FAST), out)
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "edgeforge.report" and report["schema_version"] == 1
    assert ForgeReport.from_dict(report, path=out / "report.json") == result.report  # the file is the record
    assert report["export"]["scheme"] == "8da4w" and report["export"]["guard"]["min_cosine"] > 0.999
    drift = report["verify"]["drift"]
    assert drift["token_count"] > 400 and 0 < drift["kld_mean_nats"] < 0.3 and drift["ppl_ratio"] > 1
    assert report["verify"]["verdict"] == "pass", report["verify"]["verdict_line"]
    decode = [t for m in report["bench"]["models"] for t in m["tests"] if t["name"].startswith("tg")]
    assert len(decode) == 2 and all(t["tok_s"]["median"] > 0 for t in decode)
    assert len(report["quantize"]["layers"]) == 37
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "PASS" in page and "</html>" in page
    assert result.reused == []
    again = forge(ForgeSettings(**FAST), out)
    assert again.reused == ["quantize", "export", "verify", "bench"]
    assert (again.report.quantize, again.report.bench) == (result.report.quantize, result.report.bench)
    changed = forge(ForgeSettings(**{**FAST, "eval_windows": 3}), out)
    assert changed.reused == ["quantize", "export", "bench"]
    state = json.loads((out / "forge-state.json").read_text())
    del state["stages"]["verify"]["record"]["settings"]  # a stored record that no longer reads
    (out / "forge-state.json").write_text(json.dumps(state))
    broken = CliRunner().invoke(main, ["forge", "--recipe", FAST["recipe"], "--target", FAST["target"], "-o", str(out),
                                       "--eval-windows", "3", "--eval-seq-len", "128", "--repetitions", "1"])
    assert broken.exit_code == 2 and "Traceback" not in broken.output, broken.output
    assert broken.stderr.strip().splitlines()[-1] == (f"edgeforge: error: {out / 'forge-state.json'}: "
                                                      "stages.verify.record: field 'settings' is missing")


def test_forge_killed_during_export_resumes_without_half_written_artifacts(tmp_path):
    out = tmp_path / "forge"
    args = [sys.executable, "-m", "edgeforge", "forge", "--recipe", FAST["recipe"], "--target", FAST["target"],
            "-o", str(out), "--eval-windows", "4", "--eval-seq-len", "128", "--repetitions", "1"]
    child = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in child.stderr:
        if line.startswith("exporting "):  # the export stage has started writing its temporary directory
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert (out / "quantized" / "edgeforge.json").exists()
    assert not (out / "artifact").exists(), "a killed export must not leave an artifact at its output path"
    state = json.loads((out / "forge-state.json").read_text())
    assert list(state["stages"]) == ["quantize"]

    result = forge(ForgeSettings(**FAST), out)
    assert result.reused == ["quantize"]
    assert (out / "artifact" / "edgeforge.json").exists() and (out / "report.html").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_forge_refuses_an_output_that_holds_its_text_before_writing_anything(tmp_path):
    from edgeforge.errors import InputError
    from edgeforge.pipeline import BUNDLED_TEXT

    texts = tmp_path / "texts"
    texts.mkdir()
    evaluation = texts / "evaluation.txt"
    evaluation.write_bytes((BUNDLED_TEXT / "evaluation.txt").read_bytes())
    with pytest.raises(InputError, match=f"^{texts}: output contains the input {evaluation}"):
        forge(ForgeSettings(**{**FAST, "data": str(evaluation)}), texts)
    assert [p.name for p in texts.iterdir()] == ["evaluation.txt"]
