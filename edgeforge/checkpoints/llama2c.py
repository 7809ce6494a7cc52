"""llama2.c ``.bin`` checkpoints: the legacy v0 header (7 int32) or the v1 header ("ak42", fp32),
followed by float32 arrays in a fixed order. The tokenizer is ``tok{vocab}.bin`` (or a
SentencePiece ``.model``) beside the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from edgeforge.checkpoints.base import Checkpoint, LazyTensors, checkpoint_format
from edgeforge.checkpoints.permute import interleaved_to_rotate_half
from edgeforge.checkpoints.tokenizers import find_tokenizer
from edgeforge.errors import InputError, UnsupportedError
from edgeforge.models.llama import LlamaConfig

_V1_MAGIC = 0x616B3432  # "ak42"
_V1_HEADER_BYTES = 256


def _is_llama2c(path: Path) -> bool:
    return path.is_file() and path.suffix == ".bin" and not path.name.startswith("tok")


def _read_header(path: Path, data: np.memmap) -> tuple[LlamaConfig, int, bool]:
    """(config, byte offset of the weights, shared classifier) from a v0 or v1 header."""
    if len(data) < 28:
        raise InputError(f"truncated llama2.c header: {len(data)} bytes, need 28", path=path)
    magic, version = struct.unpack_from("<Ii", data, 0)
    if magic == _V1_MAGIC:
        if version != 1:
            raise UnsupportedError(f"llama2.c export version {version} (only v0 and fp32 v1 are read)", path=path)
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", data, 8)
        shared = bool(data[8 + 28])
        offset = _V1_HEADER_BYTES
    else:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", data, 0)
        shared, vocab, offset = vocab > 0, abs(vocab), 28  # v0: negative vocab = separate classifier
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) <= 0 or dim % heads:
        raise InputError(f"not a llama2.c checkpoint: implausible header {(dim, hidden, layers, heads, kv_heads, vocab, seq_len)}",
                         path=path)
    config = LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, vocab_size=vocab,
                         hidden_dim=hidden, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=seq_len,
                         tie_embeddings=shared)
    return config, offset, shared


def _layout(config: LlamaConfig, shared: bool, v0: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Array names and shapes in file order (llama2.c export.py ``legacy_export`` / ``version1_export``)."""
    d, h, n, kv = config.dim, config.hidden_dim, config.n_layers, config.n_kv_heads * config.head_dim
    q = config.n_heads * config.head_dim
    rows = [("tok_embeddings", (config.vocab_size, d))] if v0 else []
    rows += [("attention_norm", (n, d))]
    if not v0:
        rows += [("ffn_norm", (n, d)), ("norm", (d,)), ("tok_embeddings", (config.vocab_size, d))]
    rows += [("wq", (n, q, d)), ("wk", (n, kv, d)), ("wv", (n, kv, d)), ("wo", (n, d, q))]
    if v0:
        rows += [("ffn_norm", (n, d))]
    rows += [("w1", (n, h, d)), ("w2", (n, d, h)), ("w3", (n, h, d))]
    if v0:
        rows += [("norm", (d,)), ("freq_cis_real", (config.max_seq_len, config.head_dim // 2)),
                 ("freq_cis_imag", (config.max_seq_len, config.head_dim // 2))]
    if not shared:
        rows += [("output", (config.vocab_size, d))]
    return rows


_PER_LAYER = {"attention_norm": "attention_norm.weight", "ffn_norm": "ffn_norm.weight",
              "wq": "attention.wq.weight", "wk": "attention.wk.weight", "wv": "attention.wv.weight",
              "wo": "attention.wo.weight", "w1": "feed_forward.w1.weight", "w2": "feed_forward.w2.weight",
              "w3": "feed_forward.w3.weight"}


@checkpoint_format("llama2c", detect=_is_llama2c)
def open_llama2c(path: Path) -> Checkpoint:
    """Open a llama2.c ``.bin`` file (memory-mapped; arrays are read on access)."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read: {exc}", path=path) from exc
    config, offset, shared = _read_header(path, data)
    v0 = offset == 28
    layout = _layout(config, shared, v0)
    needed = offset + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    if len(data) < needed:
        raise InputError(f"truncated llama2.c checkpoint: {len(data)} bytes, header implies {needed}", path=path)
    if len(data) > needed:
        raise InputError(f"llama2.c checkpoint has {len(data) - needed} bytes beyond what the header implies "
                         f"(wrong header or a different export version)", path=path)
    tensors = LazyTensors(path)
    for name, shape in layout:
        count = int(np.prod(shape))
        array = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape)
        offset += 4 * count
        if name.startswith("freq_cis"):
            continue  # RoPE tables: recomputed from theta
        if name in _PER_LAYER:
            for layer in range(config.n_layers):
                heads = {"wq": config.n_heads, "wk": config.n_kv_heads}.get(name)
                tensors.add(f"layers.{layer}.{_PER_LAYER[name]}", shape[1:], "F32", _reader(array, layer, heads))
        else:
            tensors.add(f"{name}.weight", shape, "F32", _reader(array, None, None))
    tokenizer = find_tokenizer(path.parent, vocab_size=config.vocab_size)
    files = [path] + ([tokenizer.source] if tokenizer is not None else [])
    return Checkpoint(path=path, format="llama2c", architecture="llama", config=config, tensors=tensors,
                      tokenizer=tokenizer, files=files, metadata={"header": "v0" if v0 else "v1"})


def _reader(array: np.ndarray, layer: int | None, rope_heads: int | None):
    def read() -> torch.Tensor:
        tensor = torch.from_numpy(np.array(array if layer is None else array[layer]))
        return interleaved_to_rotate_half(tensor, rope_heads) if rope_heads else tensor

    return read
