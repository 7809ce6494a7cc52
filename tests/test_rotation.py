"""Rotations folded into the weights (edgeforge.quantize.rotation): the fp32 function is unchanged, and on real
weights the int8 grids fit better."""

from __future__ import annotations

import pytest
import torch

from edgeforge.checkpoints import DEFAULT_CHECKPOINT, load_model, open_checkpoint
from edgeforge.errors import ConfigError, UnsupportedError
from edgeforge.models import architecture
from edgeforge.quantize import load_quantized_model, load_recipe, quantize_checkpoint
from edgeforge.fileio import read_toml
from edgeforge.quantize.recipe import list_recipes, recipe_from_dict
from edgeforge.quantize.rotation import rotated_checkpoint
from edgeforge.verify.drift import compare_models, token_windows
from tests.conftest import SHARED


def _rotated(path, **settings):
    checkpoint = open_checkpoint(path)
    return checkpoint, rotated_checkpoint(checkpoint, architecture(checkpoint.architecture),
                                          **{"residual": True, "heads": True, "seed": 0, **settings})


@pytest.mark.parametrize("which", ["stories260K", "smollm2-slice"])
def test_rotation_leaves_the_fp32_function_unchanged(which, request):
    path = DEFAULT_CHECKPOINT if which == "stories260K" else request.getfixturevalue("smollm2_slice")
    checkpoint, rotated = _rotated(path)
    assert rotated.tensors["layers.0.attention_norm.weight"].eq(1).all()  # gains folded into the readers
    assert "output.weight" in rotated.tensors  # a tied head becomes its own tensor (its norm's gain folded in)
    assert not torch.allclose(rotated.tensors["layers.0.attention.wv.weight"],
                              checkpoint.tensors["layers.0.attention.wv.weight"])
    tokens = torch.randint(0, checkpoint.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # float64 forwards: what differs is only each rotated weight's rounding to float32
        reference = load_model(checkpoint).double()(tokens)
        candidate = load_model(rotated).double()(tokens)
    # A weight rounded once to float32 is off by at most 2^-24 relative; summed over a few layers' products the
    # logits move by ~1e-7 of their scale (3.6e-7 seen on stories260K): 1e-5 leaves room, a wrong fold is O(1).
    assert (reference - candidate).abs().max() <= 1e-5 * reference.abs().max()


def test_rotation_cuts_the_int8_dynamic_error_on_real_weights(smollm2_slice, tmp_path):
    """Real activations carry channels tens of times their RMS; per-token int8 rounding pays for them unless
    a rotation spreads them (random weights have no such channels: this needs the real slice)."""
    recipe = load_recipe("int8-dynamic")
    rotated_recipe = recipe_from_dict("int8-dynamic-rot", {**_plain(recipe), "rotation": {"residual": True,
                                                                                         "heads": True}})
    checkpoint = open_checkpoint(smollm2_slice)
    text = (SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:60_000]
    windows = token_windows(checkpoint.tokenizer.encode(text), 128, 16)
    reference = load_model(checkpoint)
    kld = {}
    for label, chosen in (("plain", recipe), ("rotated", rotated_recipe)):
        quantize_checkpoint(checkpoint, chosen, calibration=None, output_dir=tmp_path / label)
        kld[label] = compare_models(reference, load_quantized_model(tmp_path / label), windows).kld_mean
    assert kld["rotated"] < 0.7 * kld["plain"], kld  # 0.0078 against 0.0130 here (seeded, fixed text)


def test_rotation_settings_are_checked_and_an_encoder_refuses_them(minilm_dir, tmp_path):
    base = _plain(load_recipe("int8-dynamic"))
    with pytest.raises(ConfigError, match="rotation.residual' must be true or false"):
        recipe_from_dict("bad", {**base, "rotation": {"residual": "yes"}})
    with pytest.raises(ConfigError, match="unknown recipe key 'rotation.hadamard'"):
        recipe_from_dict("bad", {**base, "rotation": {"hadamard": True}})
    recipe = recipe_from_dict("rot", {**base, "rotation": {"residual": True}})
    with pytest.raises(UnsupportedError, match="architecture 'bert' has no rotation plan"):
        quantize_checkpoint(open_checkpoint(minilm_dir), recipe, calibration=None, output_dir=tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_rotated_checkpoint_records_its_rotation_and_unit_norms(tmp_path):
    recipe = recipe_from_dict("rot", {**_plain(load_recipe("int8-dynamic")), "rotation": {"residual": True,
                                                                                          "seed": 3}})
    result = quantize_checkpoint(open_checkpoint(DEFAULT_CHECKPOINT), recipe, calibration=None,
                                 output_dir=tmp_path / "q")
    assert result.record.recipe.rotation == {"residual": True, "heads": False, "seed": 3}
    model = load_quantized_model(tmp_path / "q")
    assert model.norm.weight.eq(1).all() and model.layers[0].ffn_norm.weight.eq(1).all()


def _plain(recipe) -> dict:
    """A bundled recipe's TOML table, as recipe_from_dict reads it."""
    return read_toml(list_recipes()[recipe.name])
