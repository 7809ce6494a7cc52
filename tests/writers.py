"""Test helpers: write one core-layout Llama state dict in each checkpoint format edgeforge reads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from edgeforge.checkpoints.permute import rotate_half_to_interleaved
from edgeforge.models.llama import LlamaConfig, Transformer

HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def random_llama(config: LlamaConfig, seed: int = 0) -> Transformer:
    """A Llama with random weights large enough that logits differ clearly between tokens."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


def core_state(model: Transformer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight")
    return state


def hf_config(config: LlamaConfig) -> dict:
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
           "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layers,
           "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
           "head_dim": config.head_dim, "vocab_size": config.vocab_size,
           "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
           "rope_theta": config.rope_theta, "hidden_act": "silu", "tie_word_embeddings": config.tie_embeddings,
           "bos_token_id": 1, "eos_token_id": 2}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        out["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings}
    return out


def to_hf_name(name: str) -> str:
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"model.layers.{index}.{HF_NAMES[rest]}"
    return HF_NAMES[name]


def write_hf(directory: Path, config: LlamaConfig, state: dict, *, dtype=torch.float32, shards: int = 1) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(config)))
    tensors = {to_hf_name(k): v.to(dtype).contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(directory / filename))
        weight_map.update({n: filename for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _to_meta_layout(config: LlamaConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if name.endswith("attention.wq.weight"):
        return rotate_half_to_interleaved(tensor, config.n_heads)
    if name.endswith("attention.wk.weight"):
        return rotate_half_to_interleaved(tensor, config.n_kv_heads)
    return tensor


# Meta model-parallel splits: column-parallel on dim 0, row-parallel on dim 1, norms replicated.
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def write_meta(directory: Path, config: LlamaConfig, state: dict, *, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "hidden_dim": config.hidden_dim,
              "norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "max_seq_len": config.max_seq_len}
    (directory / "params.json").write_text(json.dumps(params))
    for shard in range(shards):
        part = {}
        for name, tensor in state.items():
            tensor = _to_meta_layout(config, name, tensor)
            split = _SPLIT_DIM.get(name.split(".")[-2])
            part[name] = tensor.chunk(shards, dim=split)[shard].clone() if split is not None else tensor.clone()
        torch.save(part, directory / f"consolidated.{shard:02d}.pth")
    return directory


def write_llama2c(path: Path, config: LlamaConfig, state: dict) -> Path:
    """llama2.c legacy v0 export (vocab negative when the classifier is separate)."""
    n = config.n_layers
    vocab = config.vocab_size if config.tie_embeddings else -config.vocab_size
    header = struct.pack("<7i", config.dim, config.hidden_dim, n, config.n_heads, config.n_kv_heads, vocab,
                         config.max_seq_len)

    def stack(key):
        return torch.stack([_to_meta_layout(config, f"layers.{i}.{key}", state[f"layers.{i}.{key}"]) for i in range(n)])

    arrays = [state["tok_embeddings.weight"], stack("attention_norm.weight"), stack("attention.wq.weight"),
              stack("attention.wk.weight"), stack("attention.wv.weight"), stack("attention.wo.weight"),
              stack("ffn_norm.weight"), stack("feed_forward.w1.weight"), stack("feed_forward.w2.weight"),
              stack("feed_forward.w3.weight"), state["norm.weight"],
              torch.zeros(config.max_seq_len, config.head_dim // 2), torch.zeros(config.max_seq_len, config.head_dim // 2)]
    if not config.tie_embeddings:
        arrays.append(state["output.weight"])
    with open(path, "wb") as handle:
        handle.write(header)
        for array in arrays:
            handle.write(array.float().numpy().astype("<f4").tobytes())
    return path
