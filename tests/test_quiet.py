"""A default run keeps third-party output off stderr and shows an export's phases; --debug lets it through."""

import json
import logging
import re
import subprocess
import sys
import warnings

import pytest

from edgeforge.checkpoints import DEFAULT_CHECKPOINT
from edgeforge.errors import RuntimeFailure
from edgeforge.pipeline import BUNDLED_TEXT
from edgeforge.quiet import third_party_quiet

PHASES = {"host": ["trace", "lower", "emit", "serialize", "files", "check", "size"],
          "onnx-cpu": ["build", "save", "validate", "files", "check", "size"]}
PHASE_LINE = re.compile(r" *\d+\.\d s  ([a-z]+)(: .+)?")
# Every line edgeforge itself writes to stderr in the runs below (export, verify).
OUR_LINES = (PHASE_LINE, re.compile(r"exporting \S+ \(8da4w\) for (host|onnx-cpu) \.\.\."),
             re.compile(r"opening \S+ \.\.\."),
             re.compile(r"[a-z ]+: (loading \S+( \(fp32\))? \.\.\.|\d+/\d+ windows|cached \(\S+\)|"
                        r"computed in \d+\.\d s, cached to \S+)"))


def edgeforge(*args) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process, stderr as the OS sees it (C++ output included)."""
    return subprocess.run([sys.executable, "-m", "edgeforge", *map(str, args)], capture_output=True, text=True)


def foreign_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not any(ours.fullmatch(line) for ours in OUR_LINES)]


@pytest.fixture(scope="module")
def exported_pte(stories_int4, tmp_path_factory):
    output = tmp_path_factory.mktemp("pte") / "int4.pte.d"
    return output, edgeforge("export", stories_int4, "--target", "host", "-o", output)


@pytest.mark.parametrize("target", ["onnx-cpu", pytest.param("host", marks=pytest.mark.slow)])
def test_default_export_prints_only_its_phases_on_stderr(target, stories_int4, tmp_path, request):
    output, result = request.getfixturevalue("exported_pte") if target == "host" else \
        (tmp_path / "onnx", edgeforge("export", stories_int4, "--target", target, "-o", tmp_path / "onnx"))
    assert result.returncode == 0, result.stderr
    assert not foreign_lines(result.stderr), result.stderr
    phases = [match.group(1) for line in result.stderr.splitlines() if (match := PHASE_LINE.fullmatch(line))]
    assert phases == PHASES[target], result.stderr
    assert list(json.loads((output / "edgeforge.json").read_text())["report"]["phase_seconds"]) == PHASES[target]
    assert result.stdout.startswith(f"artifact   {output / 'model.'}"), result.stdout


@pytest.mark.slow
def test_verify_is_quiet_by_default_and_shows_the_runtime_with_debug(exported_pte):
    output, _ = exported_pte
    args = ("verify", output, "--reference", DEFAULT_CHECKPOINT, "--data", BUNDLED_TEXT / "evaluation.txt")
    quiet, loud = edgeforge(*args), edgeforge("--debug", *args)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert not foreign_lines(quiet.stderr), quiet.stderr
    assert foreign_lines(loud.stderr), "--debug shows no third-party line: the quiet test above proves nothing"


@pytest.mark.parametrize("enabled", [True, False])
def test_third_party_warnings_and_logs_are_held_only_while_quiet(enabled, caplog):
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with third_party_quiet(enabled=enabled):
            warnings.warn("_check_is_size will be removed", FutureWarning)
            logging.getLogger("torchao").warning("Failed to load _C_mxfp8")
            logging.getLogger("executorch").error("a real failure")
    logged = [record.getMessage() for record in caplog.records]
    assert [str(warning.message) for warning in shown] == ([] if enabled else ["_check_is_size will be removed"])
    assert logged == (["a real failure"] if enabled else ["Failed to load _C_mxfp8", "a real failure"])


def test_a_runtime_failure_still_shows_the_runtime_message(tmp_path, capfd):
    from edgeforge.export.executorch.session import load_method

    program = tmp_path / "model.pte"
    program.write_bytes(b"\0" * 64)  # no ExecuTorch program header
    with third_party_quiet(), pytest.raises(RuntimeFailure, match="could not load method"):
        load_method(program)
    assert "Program" in capfd.readouterr().err
