"""Quantization recipes: TOML data files that say what to quantize how; never code paths.

A recipe names one calibration algorithm, the default weight scheme for decoder linears, the
activation scheme, separate schemes for the token embedding and the output head, and ordered
per-layer overrides (regex on the layer name, first match wins). Unknown keys are errors.

    algorithm = "gptq"              # a registered algorithm: rtn | mse | gptq | awq | awq+gptq | smoothquant | a plugin's
    activations = "dynamic_int8"    # none | dynamic_int8 | static_int8
    fallback = "int8"               # for a layer its group size does not divide: int8 | per-channel
    [weights]      bits = 4, group_size = 32, symmetric = true
    [embedding]    bits = 8          (absent: kept in full precision)
    [output]       bits = 8
    [[override]]   match = 'layers\\.0\\.', bits = 8     (or keep = true for full precision)
    [calibration]  samples = 128, seq_len = 512, seed = 0
    [gptq] damp, block_size, act_order   [awq] grid   [mse] grid   [smoothquant] alpha
    [scales]       search = "importance", magnitude = true   (group scales: range | importance search)
    [gates] max_kld, min_top1, max_ppl_ratio, min_cosine    (defaults for verify)

Gates are sanity bounds per scheme family, not quality targets: any normal quantization of that family
meets them on any model, and a broken artifact (KLD of nats, top-1 near 0) is far outside them.
How far a normal quantization drifts depends on the model (int8-dynamic: KLD 0.0017 on stories260K,
0.013 on SmolLM2-135M; int4 g32 round-to-nearest: 0.13 and 0.62), so no figure tight enough to be a
quality target fits every model. The tight check is verify's ``max_kld_eager``, derived per run from
the artifact's own source checkpoint run eagerly on the same windows. The bundled bounds, with the
figures behind them, are in docs/gates.md: int8 max_kld 0.2, min_top1 0.75, max_ppl_ratio 1.2; int4
and w8a8-static 1.0, 0.45, 2.7 (max_ppl_ratio ~ exp(max_kld)); encoders min_cosine 0.995. Gates are
recorded in the quantized checkpoint's manifest: a checkpoint keeps the gates it was quantized with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgeforge.errors import ConfigError, UnknownNameError
from edgeforge.fileio import named_toml, read_toml
from edgeforge.quantize.algorithms import ALGORITHMS, Algorithm, algorithm_for
from edgeforge.quantize.scale_search import ScaleSettings
from edgeforge.quantize.scheme import ActivationScheme, WeightScheme

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
FALLBACKS = ("int8", "per-channel")


@dataclass(frozen=True)
class CalibrationSettings:
    """samples x seq_len tokens drawn from the calibration text with ``seed``."""

    samples: int = 128
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class GptqSettings:
    """damp: fraction of the mean Hessian diagonal added to it; block_size: columns per lazy batch;
    act_order: quantize columns in order of decreasing Hessian diagonal; fp32_alignment: in [0, 1], how much
    of the error upstream layers left in each input the rounding also corrects (0: plain GPTQ)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    fp32_alignment: float = 0.0

    def __post_init__(self):
        if type(self.fp32_alignment) not in (int, float) or not 0 <= self.fp32_alignment <= 1:
            raise ConfigError(f"recipe key 'gptq.fp32_alignment' must be a number in [0, 1], "
                              f"got {self.fp32_alignment!r}")


@dataclass(frozen=True)
class AwqSettings:
    """grid: number of alpha values tried in s = mean|x|^alpha."""

    grid: int = 20


@dataclass(frozen=True)
class MseSettings:
    """grid: clip ratios tried between 1.0 and 0.5 per group."""

    grid: int = 20


@dataclass(frozen=True)
class SmoothQuantSettings:
    """alpha: migration strength of activation outliers into the weights."""

    alpha: float = 0.5


@dataclass(frozen=True)
class RotationSettings:
    """Orthogonal rotations folded into the weights before quantizing (edgeforge.quantize.rotation): of the
    residual stream (norm gains folded into its readers) and of each value head between wv and wo; ``seed``
    draws the matrices."""

    residual: bool = False
    heads: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("residual", "heads"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"recipe key 'rotation.{name}' must be true or false")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("recipe key 'rotation.seed' must be an integer")

    @property
    def any(self) -> bool:
        return self.residual or self.heads


@dataclass(frozen=True)
class LayerRule:
    """Layers whose name matches ``pattern`` get ``scheme`` (None: kept in full precision)."""

    pattern: str
    scheme: WeightScheme | None


