"""What bench measures, described from manifests and headers without loading any weights: an exported
artifact, an edgeforge quantized checkpoint (run eager) or an fp32 checkpoint (run eager); the fp32
reference its manifests name; and the weight bytes one decode step reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path

from edgeforge.errors import ConfigError, InputError, UnsupportedError

MANIFEST = "edgeforge.json"
EXPORT_DEFAULT_MAX_SEQ_LEN = 2048  # what `edgeforge export` sizes the cache to; eager models get the same


def decode_bytes_per_token(config, layers: dict | None) -> int:
    """Weight bytes one decode step reads: quantized layers at their bit width + fp32 scales (+ int8 zero
    points), everything else fp32; an untied embedding table contributes one row."""
    from edgeforge.checkpoints import expected_shapes

    total = 0.0
    for name, shape in expected_shapes("llama", config).items():
        layer = (layers or {}).get(name.removesuffix(".weight"))
        if layer and name.endswith(".weight"):
            scheme = layer["scheme"]
            rows, columns = shape
            groups = rows * (columns // scheme["group_size"] if scheme["group_size"] else 1)
            size = rows * columns * scheme["bits"] / 8 + groups * 4 + (0 if scheme["symmetric"] else groups)
        else:
            size = prod(shape) * 4
        if name == "tok_embeddings.weight" and not config.tie_embeddings:
            size /= shape[0]
        total += size
    return int(total)


@dataclass(frozen=True)
class ModelInfo:
    """A model to bench, described without loading it. format: "pte", "onnx" (artifacts, run in their
    runtime), "edgeforge" (quantized checkpoint) or a checkpoint format (both run eager)."""

    path: Path
    label: str
    format: str
    backend: str
    scheme: str
    config: object
    size_bytes: int
    parameters: int
    max_seq_len: int
    bytes_per_token: int
    bytes_basis: str
    source: Path | None  # what it was made from (manifest), None for an fp32 checkpoint
    warnings: tuple[str, ...] = ()  # what its manifest says a reader of the numbers should know


def describe_model(path: str | Path) -> ModelInfo:
    """Read manifests and headers only: an artifact, a quantized checkpoint or an fp32 checkpoint."""
    from edgeforge.export.artifact import KIND as ARTIFACT_KIND
    from edgeforge.fileio import read_json
    from edgeforge.models.llama import LlamaConfig
    from edgeforge.quantize.checkpoint import KIND as QUANTIZED_KIND

    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path=path)
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).is_file() else {}
    if manifest.get("architecture", "llama") != "llama":
        raise UnsupportedError(f"bench measures decoders; this is a {manifest['architecture']} model", path=path)
    if manifest.get("kind") == ARTIFACT_KIND:
        from edgeforge.export import open_artifact

        manifest = open_artifact(path).manifest
        config, report = LlamaConfig.from_dict(manifest["config"]), manifest["report"]
        source = Path(manifest["source"]["path"])
        layers, basis = _source_layers(source, manifest["scheme"])
        if layers is None and manifest["scheme"] != "fp32":
            per_token = report["expected_size_bytes"]
            basis = "manifest expected_size_bytes (whole model: the source checkpoint naming the layer schemes is gone)"
        else:
            per_token = decode_bytes_per_token(config, layers)
        warnings = ((f"{path}: its export guard did not run (logits never checked against eager)",)
                    if manifest.get("guard") is None else ())
        warnings += (f"{path}: {report['size_warning']}",) if "size_warning" in report else ()
        return ModelInfo(path=path, label=f"{path.name} {manifest['scheme']}", format=manifest["format"],
                         backend=f"{manifest['format']} {manifest['target']['backend']}", scheme=manifest["scheme"],
                         config=config, size_bytes=report["size_bytes"], parameters=report["parameters"],
                         max_seq_len=manifest["max_seq_len"], bytes_per_token=per_token, bytes_basis=basis,
                         source=source, warnings=warnings)
    if manifest.get("kind") == QUANTIZED_KIND:
        from edgeforge.export.targets import scheme_name
        from edgeforge.quantize import read_manifest, weight_files

        manifest = read_manifest(path)
        config = LlamaConfig.from_dict(manifest["config"])
        return _eager_info(path, config, scheme_name(manifest), format="edgeforge", layers=manifest["layers"],
                           size_bytes=sum(f.stat().st_size for f in weight_files(path)),
                           source=Path(manifest["source"]["path"]))
    from edgeforge.checkpoints import open_checkpoint

    checkpoint = open_checkpoint(path)
    if checkpoint.architecture != "llama":
        raise UnsupportedError(f"bench measures decoders; this is a {checkpoint.architecture} model", path=path)
    return _eager_info(checkpoint.path, checkpoint.config, "fp32", format=checkpoint.format, layers=None,
                       size_bytes=checkpoint.size_bytes, source=None)


def _eager_info(path: Path, config, scheme: str, *, format: str, layers: dict | None, size_bytes: int,
                source: Path | None) -> ModelInfo:
    from edgeforge.checkpoints import expected_shapes

    return ModelInfo(path=path, label=f"{path.name} {scheme}", format=format, backend="torch eager", scheme=scheme,
                     config=config, size_bytes=size_bytes,
                     parameters=sum(prod(s) for s in expected_shapes("llama", config).values()),
                     max_seq_len=min(config.max_seq_len, EXPORT_DEFAULT_MAX_SEQ_LEN),
                     bytes_per_token=decode_bytes_per_token(config, layers),
                     bytes_basis="scheme-implied: int weights at their bit width + fp32 scales + fp32 rest (the "
                     "eager emulation moves more: it dequantizes each weight to fp32 on every call)"
                     if layers else "fp32 parameters", source=source)


def _source_layers(source: Path, scheme: str) -> tuple[dict | None, str]:
    """The per-layer schemes of an artifact's source quantized checkpoint, if it is still readable."""
    if scheme == "fp32":
        return None, "fp32 parameters"
    try:
        from edgeforge.quantize import read_manifest, weight_files

        return read_manifest(source)["layers"], f"scheme-implied from the source checkpoint's layers ({source})"
    except (InputError, OSError):
        return None, ""


def default_reference(model: ModelInfo) -> Path | None:
    """The fp32 checkpoint ``model`` comes from (through an artifact's source quantized checkpoint);
    None when ``model`` is itself an fp32 eager checkpoint."""
    if model.source is None:
        return None
    source = model.source
    if (source / MANIFEST).is_file():
        from edgeforge.fileio import read_json

        source = Path(read_json(source / MANIFEST).get("source", {}).get("path", source))
    if not source.exists():
        raise ConfigError(f"the fp32 reference {source} named by {model.path}'s manifests does not exist here; "
                          "pass --reference CHECKPOINT")
    return source
