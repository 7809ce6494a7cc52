"""Test helpers: write one core-layout Llama state dict in each checkpoint format edgeforge reads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

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


def _gguf_name(name: str) -> str:
    gguf_names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
                  "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
                  "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
                  "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
    stem = name.removesuffix(".weight")
    if stem.startswith("layers."):
        _, index, rest = stem.split(".", 2)
        return f"blk.{index}.{gguf_names[rest]}.weight"
    return f"{gguf_names[stem]}.weight"


def llama3_rope_factors(config: LlamaConfig) -> torch.Tensor:
    """The ``rope_freqs.weight`` divisors llama.cpp's convert_hf_to_gguf.py writes for llama3 scaling."""
    import math

    s = config.rope_scaling
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def write_gguf(path: Path, config: LlamaConfig, state: dict, *, tensor_type: str = "F32", tokenizer: dict | None = None,
               architecture: str = "llama", rope_freqs: torch.Tensor | None = None, omit: tuple[str, ...] = ()) -> Path:
    """A llama GGUF as llama.cpp's converter writes it: q/k rows interleaved, 2-D weights in ``tensor_type``
    (F32, F16, BF16, Q8_0, Q4_0, Q4_1; quantized only where rows fill whole blocks), norms F32.

    tokenizer: {"model": "llama", "tokens", "scores", "token_types", "bos_id", "eos_id"} or
    {"model": "gpt2", "pre", "tokens", "merges", "token_types", ...}. Llama-3 rope scaling in ``config``
    is written as ``rope_freqs.weight`` (or ``rope_freqs`` given explicitly). ``omit`` drops metadata keys.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    qtype = Q[tensor_type]
    writer = gguf.GGUFWriter(path, architecture)
    arch = architecture
    fields = [
        (f"{arch}.context_length", config.max_seq_len, writer.add_uint32),
        (f"{arch}.embedding_length", config.dim, writer.add_uint32),
        (f"{arch}.block_count", config.n_layers, writer.add_uint32),
        (f"{arch}.feed_forward_length", config.hidden_dim, writer.add_uint32),
        (f"{arch}.attention.head_count", config.n_heads, writer.add_uint32),
        (f"{arch}.attention.head_count_kv", config.n_kv_heads, writer.add_uint32),
        (f"{arch}.attention.layer_norm_rms_epsilon", config.norm_eps, writer.add_float32),
        (f"{arch}.rope.freq_base", config.rope_theta, writer.add_float32),
        (f"{arch}.rope.dimension_count", config.head_dim, writer.add_uint32),
        ("general.file_type", int(gguf.LlamaFileType[f"MOSTLY_{tensor_type}" if tensor_type != "F32" else "ALL_F32"]),
         writer.add_uint32),
    ]
    if config.rope_scaling is not None and config.rope_scaling.kind == "linear":
        fields += [(f"{arch}.rope.scaling.type", "linear", writer.add_string),
                   (f"{arch}.rope.scaling.factor", config.rope_scaling.factor, writer.add_float32)]
    if tokenizer is not None:
        fields += [("tokenizer.ggml.model", tokenizer["model"], writer.add_string),
                   ("tokenizer.ggml.tokens", tokenizer["tokens"], writer.add_array)]
        for key, name, add in [("scores", "scores", writer.add_array), ("token_types", "token_type", writer.add_array),
                               ("merges", "merges", writer.add_array), ("pre", "pre", writer.add_string),
                               ("bos_id", "bos_token_id", writer.add_uint32),
                               ("eos_id", "eos_token_id", writer.add_uint32),
                               ("add_bos", "add_bos_token", writer.add_bool)]:
            if key in tokenizer:
                fields.append((f"tokenizer.ggml.{name}", tokenizer[key], add))
    for key, value, add in fields:
        if key not in omit:
            add(key, value)
    for name, tensor in state.items():
        tensor = _to_meta_layout(config, name, tensor).float().contiguous().numpy()
        blocks = gguf.GGML_QUANT_SIZES[qtype][0]
        if tensor.ndim == 2 and qtype != Q.F32 and tensor.shape[-1] % blocks == 0:
            data = gguf.quants.quantize(tensor, qtype)
            writer.add_tensor(_gguf_name(name), data, raw_dtype=None if qtype == Q.F16 else qtype)
        else:
            writer.add_tensor(_gguf_name(name), tensor)
    if rope_freqs is None and config.rope_scaling is not None and config.rope_scaling.kind == "llama3":
        rope_freqs = llama3_rope_factors(config)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_plugin_distribution(site: Path, group: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A distribution ``toyplugin`` 0.1 as pip would install it into ``site`` (put ``site`` on sys.path and refresh
    the registry to see it): its ``entry_points`` (name -> "module:object") in ``group``, and ``modules``
    (module name -> source)."""
    info = site / "toyplugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{name} = {target}\n"
                                                                    for name, target in entry_points.items()))
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    return site
