"""Meta's original layout: params.json + consolidated.NN.pth shards (model-parallel splits merged).

Shards are read with ``torch.load(weights_only=True, mmap=True)``: tensors only, nothing unpickled.
q/k rows are interleaved pairs and are converted to rotate-half on read.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch

from edgeforge.checkpoints.base import Checkpoint, LazyTensors, checkpoint_format, require
from edgeforge.checkpoints.loading import expected_shapes
from edgeforge.checkpoints.permute import interleaved_to_rotate_half
from edgeforge.checkpoints.tokenizers import find_tokenizer
from edgeforge.errors import InputError
from edgeforge.fileio import read_json
from edgeforge.models.llama import LlamaConfig, RopeScaling

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").exists()


def _hidden_dim(params: dict, dim: int) -> int:
    """SwiGLU width as Meta's model.py derives it (unless params.json states it)."""
    if "hidden_dim" in params:
        return int(params["hidden_dim"])
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = int(params.get("multiple_of", 256))
    return multiple_of * math.ceil(hidden / multiple_of)


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"refused: holds objects other than tensors ({str(exc).splitlines()[0]})", path=path) from exc
    except Exception as exc:  # truncated zip, bad magic
        raise InputError(f"not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})", path=path) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("expected a dict of tensors", path=path)
    return state


@checkpoint_format("meta", detect=_is_meta_dir)
def open_meta(path: Path) -> Checkpoint:
    """Open a Meta checkpoint directory; shards are merged along the dimension they were split on."""
    params_path = path / "params.json"
    params = read_json(params_path)
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise InputError("no consolidated.NN.pth shards beside params.json", path=path)
    states = [_load_shard(shard) for shard in shards]
    dim, heads = require(params, "dim", params_path), require(params, "n_heads", params_path)
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # Llama 2's params.json says -1: the tokenizer decides, the embedding shows it
        vocab = states[0]["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in states[0] else 0
    scaling = RopeScaling("llama3", factor=float(params.get("rope_scaling_factor", 8.0))) \
        if params.get("use_scaled_rope") else None
    config = LlamaConfig(dim=dim, n_layers=require(params, "n_layers", params_path), n_heads=heads,
                         n_kv_heads=params.get("n_kv_heads") or heads, vocab_size=vocab,
                         hidden_dim=_hidden_dim(params, dim), norm_eps=float(params.get("norm_eps", 1e-5)),
                         rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
                         max_seq_len=int(params.get("max_seq_len", 2048)),
                         tie_embeddings="output.weight" not in states[0])
    expected = expected_shapes("llama", config)
    tensors = LazyTensors(path)
    for name in states[0]:
        if name == "rope.freqs":
            continue  # RoPE table: recomputed from theta
        parts = [state.get(name) for state in states]
        if any(part is None for part in parts):
            raise InputError(f"tensor {name} is missing from some shards", path=path)
        heads_of = {"wq": config.n_heads, "wk": config.n_kv_heads}.get(name.split(".")[-2])
        shape = _merged_shape(parts, expected.get(name), name, path)
        tensors.add(name, shape, _DTYPE_NAMES.get(parts[0].dtype, str(parts[0].dtype)),
                    _merger(parts, shape, heads_of if name.startswith("layers.") else None))
    tokenizer = find_tokenizer(path, vocab_size=config.vocab_size) or find_tokenizer(path.parent)
    files = [params_path, *shards] + ([tokenizer.source] if tokenizer is not None else [])
    return Checkpoint(path=path, format="meta", architecture="llama", config=config, tensors=tensors,
                      tokenizer=tokenizer, files=files, metadata={"shards": len(shards)})


def _merged_shape(parts, expected, name, path) -> tuple[int, ...]:
    """Shape after concatenating shards on the one dimension where they fall short of the config."""
    shape = tuple(parts[0].shape)
    if len(parts) == 1 or expected is None or shape == tuple(expected):
        return shape
    split = [d for d in range(len(shape)) if shape[d] != expected[d]]
    if len(split) != 1:
        raise InputError(f"tensor {name}: shard shape {shape} cannot merge into {tuple(expected)}", path=path)
    merged = list(shape)
    merged[split[0]] = sum(part.shape[split[0]] for part in parts)
    return tuple(merged)


def _merger(parts, shape, rope_heads):
    def read() -> torch.Tensor:
        if len(parts) == 1 or tuple(parts[0].shape) == shape:
            tensor = parts[0]
        else:
            dim = next(d for d in range(len(shape)) if parts[0].shape[d] != shape[d])
            tensor = torch.cat(parts, dim=dim)
        tensor = tensor.float()
        return interleaved_to_rotate_half(tensor, rope_heads) if rope_heads else tensor

    return read
