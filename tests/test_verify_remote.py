"""verify --farm F --device NAME: the artifact's forward passes on an ssh device (this machine through a real sshd,
the fixture of tests/test_runner_ssh.py, with this venv's Python), everything else here.

The device computes the same logits as a local run (same machine, same runtime, same code), and what it sends
back are the statistics' inputs as raw bytes, so the figures must be bit-identical: tested with ``==``, no
tolerance.
"""

import json

import pytest
import torch
from click.testing import CliRunner

from edgeforge.checkpoints import DEFAULT_CHECKPOINT
from edgeforge.cli import main
from edgeforge.runners.farm import load_farm
from edgeforge.verify.models import open_for_eval
from edgeforge.verify.reference import drift_inputs
from edgeforge.verify.remote import open_on_device
from tests.conftest import SHARED
from tests.test_runner_ssh import _farm, _free_port, sshd  # noqa: F401  (sshd: the session's real OpenSSH server)

TEXT = SHARED / "data" / "tinystories-valid" / "tinystories_valid_head.txt"
WINDOWS = ["--seq-len", "48", "--windows", "3", "--no-eager"]


@pytest.fixture(scope="module")
def artifacts(stories_int4, tmp_path_factory):
    """stories260K 8da4w exported, on first use of each format: .pte (host, XNNPACK) and ONNX (onnx-cpu)."""
    from edgeforge.export import export

    folder, made = tmp_path_factory.mktemp("remote-artifacts"), {}

    def artifact(format: str):
        if format not in made:
            target = {"pte": "host", "onnx": "onnx-cpu"}[format]
            made[format] = export(stories_int4, target, folder / f"stories.{format}.d", max_seq_len=48,
                                  check=False).path
        return made[format]

    return artifact


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    path = tmp_path_factory.mktemp("remote-text") / "eval.txt"
    path.write_text("\n\n".join(paragraphs[2000:2100]) + "\n")
    return path


@pytest.fixture
def farm(sshd, tmp_path):  # noqa: F811
    return _farm(tmp_path, sshd.device_table("ssh-dev", cpu_mask=[0], labels={"os": "linux"}) +
                 sshd.device_table("gone", port=_free_port()))


def _verify(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("format", ["onnx", pytest.param("pte", marks=pytest.mark.slow)])
def test_verify_on_an_ssh_device_gives_the_local_statistics_exactly(format, artifacts, eval_text, farm, sshd,  # noqa: F811
                                                                   tmp_path):
    common = [artifacts(format), "--reference", DEFAULT_CHECKPOINT, "--data", eval_text, *WINDOWS]
    local = _verify(*common, "--json", tmp_path / "local.json")
    assert local.exit_code == 0, local.output + local.stderr
    sshd.requests_log.unlink(missing_ok=True)
    remote = _verify(*common, "--farm", farm, "--device", "ssh-dev", "--json", tmp_path / "remote.json")
    assert remote.exit_code == 0, remote.output + remote.stderr
    here, there = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("local", "remote"))
    assert there["drift"] == here["drift"] and there["samples"] == here["samples"], "bit-identical statistics"
    assert here["device"] is None and there["artifact"] == here["artifact"]
    device = there["device"]
    assert device["name"] == "ssh-dev" and device["runner"] == "ssh" and device["labels"] == {"os": "linux"}
    assert device["provenance"]["artifact_sha256"] == here["artifact"]["sha256"]
    assert device["provenance"]["command"][0] == str(sshd.python) and device["provenance"]["cores"] == [0]
    assert len(device["provenance"]["runner_sha256"]) == 64 and device["provenance"]["uname"]["machine"]
    assert "device     ssh-dev (ssh, " in remote.stdout, remote.stdout

    windows = [r for r in sshd.requests() if r["op"] == "drift_window"]
    loads = [r for r in sshd.requests() if r["op"] == "load"]
    assert len(windows) == 3 and all(len(r["tokens"]) == 48 for r in windows), "each window's ids sent once"
    assert [r["with_logits"] for r in windows] == [True, False, False], "full logits for the first window only"
    assert len(loads) == 1 and loads[0]["path"].startswith(str(sshd.workdir)), "the uploaded copy is loaded there"


def test_device_sends_the_drift_inputs_and_first_logits_bit_identical(artifacts, farm):
    device = load_farm(farm).select("ssh-dev")[0]
    windows = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    local = open_for_eval(artifacts("onnx"))
    logits = local.window_logits(windows)
    topk_ids = logits[:, :-1].topk(16, dim=-1).indices
    remote = open_on_device(artifacts("onnx"), device)
    try:
        vocab, inputs = remote.drift_inputs(windows, topk_ids)
    finally:
        remote.close()
    assert vocab == 512 and remote.session.first_logits.dtype == torch.float32
    assert torch.equal(remote.session.first_logits, logits[0]), "window 0's full logits, as computed here"
    for row, there in enumerate(inputs):
        here = drift_inputs(logits[row], topk_ids[row], windows[row, 1:])
        assert here.keys() == there.keys()
        assert all(there[name].dtype == here[name].dtype and torch.equal(there[name], here[name]) for name in here)


def test_unknown_or_unreachable_device_is_one_line(artifacts, eval_text, farm):
    common = [artifacts("onnx"), "--reference", DEFAULT_CHECKPOINT, "--data", eval_text, *WINDOWS, "--farm", farm]
    for device, code, problem in [("nowhere", 2, f"{farm}: no device matches 'nowhere'; devices: "),
                                  ("gone", 3, "device 'gone' (")]:
        result = _verify(*common, "--device", device)
        errors = [line for line in result.stderr.splitlines() if line.startswith("edgeforge: error:")]
        assert result.exit_code == code and len(errors) == 1 and problem in errors[0], result.output + result.stderr
        assert "Traceback" not in result.output + result.stderr
    assert "unreachable: Connection refused" in errors[0], errors[0]
    alone = _verify(*common[:-2], "--device", "ssh-dev")
    assert alone.exit_code == 2 and "--farm and --device go together" in alone.stderr, alone.output + alone.stderr


@pytest.mark.slow
def test_device_without_the_artifacts_runtime_is_one_line(artifacts, eval_text, sshd, tmp_path):  # noqa: F811
    """The device's Python cannot import onnxruntime (a package of that name that fails, first on its path)."""
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('onnxruntime is not installed on this board')\n")
    python = tmp_path / "board-python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={shadow.parent} exec {sshd.python} \"$@\"\n")
    python.chmod(0o755)
    farm = _farm(tmp_path, sshd.device_table("bare", python=str(python)))
    result = _verify(artifacts("onnx"), "--reference", DEFAULT_CHECKPOINT, "--data", eval_text, *WINDOWS,
                     "--farm", farm, "--device", "bare")
    errors = [line for line in result.stderr.splitlines() if line.startswith("edgeforge: error:")]
    assert result.exit_code == 3 and len(errors) == 1, result.output + result.stderr
    assert "on bare" in errors[0] and "onnxruntime is not installed on this board" in errors[0], errors[0]
    assert "Traceback" not in result.output + result.stderr
