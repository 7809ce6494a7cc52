"""The quantized checkpoint's record (its ``edgeforge.json``): what made it, from what, and each layer's scheme
and error; quantize writes it, export, verify, bench and inspect read its fields."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgeforge.checkpoints.tokenizers import TokenizerPolicy
from edgeforge.errors import InputError
from edgeforge.fileio import read_json
from edgeforge.quantize.activations import DEFAULT_NUMERICS, ActivationNumerics
from edgeforge.quantize.scheme import ActivationScheme, WeightScheme
from edgeforge.records import Record, described

MANIFEST = "edgeforge.json"


def scheme_label(weight_bits: int, activations: str) -> str:
    """Short name of a linear scheme: 8da4w, 8da8w (dynamic int8 activations), 4w, 8w or w8a8-static."""
    if activations == "static_int8":
        return f"w{weight_bits}a8-static"
    return f"8da{weight_bits}w" if activations == "dynamic_int8" else f"{weight_bits}w"


@dataclass(frozen=True)
class CheckpointSource:
    """The full-precision checkpoint a quantized one was made from."""

    path: str = described("where it was read")
    format: str = described("its checkpoint format (hf, meta, gguf, llama2c)")
    sha256: str = described("content hash of its files when it was quantized")


@dataclass(frozen=True)
class RecipeRecord:
    """The recipe a checkpoint was quantized with, as ``Recipe.to_dict`` writes it."""

    name: str = described("recipe name (bundled) or file stem")
    description: str = described("the recipe's one-line description")
    algorithm: str = described("registered quantization algorithm")
    activations: str = described("none | dynamic_int8 | static_int8")
    fallback: str = described("scheme for layers the group size does not divide: int8 | per-channel")
    weights: dict = described("default weight scheme of decoder linears (WeightScheme.to_dict)")
    embedding: dict | None = described("token embedding's weight scheme, None: full precision")
    output: dict | None = described("output head's weight scheme, None: full precision")
    rules: list[dict] = described("per-layer overrides in order: match (regex) and scheme (None: kept)")
    gates: dict[str, float] = described("verify's default gates (max_kld, min_top1, max_ppl_ratio, min_cosine)")
    calibration: dict = described("samples, seq_len and seed drawn from the calibration text")
    gptq: dict = described("GPTQ settings", default_factory=dict)
    awq: dict = described("AWQ settings", default_factory=dict)
    mse: dict = described("MSE grid settings", default_factory=dict)
    smoothquant: dict = described("SmoothQuant settings", default_factory=dict)
    rotation: dict = described("rotations folded into the weights before quantizing: residual, heads, seed",
                               default_factory=dict)
    scales: dict = described("group scale search (range or importance) and its magnitude weighting",
                             default_factory=dict)

    @property
    def scheme(self) -> str:
        """The linear scheme's short name (8da4w, ...)."""
        return scheme_label(self.weights["bits"], self.activations)


@dataclass(frozen=True)
class CalibrationRecord:
    """The calibration a checkpoint was quantized with (fingerprints are in calibration.json)."""

    source: str = described("calibration text file or folder")
    sha256: str = described("SHA-256 of the calibration text's bytes")
    samples: int = described("windows drawn")
    seq_len: int = described("tokens per window")
    available_tokens: int = described("tokens the text holds")
    documents: int = described("documents in the text")


@dataclass(frozen=True, kw_only=True)
class QuantizedLayer:
    """One quantized layer: its scheme and how far its output moved from fp32."""

    scheme: dict = described("WeightScheme.to_dict of the layer")
    activations: str = described("none | dynamic_int8 | static_int8")
    algorithm: str = described("algorithm that rounded it")
    weight_sqnr_db: float | None = described("weight SQNR against fp32 (dB)", default=None)
    fallback: str | None = described("why the recipe's scheme was replaced", default=None)
    rel_error: float | None = described("relative output error on calibration inputs", default=None)
    rel_error_rtn: float | None = described("the same for plain round-to-nearest", default=None)
    output_sqnr_db: float | None = described("output SQNR against fp32 (dB)", default=None)

    @property
    def weight_scheme(self) -> WeightScheme:
        return WeightScheme.from_dict(self.scheme)


