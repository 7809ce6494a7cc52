"""A quantization algorithm from outside the package: registered through an entry point of a fake installed
distribution, listed by `edgeforge recipes` and used by `edgeforge quantize` with no edit inside edgeforge/."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edgeforge.checkpoints import DEFAULT_CHECKPOINT, open_checkpoint
from edgeforge.cli import main
from edgeforge.quantize.algorithms import ALGORITHMS
from edgeforge.quantize.scheme import unpack_int4

PLUGIN = '''
from dataclasses import dataclass

import torch

from edgeforge.quantize.algorithms import Algorithm
from edgeforge.quantize.scheme import QuantizedWeight


@dataclass(frozen=True)
class SignRounding(Algorithm):
    """Every weight becomes its sign; each group's scale is the group's mean |w|."""

    name = "sign"

    def round(self, rows, scheme, stats):
        groups = rows.reshape(rows.shape[0], -1, scheme.group_size or rows.shape[1])
        return QuantizedWeight(torch.sign(rows).to(torch.int8), groups.abs().mean(dim=-1), None)
'''


@pytest.fixture
def sign_plugin(tmp_path, monkeypatch):
    """toyplugin 0.1 'installed' on sys.path, with an edgeforge.algorithms entry point 'sign'."""
    site = tmp_path / "site"
    dist_info = site / "toyplugin-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[edgeforge.algorithms]\nsign = toyplugin:SignRounding\n")
    (site / "toyplugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    with ALGORITHMS.isolated():  # forget 'sign' afterwards
        yield
        monkeypatch.undo()


def test_outside_algorithm_is_listed_and_quantizes_with_its_own_integers_and_scales(sign_plugin, tmp_path):
    listing = CliRunner().invoke(main, ["recipes"], catch_exceptions=False)
    assert listing.exit_code == 0, listing.output
    assert "algorithms: awq, awq+gptq, gptq, mse, rtn, sign, smoothquant" in listing.output, listing.output

    recipe = tmp_path / "sign-int4.toml"
    recipe.write_text('algorithm = "sign"\n[weights]\nbits = 4\ngroup_size = 32\n')
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["quantize", "--recipe", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    manifest = json.loads((out / "edgeforge.json").read_text())
    stored = load_file(str(out / "model.safetensors"))
    source = open_checkpoint(DEFAULT_CHECKPOINT).tensors
    layers = manifest["layers"]
    assert len(layers) == 35 and all(layer["algorithm"] == "sign" for layer in layers.values())  # 5 blocks x 7
    for name, layer in layers.items():
        weight, scheme = source[f"{name}.weight"], layer["scheme"]
        qdata = stored[f"{name}.qweight"]
        qdata = unpack_int4(qdata) if scheme["bits"] == 4 else qdata
        group = scheme["group_size"] or weight.shape[1]
        assert torch.equal(qdata, torch.sign(weight).to(torch.int8)), name
        expected_scale = weight.reshape(weight.shape[0], -1, group).abs().mean(dim=-1)
        assert torch.equal(stored[f"{name}.scale"], expected_scale), name
    assert manifest["layers"]["layers.0.feed_forward.w2"]["scheme"]["bits"] == 8  # 172 wide: the int8 fallback
    assert torch.equal(stored["output.weight"], source["tok_embeddings.weight"])  # tied head, no [output]: kept


def test_a_recipe_naming_an_unregistered_algorithm_is_refused_with_the_registered_names(tmp_path):
    recipe = tmp_path / "sign-int4.toml"
    recipe.write_text('algorithm = "sign"\n[weights]\nbits = 4\ngroup_size = 32\n')
    result = CliRunner().invoke(main, ["quantize", "--recipe", str(recipe), "-o", str(tmp_path / "q")])
    assert result.exit_code == 2, result.output
    assert ("sign-int4.toml: unknown quantization algorithm 'sign'; known: awq, awq+gptq, gptq, mse, rtn, "
            "smoothquant") in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "q").exists()