@dataclass(frozen=True)
class Recipe:
    name: str
    algorithm: str
    weights: WeightScheme
    activations: ActivationScheme = ActivationScheme.NONE
    fallback: str = "int8"
    description: str = ""
    embedding: WeightScheme | None = None
    output: WeightScheme | None = None
    rules: tuple[LayerRule, ...] = ()
    calibration: CalibrationSettings = CalibrationSettings()
    gptq: GptqSettings = GptqSettings()
    awq: AwqSettings = AwqSettings()
    mse: MseSettings = MseSettings()
    smoothquant: SmoothQuantSettings = SmoothQuantSettings()
    rotation: RotationSettings = RotationSettings()
    scales: ScaleSettings = ScaleSettings()
    gates: dict = field(default_factory=dict)

    def __post_init__(self):
        ALGORITHMS.get(self.algorithm)  # UnknownNameError listing the registered ones
        if self.fallback not in FALLBACKS:
            raise UnknownNameError("fallback", self.fallback, FALLBACKS)

    @property
    def algorithm_config(self) -> Algorithm:
        """The registered algorithm's config, with this recipe's settings."""
        return algorithm_for(self)

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm_config.needs_calibration or self.activations is ActivationScheme.STATIC_INT8

    def scheme_for(self, layer: str, in_features: int) -> tuple[WeightScheme | None, str | None]:
        """The scheme a linear gets and, when the fallback rule changed it, why."""
        scheme = self.weights
        if layer == "output":
            scheme = self.output
        for rule in self.rules:
            if re.search(rule.pattern, layer):
                scheme = rule.scheme
                break
        if scheme is None or scheme.group_size is None or in_features % scheme.group_size == 0:
            return scheme, None
        replacement = WeightScheme(bits=8 if self.fallback == "int8" else scheme.bits, group_size=None,
                                   symmetric=scheme.symmetric)
        return replacement, (f"group size {scheme.group_size} does not divide input width {in_features}: "
                             f"{replacement.bits}-bit per-channel ({self.fallback} fallback)")

    def to_dict(self) -> dict:
        """Plain-JSON form stored in manifests."""
        out = {"name": self.name, "description": self.description, "algorithm": self.algorithm,
               "activations": self.activations.value, "fallback": self.fallback,
               "weights": self.weights.to_dict(),
               "embedding": self.embedding.to_dict() if self.embedding else None,
               "output": self.output.to_dict() if self.output else None,
               "rules": [{"match": r.pattern, "scheme": r.scheme.to_dict() if r.scheme else None} for r in self.rules],
               "gates": dict(self.gates)}
        for name in ("calibration", "gptq", "awq", "mse", "smoothquant", "rotation", "scales"):
            out[name] = vars(getattr(self, name)).copy()
        return out


_TOP_KEYS = {"description", "algorithm", "activations", "fallback", "weights", "embedding", "output", "override",
             "calibration", "gptq", "awq", "mse", "smoothquant", "rotation", "scales", "gates"}
_SETTINGS = {"calibration": CalibrationSettings, "gptq": GptqSettings, "awq": AwqSettings, "mse": MseSettings,
             "smoothquant": SmoothQuantSettings, "rotation": RotationSettings, "scales": ScaleSettings}
_GATES = {"max_kld", "min_top1", "max_ppl_ratio", "min_cosine"}


def list_recipes() -> dict[str, Path]:
    """Bundled recipe name -> file."""
    return {path.stem: path for path in sorted(RECIPE_DIR.glob("*.toml"))}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A bundled recipe by name, or a recipe TOML file by path."""
    path = named_toml(name_or_path, RECIPE_DIR, "recipe")
    data = read_toml(path)
    try:
        return recipe_from_dict(path.stem, data)
    except ConfigError as exc:
        raise ConfigError(exc.problem, path=path) from exc


def recipe_from_dict(name: str, data: dict) -> Recipe:
    """Build a recipe from parsed TOML, naming the first unknown or invalid key."""
    _reject_unknown(data, _TOP_KEYS, "")
    if "weights" not in data or "algorithm" not in data:
        raise ConfigError("a recipe needs 'algorithm' and a [weights] table")
    kwargs = {key: _scheme(data[key], key) for key in ("weights", "embedding", "output") if key in data}
    for key, cls in _SETTINGS.items():
        if key in data:
            _reject_unknown(data[key], {f.name for f in fields(cls)}, f"{key}.")
            kwargs[key] = cls(**data[key])
    if "gates" in data:
        _reject_unknown(data["gates"], _GATES, "gates.")
        kwargs["gates"] = {k: float(v) for k, v in data["gates"].items()}
    rules = []
    for index, rule in enumerate(data.get("override", [])):
        where = f"override[{index}]."
        _reject_unknown(rule, {"match", "bits", "group_size", "symmetric", "keep"}, where)
        if "match" not in rule:
            raise ConfigError(f"recipe key '{where}match' is required")
        try:
            re.compile(rule["match"])
        except re.error as exc:
            raise ConfigError(f"recipe key '{where}match' is not a valid regex ({exc})") from None
        scheme = None if rule.get("keep") else _scheme({k: v for k, v in rule.items() if k not in ("match", "keep")},
                                                       where.rstrip("."))
        rules.append(LayerRule(rule["match"], scheme))
    return Recipe(name=name, algorithm=data["algorithm"], description=data.get("description", ""),
                  activations=ActivationScheme.from_name(data.get("activations", "none")),
                  fallback=data.get("fallback", "int8"), rules=tuple(rules), **kwargs)


def _scheme(table: dict, where: str) -> WeightScheme:
    if not isinstance(table, dict):
        raise ConfigError(f"recipe key '{where}' must be a table")
    _reject_unknown(table, {"bits", "group_size", "symmetric"}, f"{where}.")
    if "bits" not in table:
        raise ConfigError(f"recipe key '{where}.bits' is required")
    return WeightScheme(**table)


def _reject_unknown(table: dict, known: set[str], prefix: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown recipe key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")
