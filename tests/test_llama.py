"""The model core against transformers, across checkpoint formats, and through the KV cache."""

import pytest
import torch

from edgeforge.checkpoints import load_model, open_checkpoint
from edgeforge.generate import generate
from edgeforge.models.llama import LlamaConfig, RopeScaling
from tests.conftest import STORIES
from tests.writers import core_state, random_llama, write_hf, write_llama2c, write_meta

GQA_TIED = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, hidden_dim=96,
                       max_seq_len=128, tie_embeddings=True, norm_eps=1e-5)
GQA_UNTIED = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=80, hidden_dim=160,
                         max_seq_len=128)  # llama2.c files fix theta 10000 and eps 1e-5
LLAMA3_SCALED = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=64, hidden_dim=128,
                            max_seq_len=256, rope_theta=500000.0,
                            rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=32))
CONFIGS = {"gqa-tied": GQA_TIED, "gqa-untied": GQA_UNTIED, "llama3-rope-scaling": LLAMA3_SCALED}


def _tokens(config, length=40, seed=1):
    return torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_checkpoint_matches_transformers(tmp_path, name):
    import transformers

    from tests.writers import hf_config

    config = CONFIGS[name]
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(config))).eval()
    with torch.no_grad():
        for param in reference.parameters():  # default init leaves norms at 1 and logits near uniform
            param.normal_(1.0 if param.ndim == 1 else 0.0, 0.1 if param.ndim == 1 else 0.08)
    reference.save_pretrained(tmp_path / "hf")
    model = load_model(open_checkpoint(tmp_path / "hf"))
    tokens = _tokens(config, length=200 if config.rope_scaling else 40)
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = model(tokens)
    assert (actual - expected).abs().max() < 1e-4, f"max |diff| {(actual - expected).abs().max():.2e}"
    assert expected.std() > 0.1, "reference logits are too flat to prove anything"


@pytest.mark.parametrize("name", ["gqa-tied", "gqa-untied"])
def test_same_weights_in_every_format_give_identical_logits(tmp_path, name):
    config = CONFIGS[name]
    original = random_llama(config)
    state = core_state(original)
    paths = {
        "hf": write_hf(tmp_path / "hf", config, state),
        "hf-sharded": write_hf(tmp_path / "hf3", config, state, shards=3),
        "meta": write_meta(tmp_path / "meta", config, state),
        "meta-2-shards": write_meta(tmp_path / "meta2", config, state, shards=2),
        "llama2c": write_llama2c(tmp_path / "model.bin", config, state),
    }
    try:
        from tests.writers import write_gguf

        paths["gguf"] = write_gguf(tmp_path / "model.gguf", config, state)
    except ImportError:
        pass
    tokens = _tokens(config)
    with torch.no_grad():
        expected = original(tokens)
        for fmt, path in paths.items():
            checkpoint = open_checkpoint(path)
            assert checkpoint.format == fmt.split("-")[0]
            actual = load_model(checkpoint)(tokens)
            assert torch.equal(actual, expected), f"{fmt}: max |diff| {(actual - expected).abs().max():.2e}"


def test_bf16_sharded_hf_loads_to_the_rounded_weights(tmp_path):
    config = GQA_UNTIED
    state = core_state(random_llama(config))
    rounded = random_llama(config)
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in state.items()})
    checkpoint = open_checkpoint(write_hf(tmp_path / "hf", config, state, dtype=torch.bfloat16, shards=2))
    assert checkpoint.dtype_counts() == {"BF16": checkpoint.parameter_count}
    tokens = _tokens(config)
    with torch.no_grad():
        assert torch.equal(load_model(checkpoint)(tokens), rounded(tokens))


def _greedy_reference() -> list[int]:
    lines = (STORIES / "greedy_reference.txt").read_text().splitlines()
    return [int(token) for token in lines[2].split()]


@pytest.mark.parametrize("path", ["stories260K.bin", "hf"])
def test_stories260k_greedy_decoding_reproduces_reference(path):
    reference = _greedy_reference()
    model = load_model(open_checkpoint(STORIES / path))
    new_tokens = generate(model, reference[:1], max_new_tokens=len(reference) - 1)
    assert new_tokens == reference[1:]


@pytest.mark.parametrize("name", ["gqa-tied", "llama3-rope-scaling"])
def test_prefill_then_decode_equals_full_forward(name):
    config = CONFIGS[name]
    model = random_llama(config)
    tokens = _tokens(config, length=64)[:1]
    model.setup_cache(1, 96)
    with torch.no_grad():
        full = model(tokens)
        prefill = model(tokens[:, :23], torch.arange(23))
        steps = [model(tokens[:, p:p + 1], torch.tensor([p])) for p in range(23, 64)]
    incremental = torch.cat([prefill, *steps], dim=1)
    diff = (incremental - full).abs().amax(dim=-1)[0]
    assert diff.max() < 1e-5, f"worst position {int(diff.argmax())}: {diff.max():.2e}"


def test_cache_is_reusable_for_a_new_sequence():
    model = random_llama(GQA_TIED)
    model.setup_cache(1, 64)
    first, second = _tokens(GQA_TIED, 30, seed=2)[:1], _tokens(GQA_TIED, 20, seed=3)[:1]
    with torch.no_grad():
        model(first, torch.arange(30))
        reused = model(second, torch.arange(20))
        assert torch.allclose(reused, model(second), atol=1e-5)
