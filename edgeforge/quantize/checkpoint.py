"""The quantized checkpoint directory: what quantize writes and export reads.

    model.safetensors   per quantized layer NAME: NAME.qweight (int8, or int4 packed two per uint8),
                        NAME.scale (float32 [out, groups]), NAME.zero_point (int8, asymmetric only),
                        NAME.input_scale / NAME.input_zero_point (static activations only),
                        NAME.input_multiplier (SmoothQuant's 1/s where no op could absorb it), NAME.bias;
                        everything else (norms, layers kept in full precision) as NAME.weight, float32.
                        Beyond SHARD_BYTES: model-0000k-of-0000n.safetensors + model.safetensors.index.json,
                        the Hugging Face layout, written shard by shard while quantizing.
    edgeforge.json      the record (QuantizedCheckpoint, quantize/record.py): source hash, recipe, calibration, activation numerics (whose run-time rounding
                        calibration saw, and the loaded model computes by default), tool versions, per-layer
                        schemes and stats
    calibration.json    fingerprints of the calibration documents (for verify's overlap check)
    tokenizer files     copied from the source checkpoint
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from edgeforge.checkpoints import Checkpoint, LazyTensors, checkpoint_format
from edgeforge.checkpoints.hf import safetensors_files
from edgeforge.checkpoints.tokenizers import find_tokenizer
from edgeforge.errors import InputError
from edgeforge.fileio import content_files, write_json_atomic
from edgeforge.models import model_class
from edgeforge.quantize.activations import ActivationNumerics
from edgeforge.quantize.modules import QuantizedEmbedding, QuantizedLinear, set_module
from edgeforge.quantize.scheme import (ActivationScheme, QuantizedWeight, WeightScheme, dequantize, pack_int4,
                                       unpack_int4)
from edgeforge.quantize.record import MANIFEST, QuantizedCheckpoint, read_quantized

QUANTIZED_SUFFIXES = ("qweight", "scale", "zero_point", "input_scale", "input_zero_point", "input_multiplier", "bias")
SHARD_BYTES = 128 * 2**20  # a quantizer holds at most about this much finished output (x2 while a shard is written)


def layer_tensors(name: str, weight: QuantizedWeight, scheme: WeightScheme,
                  input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
                  input_multiplier: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The safetensors entries of one quantized layer."""
    qdata = pack_int4(weight.qdata) if scheme.bits == 4 else weight.qdata
    out = {f"{name}.qweight": qdata.contiguous(), f"{name}.scale": weight.scale.contiguous()}
    if weight.zero_point is not None:
        out[f"{name}.zero_point"] = weight.zero_point.contiguous()
    if input_qparams is not None:
        out[f"{name}.input_scale"], out[f"{name}.input_zero_point"] = (t.reshape(1).clone() for t in input_qparams)
    if input_multiplier is not None:
        out[f"{name}.input_multiplier"] = input_multiplier.float().clone()  # readers of one input share it
    return out


class ShardWriter:
    """Collects finished tensors and writes them out in safetensors shards of about ``shard_bytes``, so the
    quantized result of a large model never sits in memory whole. ``close`` names the files: a single
    ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``."""

    def __init__(self, directory: Path):
        self.directory, self.shard_bytes = Path(directory), SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.update({name: tensor})

    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.pending.update(tensors)
        self.pending_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = self.directory / f"shard-{len(self.shards):05d}.partial"
        save_file(dict(sorted(self.pending.items())), str(file), metadata={"format": "pt"})
        self.shards.append((file, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for number, (file, names) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            file.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        size = sum((self.directory / f).stat().st_size for f in set(weight_map.values()))
        write_json_atomic(self.directory / "model.safetensors.index.json",
                          {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))})


