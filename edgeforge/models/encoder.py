"""A BERT-style sentence encoder in plain torch: the fp32 reference for embedding models such as
all-MiniLM-L6-v2.

Weight names are Hugging Face ``BertModel``'s without the pooler (``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight`` ...). ``forward`` runs the sentence-transformers
pipeline: encoder -> mean over the attention mask -> L2 normalise, one vector per text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.errors import ConfigError, InputError, UnsupportedError
from edgeforge.fileio import read_json

_HF_REQUIRED = {  # BertConfig field -> transformers config.json key
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "hidden_dim": "intermediate_size",
    "max_positions": "max_position_embeddings",
}
_HF_OPTIONAL = {"type_vocab_size": "type_vocab_size", "norm_eps": "layer_norm_eps", "pad_id": "pad_token_id"}
_ST_PIPELINE = ["Transformer", "Pooling", "Normalize"]  # the sentence-transformers modules forward() runs


@dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT-style encoder.

    dim: model width; n_layers: encoder blocks; n_heads: attention heads (dim // n_heads each);
    hidden_dim: GELU feed-forward width; max_positions: rows of the position embedding;
    type_vocab_size: rows of the token-type (segment) embedding; norm_eps: LayerNorm epsilon;
    pad_id: the padding token; max_seq_len: longest input, in tokens, that texts are truncated to
    (sentence-transformers' ``max_seq_length``; defaults to max_positions).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pad_id: int = 0
    max_seq_len: int | None = None

    def __post_init__(self):
        if self.max_seq_len is None:
            object.__setattr__(self, "max_seq_len", self.max_positions)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_positions", "type_vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"pad_id must be a token id below vocab_size ({self.vocab_size}), got {self.pad_id!r}")
        if self.max_seq_len > self.max_positions:
            raise ConfigError(f"max_seq_len ({self.max_seq_len}) exceeds max_positions ({self.max_positions})")

    def shape_line(self) -> str:
        """One line of the model's shape, for `inspect`."""
        return ", ".join(f"{key} {value}" for key, value in self.to_dict().items())

    def to_dict(self) -> dict:
        """Plain-JSON form, for manifests and `inspect --json`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BertConfig":
        return cls(**data)

    @classmethod
    def from_hf(cls, config: dict, path: Path) -> "BertConfig":
        """BertConfig from a transformers BERT ``config.json`` at ``path``, plus the sentence-transformers
        files beside it (``modules.json``, the pooling config, ``sentence_bert_config.json``) if present."""
        if config.get("hidden_act", "gelu") != "gelu":
            raise UnsupportedError(f"hidden_act {config['hidden_act']!r} (supported: gelu)", path=path)
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedError(f"position_embedding_type {config['position_embedding_type']!r} "
                                   "(supported: absolute)", path=path)
        if config.get("is_decoder"):
            raise UnsupportedError("is_decoder=true (causal BERT) is not an encoder edgeforge handles", path=path)
        missing = [key for key in _HF_REQUIRED.values() if key not in config]
        if missing:
            raise InputError(f"missing config key {missing[0]!r}", path=path)
        fields = {name: config[key] for name, key in _HF_REQUIRED.items()}
        fields.update({name: config[key] for name, key in _HF_OPTIONAL.items() if config.get(key) is not None})
        max_seq_len = _sentence_transformers_max_seq_len(path.parent)
        try:
            return cls(**fields, max_seq_len=max_seq_len)
        except ConfigError as exc:
            raise ConfigError(exc.problem, path=path) from None


def _sentence_transformers_max_seq_len(directory: Path) -> int | None:
    """``max_seq_length`` of a sentence-transformers folder (None if absent), after checking that its
    pipeline is the one forward() runs: Transformer -> mean Pooling -> Normalize."""
    modules_path = directory / "modules.json"
    if modules_path.exists():
        modules = read_json(modules_path, list)
        if not all(isinstance(m, dict) for m in modules):
            raise InputError("expected a JSON list of module objects", path=modules_path)
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if kinds != _ST_PIPELINE:
            raise UnsupportedError(f"sentence-transformers pipeline {' -> '.join(kinds)} "
                                   f"(supported: {' -> '.join(_ST_PIPELINE)})", path=modules_path)
        pooling_path = directory / str(modules[1].get("path", "")) / "config.json"
        pooling = read_json(pooling_path)
        modes = sorted(key for key, value in pooling.items() if key.startswith("pooling_mode_") and value)
        if modes != ["pooling_mode_mean_tokens"]:
            raise UnsupportedError(f"pooling {', '.join(modes) or 'none'} (supported: pooling_mode_mean_tokens)",
                                   path=pooling_path)
    settings_path = directory / "sentence_bert_config.json"
    return read_json(settings_path).get("max_seq_length") if settings_path.exists() else None


def hf_bert_name(name: str) -> str | None:
    """Core name of a Hugging Face BERT tensor, or None for one the encoder does not use (pooler, buffers).

    Unknown names are returned unchanged so that checkpoint validation names them.
    """
    name = name.removeprefix("bert.")
    if name.startswith("pooler.") or name in ("embeddings.position_ids", "embeddings.token_type_ids"):
        return None
    return name


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_id)
        self.position_embeddings = nn.Embedding(config.max_positions, config.dim)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [S]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; padded keys are masked out."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.dim // config.n_heads
        self.query = nn.Linear(config.dim, config.dim)
        self.key = nn.Linear(config.dim, config.dim)
        self.value = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D]; mask: [B, 1, 1, S], True where the key is a real token
        batch, seq_len, dim = x.shape
        q, k, v = (proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(batch, seq_len, dim)


class AddNorm(nn.Module):
    """Post-norm residual, ``LayerNorm(dense(h) + residual)`` (HF's BertSelfOutput and BertOutput)."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = SelfAttention(config)  # HF's name
        self.output = AddNorm(config.dim, config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    """Feed-forward up-projection with exact (erf) GELU."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = AddNorm(config.hidden_dim, config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    """BERT encoder with mean pooling. ``forward(input_ids, attention_mask, token_type_ids)`` returns
    L2-normalised sentence embeddings [B, dim]; padded positions (attention_mask 0) do not count.
    """

    config_class = BertConfig

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))})

    def init_buffers(self) -> None:
        """Nothing to recompute (position ids are made in forward); loaders call it after a meta-device build."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, attention_mask, token_type_ids: [B, S] int
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        for layer in self.encoder["layer"]:
            x = layer(x, mask)
        weights = attention_mask.unsqueeze(-1).to(x.dtype)  # [B, S, 1]
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def embed(model: BertEncoder, tokenizer, texts: list[str], *, batch_size: int = 32) -> torch.Tensor:
    """Embeddings [N, dim] of ``texts``, truncated to ``model.config.max_seq_len`` tokens.

    ``tokenizer`` needs ``encode_batch(texts, max_length) -> (input_ids, attention_mask, token_type_ids)``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    with torch.inference_mode():
        chunks = [model(*tokenizer.encode_batch(texts[start:start + batch_size], model.config.max_seq_len))
                  for start in range(0, len(texts), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.dim)
