"""What bench measures, described from records and headers without loading any weights (through the one
model opener, :mod:`edgeforge.verify.models`): an exported artifact, an edgeforge quantized checkpoint (run
eager) or an fp32 checkpoint (run eager); the fp32 reference its records name; and the weight bytes one
decode step reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path

from edgeforge.errors import ConfigError, InputError, UnsupportedError

MANIFEST = "edgeforge.json"
EXPORT_DEFAULT_MAX_SEQ_LEN = 2048  # what `edgeforge export` sizes the cache to; eager models get the same


def decode_bytes_per_token(config, layers: dict | None, *, architecture_name: str, numerics=None) -> int:
    """Weight bytes one decode step of the ``architecture_name`` model reads: quantized layers (a quantized
    checkpoint record's ``layers``) at their bit width + scales (+ zero points) as ``numerics``' runtime stores
    them (None: as the checkpoint does, fp32 and int8), everything else fp32; an untied embedding table
    contributes one row."""
    from edgeforge.checkpoints import expected_shapes
    from edgeforge.models import architecture
    from edgeforge.quantize.scheme import ActivationScheme

    embedding = architecture(architecture_name).embedding + ".weight"
    total = 0.0
    for name, shape in expected_shapes(architecture_name, config).items():
        layer = (layers or {}).get(name.removesuffix(".weight"))
        if layer and name.endswith(".weight"):
            size = (numerics.stored_bytes(layer.weight_scheme, shape, ActivationScheme.from_name(layer.activations))
                    if numerics else layer.weight_scheme.stored_bytes(*shape))
        else:
            size = prod(shape) * 4
        if name == embedding and not config.tie_embeddings:
            size /= shape[0]
        total += size
    return int(total)


@dataclass(frozen=True)
class BenchModel:
    """A model to bench, described without loading it (:func:`edgeforge.verify.models.describe_model`).
    format: "pte", "onnx" (artifacts, run in their runtime) or "eager" (checkpoints, run in torch);
    max_seq_len: the KV-cache length it runs with."""

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
    source: Path | None  # what it was made from (its record), None for an fp32 checkpoint
    warnings: tuple[str, ...] = ()  # what its record says a reader of the numbers should know


def describe_bench_model(path: str | Path) -> BenchModel:
    """Read records and headers only: an artifact, a quantized checkpoint or an fp32 checkpoint."""
    from edgeforge.models import architecture
    from edgeforge.verify.models import describe_model

    model = describe_model(path)
    if not architecture(model.architecture).generates_text:
        raise UnsupportedError(f"bench measures decoders; this is a {model.architecture} model", path=model.path)
    path, record = model.path, model.record
    if model.kind == "artifact":
        config, report = record.model_config(), record.report
        source = Path(record.source.path)
        layers, basis = _source_layers(source, record.scheme)
        if layers is None and record.scheme != "fp32":
            per_token = report.expected_size_bytes
            basis = "manifest expected_size_bytes (whole model: the source checkpoint naming the layer schemes is gone)"
        else:
            per_token = decode_bytes_per_token(config, layers, architecture_name=model.architecture,
                                               numerics=record.target.activation_numerics)
        warnings = ((f"{path}: its export guard did not run (logits never checked against eager)",)
                    if record.guard is None else ())
        warnings += (f"{path}: {report.size_warning}",) if report.size_warning else ()
        return BenchModel(path=path, label=f"{path.name} {model.scheme}", format=model.format,
                          backend=f"{model.format} {record.target.backend}", scheme=model.scheme,
                          config=config, size_bytes=report.size_bytes, parameters=report.parameters,
                          max_seq_len=model.max_seq_len, bytes_per_token=per_token, bytes_basis=basis,
                          source=source, warnings=warnings)
    if model.kind == "quantized":
        from edgeforge.quantize import weight_files

        return _eager_model(model, record.model_config(), layers=record.layers,
                            size_bytes=sum(f.stat().st_size for f in weight_files(path)),
                            source=Path(record.source.path))
    return _eager_model(model, model.checkpoint.config, layers=None, size_bytes=model.checkpoint.size_bytes,
                        source=None)


def _eager_model(model, config, *, layers: dict | None, size_bytes: int, source: Path | None) -> BenchModel:
    from edgeforge.checkpoints import expected_shapes

    return BenchModel(path=model.path, label=f"{model.path.name} {model.scheme}", format=model.format,
                      backend="torch eager", scheme=model.scheme, config=config, size_bytes=size_bytes,
                      parameters=sum(prod(s) for s in expected_shapes(model.architecture, config).values()),
                      max_seq_len=min(config.max_seq_len, EXPORT_DEFAULT_MAX_SEQ_LEN),
                      bytes_per_token=decode_bytes_per_token(config, layers, architecture_name=model.architecture),
                      bytes_basis="scheme-implied: int weights at their bit width + fp32 scales + fp32 rest (the "
                      "eager emulation moves more: it dequantizes each weight to fp32 on every call)"
                      if layers else "fp32 parameters", source=source)


def _source_layers(source: Path, scheme: str) -> tuple[dict | None, str]:
    """The per-layer schemes of an artifact's source quantized checkpoint, if it is still readable."""
    if scheme == "fp32":
        return None, "fp32 parameters"
    try:
        from edgeforge.quantize import read_quantized

        return read_quantized(source).layers, f"scheme-implied from the source checkpoint's layers ({source})"
    except (InputError, OSError):
        return None, ""


def default_reference(model: BenchModel) -> Path | None:
    """The fp32 checkpoint ``model`` comes from (through an artifact's source quantized checkpoint);
    None when ``model`` is itself an fp32 eager checkpoint."""
    if model.source is None:
        return None
    source = model.source
    if (source / MANIFEST).is_file():
        from edgeforge.quantize import read_quantized

        source = Path(read_quantized(source).source.path)
    if not source.exists():
        raise ConfigError(f"the fp32 reference {source} named by {model.path}'s manifests does not exist here; "
                          "pass --reference CHECKPOINT")
    return source
