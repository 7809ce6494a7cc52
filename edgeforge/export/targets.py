"""Device/backend target profiles: TOML data files listed by `edgeforge targets`.

A target names the artifact format, the backend (partitioner or execution provider), the schemes
it runs, the run-time arithmetic of its quantized linears (``activation_numerics``: ``xnnpack`` or
``mlas-int8-block``, see :mod:`edgeforge.quantize.activations`; absent: ``xnnpack``) and how its latency
is measured. A target holds no memory budget: nothing here measures a device's memory, so a budget would
be checked against a guess; the artifact's report gives its size and planned memory, bench its peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeforge.errors import ConfigError, UnknownNameError
from edgeforge.fileio import named_toml, read_toml
from edgeforge.quantize.activations import DEFAULT_NUMERICS, ActivationNumerics

TARGET_DIR = Path(__file__).resolve().parent.parent / "targets"
_KEYS = {"description", "format", "backend", "schemes", "latency", "runs_here", "activation_numerics"}


@dataclass(frozen=True)
class Target:
    name: str
    format: str  # "pte" | "onnx"
    backend: str  # "xnnpack", "coreml", "cpu", "qnn-htp"
    schemes: tuple[str, ...]  # "fp32", "8da8w", "8da4w", "4w", "8w", "w8a8-static"
    latency: str
    description: str = ""
    runs_here: bool = True  # False: the artifact cannot be executed (or checked) on this machine
    activation_numerics: ActivationNumerics = DEFAULT_NUMERICS  # how its runtime rounds dynamic int8 activations

    def to_dict(self) -> dict:
        return {**vars(self), "schemes": list(self.schemes), "activation_numerics": self.activation_numerics.value}


def list_targets() -> dict[str, Path]:
    return {path.stem: path for path in sorted(TARGET_DIR.glob("*.toml"))}


def load_target(name_or_path: str | Path) -> Target:
    """A bundled target by name, or a target TOML file by path."""
    from edgeforge.export.artifact import EXPORTERS  # the artifact record holds a Target

    path = named_toml(name_or_path, TARGET_DIR, "target")
    data = read_toml(path)
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown target key '{unknown[0]}' (known: {', '.join(sorted(_KEYS))})", path=path)
    missing = [key for key in ("format", "backend", "schemes", "latency") if key not in data]
    if missing:
        raise ConfigError(f"target key '{missing[0]}' is required", path=path)
    if data["format"] not in EXPORTERS:
        raise ConfigError(f"target key 'format': unknown artifact format {data['format']!r} (installed: "
                          f"{', '.join(EXPORTERS.names())})", path=path)
    try:
        numerics = ActivationNumerics.from_name(data.get("activation_numerics", DEFAULT_NUMERICS.value))
    except UnknownNameError as exc:
        raise ConfigError(f"target key 'activation_numerics': {exc.problem}", path=path) from None
    return Target(name=path.stem, format=data["format"], backend=data["backend"], schemes=tuple(data["schemes"]),
                  latency=data["latency"],
                  description=data.get("description", ""), runs_here=bool(data.get("runs_here", True)),
                  activation_numerics=numerics)


def supporting_targets(scheme: str, format: str | None = None) -> list[str]:
    """Bundled targets that run ``scheme`` (optionally of one format), for error messages."""
    names = []
    for name in list_targets():
        target = load_target(name)
        if scheme in target.schemes and (format is None or target.format == format):
            names.append(name)
    return names
