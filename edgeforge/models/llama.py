"""An export-friendly decoder-only Llama in plain torch: the fp32 reference model for every later stage.

Weight names follow Meta's checkpoints (``layers.0.attention.wq.weight`` ...). RoPE uses the
rotate-half layout; loaders convert interleaved-pair checkpoints (Meta, llama2.c, GGUF) at load
time. The static KV cache lives in module buffers so one graph serves prefill (any length) and
single-token decode, both addressed by ``input_pos``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE for long context.

    kind: "llama3" (frequency-dependent, Llama 3.1+) or "linear" (all frequencies / factor).
    factor: how much longer the context is than the one trained on.
    low_freq_factor, high_freq_factor, original_max_position_embeddings: the llama3 band edges.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("llama3", "linear"):
            raise ConfigError(f"unsupported rope scaling type {self.kind!r} (supported: llama3, linear)")
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder.

    dim: model width; n_layers: decoder blocks; n_heads / n_kv_heads: query and key-value heads
    (grouped-query attention when n_kv_heads < n_heads); hidden_dim: SwiGLU width;
    head_dim: per-head width (defaults to dim // n_heads); max_seq_len: longest context the RoPE
    tables and KV cache are sized for; tie_embeddings: output head shares the token embedding.
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def shape_line(self) -> str:
        """One line of the model's shape, for `inspect`."""
        scaling = self.rope_scaling
        return (f"dim {self.dim}, {self.n_layers} layers, heads {self.n_heads}/{self.n_kv_heads} (q/kv), "
                f"head_dim {self.head_dim}, ffn {self.hidden_dim}, vocab {self.vocab_size}, context {self.max_seq_len}, "
                f"rope theta {self.rope_theta:g}" + (f" ({scaling.kind} x{scaling.factor:g})" if scaling else "")
                + (", tied embeddings" if self.tie_embeddings else ""))

    def to_dict(self) -> dict:
        """Plain-JSON form, for manifests and `inspect --json`."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("rope_scaling", "extra")}
        out["rope_scaling"] = None if self.rope_scaling is None else vars(self.rope_scaling).copy()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LlamaConfig":
        data = dict(data)
        scaling = data.pop("rope_scaling", None)
        return cls(**data, rope_scaling=RopeScaling(**scaling) if scaling else None)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with Llama-3 or linear scaling applied."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / config.head_dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate the band between.
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, smoothed, scaled)


def rope_tables(config: LlamaConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [length, head_dim] for positions 0..length-1, in rotate-half layout."""
    positions = torch.arange(length, dtype=torch.float64)
    freqs = torch.outer(positions, rope_inverse_frequencies(config))
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos().float(), freqs.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, H, S, D]; cos, sin: [S, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KVCache(nn.Module):
    """Static cache: [batch, kv_heads, max_seq_len, head_dim] buffers written at ``input_pos``."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: [S], k, v: [B, H_kv, S, D]
        batch = k.shape[0]
        self.k_cache[:batch, :, input_pos] = k
        self.v_cache[:batch, :, input_pos] = v
        return self.k_cache[:batch], self.v_cache[:batch]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:  # query head h reads kv head h // groups
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(y.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama decoder. ``forward(tokens, input_pos)`` returns logits [B, S, vocab].

    Without ``input_pos`` it runs plain causal attention over ``tokens`` (no cache). With
    ``input_pos`` ([S] absolute positions) it writes keys/values into the static cache set up
    by :meth:`setup_cache` and attends over everything cached up to each position.
    """

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.cache_len = 0
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the RoPE tables; loaders call this after building the model on the meta device."""
        cos, sin = rope_tables(self.config, self.config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def setup_cache(self, max_batch_size: int = 1, max_seq_len: int | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
        """Allocate (or re-allocate) the static KV cache of every block, ``max_seq_len`` positions long."""
        cache_len = max_seq_len or self.config.max_seq_len
        if not 0 < cache_len <= self.config.max_seq_len:
            raise ConfigError(f"cache length {cache_len} outside 1..{self.config.max_seq_len} (the model's context)")
        self.cache_len = cache_len
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(max_batch_size, attn.n_kv_heads, cache_len, attn.head_dim, dtype)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        # tokens: [B, S]; input_pos: [S] or None
        x = self.tok_embeddings(tokens)
        if input_pos is None:
            cos, sin, mask = self.rope_cos[: tokens.shape[1]], self.rope_sin[: tokens.shape[1]], None
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            cache_positions = torch.arange(self.cache_len, device=tokens.device)
            mask = cache_positions[None, :] <= input_pos[:, None]  # [S, cache_len]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.output(self.norm(x))