def save_quantized(tmp: Path, *, record: QuantizedCheckpoint, fingerprints: tuple[str, ...] | None, tokenizer) -> None:
    """Write what goes beside the weights into the (temporary) checkpoint directory (the tokenizer as
    find_tokenizer reads it back: a GGUF's vocabulary becomes a tokenizer.json)."""
    from edgeforge.checkpoints.tokenizers import save_tokenizer

    write_json_atomic(tmp / MANIFEST, record.to_dict())
    if fingerprints is not None:
        write_json_atomic(tmp / "calibration.json", {"document_fingerprints": list(fingerprints)})
    save_tokenizer(tokenizer, tmp)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a quantized checkpoint directory."""
    return sorted(set(safetensors_files(path).values()))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in weight_files(path):
        try:
            tensors.update(load_file(str(file)))
        except Exception as exc:
            raise InputError(f"not a readable safetensors file ({exc})", path=file) from exc
    return tensors


def _quantized_weight(tensors: dict, name: str, scheme: WeightScheme, path: Path) -> QuantizedWeight:
    try:
        qdata = tensors[f"{name}.qweight"]
        qdata = unpack_int4(qdata) if scheme.bits == 4 else qdata
        return QuantizedWeight(qdata, tensors[f"{name}.scale"], tensors.get(f"{name}.zero_point"))
    except KeyError as exc:
        raise InputError(f"missing tensor {exc.args[0]}", path=path) from None


def load_quantized_model(path: str | Path, *, numerics: ActivationNumerics | None = None) -> torch.nn.Module:
    """The eager quantized model: the model core with QuantizedLinear/QuantizedEmbedding modules swapped in,
    computing as ``numerics``' runtime does (default: the numerics the checkpoint was calibrated with)."""
    path = Path(path)
    record = read_quantized(path)
    numerics = numerics or record.numerics
    config = record.model_config()
    tensors = _read_tensors(path)
    with torch.device("meta"):
        model = model_class(record.architecture)(config)
    for name, layer in record.layers.items():
        scheme = layer.weight_scheme
        weight = _quantized_weight(tensors, name, scheme, path)
        if isinstance(model.get_submodule(name), torch.nn.Embedding):
            set_module(model, name, QuantizedEmbedding(weight, scheme))
            continue
        activations = ActivationScheme(layer.activations)
        input_qparams = None
        if activations is ActivationScheme.STATIC_INT8:
            input_qparams = (tensors[f"{name}.input_scale"][0], tensors[f"{name}.input_zero_point"][0])
        set_module(model, name, QuantizedLinear(weight, scheme, activations, input_qparams,
                                                bias=tensors.get(f"{name}.bias"),
                                                input_multiplier=tensors.get(f"{name}.input_multiplier"),
                                                numerics=numerics))
    quantized = {f"{name}.{suffix}" for name in record.layers for suffix in QUANTIZED_SUFFIXES}
    plain = {k: v for k, v in tensors.items() if k not in quantized}
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and k not in plain]
    if missing:
        raise InputError(f"missing tensor {missing[0]}", path=path)
    model.load_state_dict(plain, strict=False, assign=True)
    model.init_buffers()
    return model.eval()


def _is_quantized_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).exists() and any(
        (path / name).exists() for name in ("model.safetensors", "model.safetensors.index.json"))


@checkpoint_format("edgeforge", detect=_is_quantized_dir)
def open_quantized(path: Path) -> Checkpoint:
    """A quantized checkpoint seen as a plain one: weights dequantized to float32 on read (for inspect)."""
    record = read_quantized(path)
    config = record.model_config()
    stored = _read_tensors(path)
    lazy = LazyTensors(path)
    for name, layer in record.layers.items():
        scheme = layer.weight_scheme
        weight = _quantized_weight(stored, name, scheme, path)
        multiplier = stored.get(f"{name}.input_multiplier", 1.0)  # the weight as the layer applies it to x
        lazy.add(f"{name}.weight", weight.qdata.shape, f"INT{scheme.bits}",
                 lambda w=weight, m=multiplier: dequantize(w.qdata, w.scale, w.zero_point) * m)
    quantized = {f"{name}.{suffix}" for name in record.layers for suffix in QUANTIZED_SUFFIXES if suffix != "bias"}
    for name, tensor in stored.items():
        if name not in quantized:
            lazy.add(name, tensor.shape, "F32", lambda t=tensor: t)
    counts: dict[str, int] = {}
    for layer in record.layers.values():
        scheme = layer.weight_scheme
        key = f"int{scheme.bits} " + (f"g{scheme.group_size}" if scheme.group_size else "per-channel")
        counts[key] = counts.get(key, 0) + 1
    quantization = {"recipe": record.recipe.name, "algorithm": record.recipe.algorithm,
                    "activations": record.recipe.activations, "activation_numerics": record.numerics.value,
                    "layers": ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))}
    files = content_files(path)  # what content_hash covers, as for an artifact directory
    return Checkpoint(path=path, format="edgeforge", architecture=record.architecture, config=config, tensors=lazy,
                      tokenizer=find_tokenizer(path, vocab_size=config.vocab_size), files=files,
                      metadata={"quantization": quantization, "source": record.source.path})