@dataclass(frozen=True, kw_only=True)
class QuantizedCheckpoint(Record):
    """A quantized checkpoint directory's ``edgeforge.json``."""

    kind = "edgeforge.quantized_checkpoint"
    version = 1

    architecture: str = described("model family: a registered architecture (llama, bert)", default="llama")
    config: dict = described("the model config (LlamaConfig / BertConfig to_dict)")
    source: CheckpointSource = described("the full-precision checkpoint it was made from")
    recipe: RecipeRecord = described("the recipe it was quantized with")
    calibration: CalibrationRecord | None = described("calibration text used, None without calibration",
                                                      default=None)
    tokenizer: TokenizerPolicy | None = described("the tokenizer's BOS/EOS policy, None without one", default=None)
    activation_numerics: str = described("whose run-time rounding of int8 activations calibration saw",
                                         default=DEFAULT_NUMERICS.value)
    layers: dict[str, QuantizedLayer] = described("every quantized layer by module name, in execution order")
    fallbacks: dict[str, str] = described("layers whose scheme was replaced, and why", default_factory=dict)
    versions: dict[str, str] = described("versions of edgeforge, torch and torchao", default_factory=dict)
    plan: dict | None = described("the budget planner's choice (edgeforge.quantize.planner): request, achieved bits "
                                  "per weight, estimated and measured KLD, the curve; None: not planned",
                                  default=None)

    @property
    def scheme(self) -> str:
        """The linear scheme's short name (8da4w, ...)."""
        return self.recipe.scheme

    @property
    def numerics(self) -> ActivationNumerics:
        """The activation numerics the checkpoint was calibrated with."""
        return ActivationNumerics.from_name(self.activation_numerics)

    def model_config(self):
        """The model config object (LlamaConfig or BertConfig)."""
        return model_config(self.architecture, self.config)

    def block_bits_per_weight(self, numerics: ActivationNumerics | None = None) -> float | None:
        """Bits the block linears store per weight, scales and zero points included, as the runtime of
        ``numerics`` holds them (default: the one calibration saw); None when none is quantized."""
        from edgeforge.checkpoints.loading import expected_shapes

        shapes = expected_shapes(self.architecture, self.model_config())
        return bits_per_weight({name: (shapes[f"{name}.weight"], layer.weight_scheme,
                                       ActivationScheme.from_name(layer.activations))
                                for name, layer in self.layers.items() if is_block_layer(name)},
                               numerics or self.numerics)


def is_block_layer(name: str) -> bool:
    """Whether a layer sits in a numbered block ("layers.3.", "encoder.layer.3."), not the embedding or head."""
    return re.search(r"\.\d+\.", name) is not None


def bits_per_weight(layers: dict[str, tuple[tuple[int, int], WeightScheme, ActivationScheme]],
                    numerics: ActivationNumerics) -> float | None:
    """Bits per weight ``numerics``' runtime stores for ``layers`` (name -> ((out, in), scheme, activations)),
    scales and zero points included; None when there are none."""
    weights = sum(out * width for (out, width), *_ in layers.values())
    if not weights:
        return None
    stored = sum(numerics.stored_bytes(scheme, shape, activations) for shape, scheme, activations in layers.values())
    return 8 * stored / weights


def model_config(architecture: str, config: dict):
    """The config object of a record's ``architecture`` and ``config`` (LlamaConfig, BertConfig)."""
    from edgeforge.models import model_class

    return model_class(architecture).config_class.from_dict(config)


def read_quantized(path: str | Path) -> QuantizedCheckpoint:
    """The record of a quantized checkpoint directory; InputError naming the file on another kind or a newer
    schema version."""
    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        raise InputError(f"not an edgeforge quantized checkpoint (no {MANIFEST})", path=path)
    return QuantizedCheckpoint.from_dict(read_json(manifest), path=manifest)

