"""Hugging Face directories: config.json + model.safetensors (or shards with an index), read lazily.

Llama weights are already in rotate-half RoPE layout, so tensors are only renamed.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgeforge.checkpoints.base import Checkpoint, LazyTensors, checkpoint_format, require
from edgeforge.checkpoints.tokenizers import find_tokenizer
from edgeforge.errors import InputError, UnsupportedError
from edgeforge.fileio import read_json
from edgeforge.models.llama import LlamaConfig, RopeScaling

_LLAMA_NAMES = [  # HF name pattern -> core name
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def llama_config_from_hf(config: dict, path: Path) -> LlamaConfig:
    """LlamaConfig from a transformers config.json (v4 ``rope_scaling`` or v5 ``rope_parameters``)."""
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"hidden_act {config['hidden_act']!r} (Llama uses silu)", path=path)
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UnsupportedError(f"{flag}=true is not a Llama layout edgeforge handles", path=path)
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type in ("llama3", "linear"):
        scaling = RopeScaling(kind=rope_type, factor=float(rope["factor"]),
                              low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                              high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                              original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)))
    elif rope_type != "default":
        raise UnsupportedError(f"rope type {rope_type!r} (supported: default, linear, llama3)", path=path)
    heads = require(config, "num_attention_heads", path)
    return LlamaConfig(
        dim=require(config, "hidden_size", path),
        n_layers=require(config, "num_hidden_layers", path),
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        vocab_size=require(config, "vocab_size", path),
        hidden_dim=require(config, "intermediate_size", path),
        head_dim=config.get("head_dim"),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the shard index or the single model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError("shard index has no 'weight_map'", path=index)
        files = {name: directory / filename for name, filename in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.exists()})
        if missing:
            raise InputError(f"shard listed in the index is missing: {missing[0]}", path=index)
        return files
    single = directory / "model.safetensors"
    if not single.exists():
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (found {others[0]}: pickled weights are not loaded; convert to safetensors)" if others else ""
        raise InputError(f"no model.safetensors or model.safetensors.index.json{hint}", path=directory)
    return _names_in(single)


def _names_in(file: Path) -> dict[str, Path]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: file for name in handle.keys()}
    except Exception as exc:  # SafetensorError: truncated or corrupt header
        raise InputError(f"not a readable safetensors file ({exc})", path=file) from exc


def _add_safetensors(tensors: LazyTensors, files: dict[str, Path], rename) -> None:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    core_name = rename(name)
                    if core_name is None:
                        continue
                    view = handle.get_slice(name)
                    tensors.add(core_name, view.get_shape(), view.get_dtype(), _tensor_reader(file, name))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"not a readable safetensors file ({exc})", path=file) from exc


def _tensor_reader(file: Path, name: str):
    def read():
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name)

    return read


def _llama_rename(tie: bool):
    compiled = [(re.compile(pattern + "$"), target) for pattern, target in _LLAMA_NAMES]

    def rename(name: str) -> str | None:
        for pattern, target in compiled:
            if pattern.match(name):
                core = pattern.sub(target, name)
                return None if tie and core == "output.weight" else core
        if name.endswith("rotary_emb.inv_freq"):
            return None  # derived from the config, not a weight
        return name  # kept so validation names the unexpected tensor

    return rename


@checkpoint_format("hf", detect=_is_hf_dir)
def open_hf(path: Path) -> Checkpoint:
    """Open a Hugging Face model directory (Llama decoder or BERT encoder)."""
    config_path = path / "config.json"
    raw = read_json(config_path)
    model_type = raw.get("model_type")
    if model_type == "llama":
        architecture, config = "llama", llama_config_from_hf(raw, config_path)
        rename = _llama_rename(config.tie_embeddings)
    elif model_type == "bert":
        from edgeforge.models.encoder import BertConfig, hf_bert_name

        architecture, config, rename = "bert", BertConfig.from_hf(raw, config_path), hf_bert_name
    elif model_type is None:
        raise InputError("missing config key 'model_type'", path=config_path)
    else:
        raise UnsupportedError(f"unknown architecture model_type={model_type!r} (supported: llama, bert)",
                               path=config_path)
    files = safetensors_files(path)
    tensors = LazyTensors(path)
    _add_safetensors(tensors, files, rename)
    tokenizer = find_tokenizer(path, vocab_size=config.vocab_size)
    extra = [p for p in (path / "tokenizer.json", path / "tokenizer.model") if p.exists()]
    return Checkpoint(path=path, format="hf", architecture=architecture, config=config, tensors=tensors,
                      tokenizer=tokenizer, files=[config_path, *sorted(set(files.values())), *extra],
                      metadata={"model_type": model_type})
