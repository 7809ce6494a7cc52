"""An architecture from outside the package: export and verify take its decisions from the object, not its name."""

from __future__ import annotations

import json
import shutil
import sys

import onnx
import pytest
from click.testing import CliRunner

from edgeforge.checkpoints import DEFAULT_CHECKPOINT, FORMATS
from edgeforge.cli import main
from edgeforge.errors import UnsupportedError
from edgeforge.models import ARCHITECTURES
from edgeforge.models.architecture import DECODER, ENCODER, family_choice
from edgeforge.pipeline import BUNDLED_TEXT
from tests.writers import write_plugin_distribution

TOY_ARCHITECTURE = '''
"""The Llama decoder under the name "toy", with verify gates and an onnxruntime-genai type of its own, and a
checkpoint format ("toyckpt": a llama2.c file under another suffix) whose checkpoints are toys."""

from dataclasses import replace

from edgeforge.checkpoints import FORMATS, checkpoint_format
from edgeforge.models.llama_architecture import LlamaDecoder


class ToyDecoder(LlamaDecoder):
    name = "toy"
    gates = ("max_kld",)
    genai_model_type = "toy-genai"


@checkpoint_format("toyckpt", detect=lambda path: path.suffix == ".toyckpt")
def open_toy(path):
    return replace(FORMATS.get("llama2c").open(path), format="toyckpt", architecture="toy")
'''


@pytest.fixture
def toy_checkpoint(tmp_path, monkeypatch):
    """stories260K as a "toy" checkpoint, with the architecture and its format installed only on sys.path."""
    site = write_plugin_distribution(tmp_path / "site", ARCHITECTURES.group, {"toy": "toy_architecture:ToyDecoder"},
                                     {"toy_architecture": TOY_ARCHITECTURE})
    with (site / "toyplugin-0.1.dist-info" / "entry_points.txt").open("a") as entry_points:
        entry_points.write(f"[{FORMATS.group}]\ntoyckpt = toy_architecture:open_toy\n")
    model = tmp_path / "model" / "stories.toyckpt"
    model.parent.mkdir()
    shutil.copyfile(DEFAULT_CHECKPOINT, model)
    shutil.copyfile(DEFAULT_CHECKPOINT.parent / "tok512.model", model.parent / "tok512.model")
    monkeypatch.syspath_prepend(str(site))
    with ARCHITECTURES.isolated(), FORMATS.isolated():
        yield model
        monkeypatch.undo()
    sys.modules.pop("toy_architecture", None)


def test_an_outside_architecture_is_exported_and_verified_by_its_own_attributes(toy_checkpoint, tmp_path):
    out = tmp_path / "toy.onnx.d"
    result = CliRunner().invoke(main, ["export", str(toy_checkpoint), "--target", "onnx-cpu", "--max-seq-len", "64",
                                       "-o", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    record = json.loads((out / "edgeforge.json").read_text())
    assert record["architecture"] == "toy" and record["guard"]["passed"], record["guard"]
    assert record["guard"]["positions"] > 0  # the decoder guard of its family ran, on next-token logits
    metadata = {entry.key: entry.value for entry in onnx.load(str(out / "model.onnx")).metadata_props}
    assert metadata["edgeforge.architecture"] == "toy"
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "toy-genai"

    verify = ["verify", str(out), "--reference", str(toy_checkpoint), "--data", str(BUNDLED_TEXT / "evaluation.txt"),
              "--windows", "2", "--seq-len", "32", "--no-cache"]
    refused = CliRunner().invoke(main, verify + ["--min-top1", "0.5"])
    assert refused.exit_code == 2, refused.output + refused.stderr
    assert "--min-top1 does not apply to a toy model (its gates: --max-kld)" in refused.stderr, refused.stderr
    result = CliRunner().invoke(main, verify + ["--max-kld", "0.01", "--json", "-"], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert [gate["gate"] for gate in report["gates"]] == ["max_kld"], report["gates"]
    assert report["drift"]["token_count"] == 2 * 31 and report["drift"]["kld_mean_nats"] < 1e-6, report["drift"]


def test_an_architecture_of_a_family_no_stage_knows_is_refused_by_name():
    class VisionToy:
        name, family = "vision-toy", "vision"

    with ARCHITECTURES.isolated():
        ARCHITECTURES.register(VisionToy())
        with pytest.raises(UnsupportedError, match=r"architecture 'vision-toy' is a vision: no ONNX graph for it "
                                                   r"\(there is one for: decoder, encoder\)"):
            family_choice("vision-toy", {DECODER: "decoder graph", ENCODER: "encoder graph"}, "ONNX graph")
