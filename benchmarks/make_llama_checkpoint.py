"""Write a random bf16 Hugging Face Llama checkpoint of a real model's shape, for memory and speed benchmarks.

Tensors are generated one shard at a time (randn * 0.02 in bf16; norm weights near 1), so the
whole model is never held in memory, let alone in fp32. Output: config.json (transformers style),
model-0000k-of-0000n.safetensors shards of about --shard-mb MB, model.safetensors.index.json, and a
byte-level BPE tokenizer.json + tokenizer_config.json trained on a text file (the quantizer's
calibration needs a tokenizer). The weights are noise: use it for time/memory, never for accuracy.

    python benchmarks/make_llama_checkpoint.py benchmarks/checkpoints/llama-3.2-1b-random
    python benchmarks/make_llama_checkpoint.py --preset 135m benchmarks/checkpoints/smol-135m-random
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = SHARED / "data" / "tinystories-valid" / "tinystories_valid_head.txt"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

PRESETS = {
    "1b": {  # Llama-3.2-1B
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}},
    "135m": {  # SmolLM-135M shape
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "rope_scaling": None},
}
BF16_BYTES = 2


def hf_config(shape: dict, *, bos_id: int, eos_id: int) -> dict:
    """A transformers-style LlamaForCausalLM config.json."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "hidden_act": "silu", "head_dim": head_dim,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "torch_dtype": "bfloat16",
            "bos_token_id": bos_id, "eos_token_id": eos_id, **shape}


def tensor_plan(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF tensor name, shape) in the order transformers writes them."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    q_out, kv_out = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    plan = [("model.embed_tokens.weight", (shape["vocab_size"], hidden))]
    for i in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        plan += [(f"{prefix}.input_layernorm.weight", (hidden,)),
                 (f"{prefix}.self_attn.q_proj.weight", (q_out, hidden)),
                 (f"{prefix}.self_attn.k_proj.weight", (kv_out, hidden)),
                 (f"{prefix}.self_attn.v_proj.weight", (kv_out, hidden)),
                 (f"{prefix}.self_attn.o_proj.weight", (hidden, q_out)),
                 (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
                 (f"{prefix}.mlp.gate_proj.weight", (inter, hidden)),
                 (f"{prefix}.mlp.up_proj.weight", (inter, hidden)),
                 (f"{prefix}.mlp.down_proj.weight", (hidden, inter))]
    plan.append(("model.norm.weight", (hidden,)))
    if not shape["tie_word_embeddings"]:
        plan.append(("lm_head.weight", (shape["vocab_size"], hidden)))
    return plan


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def shard_plan(plan, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split into shards of at most ``shard_bytes`` (a single larger tensor gets its own shard)."""
    shards, current, size = [], [], 0
    for name, dims in plan:
        nbytes = _numel(dims) * BF16_BYTES
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dims))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_weights(directory: Path, shape: dict, *, seed: int, shard_bytes: int, log) -> int:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shards = shard_plan(tensor_plan(shape), shard_bytes)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, dims in shard:
            values = torch.randn(dims, generator=generator, dtype=torch.bfloat16)
            if len(dims) == 1:  # RMSNorm weights: near 1
                tensors[name] = values.mul_(0.02).add_(1.0)
            else:
                tensors[name] = values.mul_(0.02)
            weight_map[name] = filename
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        shard_size = sum(t.numel() * BF16_BYTES for t in tensors.values())
        total += shard_size
        log(f"wrote {filename}: {len(tensors)} tensors, {shard_size / 1e9:.2f} GB")
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    return total


def write_tokenizer(directory: Path, text_path: Path, vocab_size: int) -> tuple[int, int]:
    """Train a byte-level BPE on ``text_path``; returns the BOS and EOS ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(text_path)], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "model_max_length": 131072}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="directory to create")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b", help="model shape (default: 1b)")
    parser.add_argument("--layers", type=int, help="override the number of decoder blocks (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=int, default=1000, help="shard size in MB (default: 1000)")
    parser.add_argument("--tokenizer-text", type=Path, default=TINYSTORIES, help="text to train the tokenizer on")
    parser.add_argument("--tokenizer-vocab", type=int, default=8000, help="BPE vocabulary size (default: 8000)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = dict(PRESETS[args.preset])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    if args.tokenizer_vocab > shape["vocab_size"]:
        sys.exit(f"error: --tokenizer-vocab {args.tokenizer_vocab} exceeds the model vocabulary {shape['vocab_size']}")
    if not args.tokenizer_text.is_file():
        sys.exit(f"error: {args.tokenizer_text}: no such file (the tokenizer is trained on it)")
    if args.output.exists() and not args.force:
        sys.exit(f"error: {args.output}: already exists (use --force to replace it)")
    log = lambda message: print(message, file=sys.stderr, flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{args.output.name}.", dir=args.output.parent))
    try:  # written into a temp sibling, renamed into place when complete
        bos_id, eos_id = write_tokenizer(staging, args.tokenizer_text, args.tokenizer_vocab)
        config = hf_config(shape, bos_id=bos_id, eos_id=eos_id)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        total = write_weights(staging, shape, seed=args.seed, shard_bytes=args.shard_mb * 10**6, log=log)
        if args.output.exists():
            shutil.rmtree(args.output)
        staging.chmod(0o755)  # mkdtemp (and safetensors) make files private
        for file in staging.iterdir():
            file.chmod(0o644)
        staging.rename(args.output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    params = total // BF16_BYTES
    print(f"{args.output}: preset {args.preset}, {shape['num_hidden_layers']} layers, {params / 1e6:.1f} M parameters, "
          f"{total / 1e9:.3f} GB bf16, seed {args.seed}, tokenizer vocab {args.tokenizer_vocab}, "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
