"""GGUF: logits parity (F32), rounding (F16/BF16), exact dequantization (Q8_0/Q4_0/Q4_1), RoPE scaling,
the metadata vocabulary against SentencePiece and a trained byte-level BPE, and bad files."""

import gguf
import pytest
import torch

from edgeforge.checkpoints import load_model, open_checkpoint
from edgeforge.checkpoints.tokenizers import ScoredBPETokenizer, SentencePieceTokenizer
from edgeforge.errors import InputError, UnsupportedError
from edgeforge.models.llama import LlamaConfig, RopeScaling
from tests.writers import core_state, llama3_rope_factors, random_llama, write_gguf

# Every width is a multiple of 32 so Q8_0/Q4_0/Q4_1 blocks tile each row.
GQA_TIED = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96,
                       max_seq_len=128, tie_embeddings=True)
GQA_UNTIED = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=80, hidden_dim=160,
                         max_seq_len=128, norm_eps=1e-6, rope_theta=500000.0)
LLAMA3_SCALED = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=64, hidden_dim=128,
                            max_seq_len=256, rope_theta=500000.0,
                            rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=8192))


def _decode_logits(model, config, *, prefill=8, steps=32):
    """Logits of a prefill then ``steps`` single-token decode steps through the static KV cache."""
    tokens = torch.randint(0, config.vocab_size, (1, prefill + steps), generator=torch.Generator().manual_seed(1))
    model.setup_cache(1, prefill + steps)
    with torch.no_grad():
        logits = [model(tokens[:, :prefill], torch.arange(prefill))]
        for pos in range(prefill, prefill + steps):
            logits.append(model(tokens[:, pos:pos + 1], torch.tensor([pos])))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("config", [GQA_TIED, GQA_UNTIED], ids=["tied", "untied"])
def test_f32_gguf_gives_the_eager_logits(tmp_path, config):
    original = random_llama(config)
    checkpoint = open_checkpoint(write_gguf(tmp_path / "model.gguf", config, core_state(original)))
    assert checkpoint.format == "gguf" and checkpoint.config == config
    assert ("output.weight" in checkpoint.tensors) != config.tie_embeddings
    expected, actual = _decode_logits(original, config), _decode_logits(load_model(checkpoint), config)
    assert (actual - expected).abs().max() <= 1e-5, f"max |diff| {(actual - expected).abs().max():.2e}"
    assert expected.std() > 0.1, "reference logits are too flat to prove anything"


def test_gguf_is_detected_by_magic_without_the_suffix(tmp_path):
    state = core_state(random_llama(GQA_TIED))
    path = write_gguf(tmp_path / "model.gguf", GQA_TIED, state).rename(tmp_path / "weights")
    assert open_checkpoint(path).format == "gguf"


@pytest.mark.parametrize("tensor_type, dtype, logits_atol", [("F16", torch.float16, 1e-2),
                                                              ("BF16", torch.bfloat16, 5e-2)])
def test_half_precision_gguf_holds_the_rounded_weights(tmp_path, tensor_type, dtype, logits_atol):
    original = random_llama(GQA_UNTIED)
    state = core_state(original)
    checkpoint = open_checkpoint(write_gguf(tmp_path / "model.gguf", GQA_UNTIED, state, tensor_type=tensor_type))
    for name, weight in state.items():
        rounded = weight.to(dtype).float() if weight.ndim == 2 else weight
        assert checkpoint.tensors.entry(name).dtype == (tensor_type if weight.ndim == 2 else "F32"), name
        assert torch.equal(checkpoint.tensors[name], rounded), name
    expected, actual = _decode_logits(original, GQA_UNTIED), _decode_logits(load_model(checkpoint), GQA_UNTIED)
    assert (actual - expected).abs().max() <= logits_atol, f"max |diff| {(actual - expected).abs().max():.2e}"


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_dequantizes_exactly(tmp_path, tensor_type):
    state = core_state(random_llama(GQA_UNTIED))
    checkpoint = open_checkpoint(write_gguf(tmp_path / "model.gguf", GQA_UNTIED, state, tensor_type=tensor_type))
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for name, weight in state.items():
        if weight.ndim == 2:  # blocks lie along rows, so the q/k row permutation commutes with quantization
            expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), qtype), qtype))
        else:
            expected = weight
        assert torch.equal(checkpoint.tensors[name], expected), name
    matrices = sum(1 for weight in state.values() if weight.ndim == 2)
    assert checkpoint.metadata["tensor_types"] == {tensor_type: matrices, "F32": len(state) - matrices}
    assert checkpoint.metadata["file_type"] == f"MOSTLY_{tensor_type}"
    assert checkpoint.dtype_counts()[tensor_type] > 0
    load_model(checkpoint)  # shapes and names fit the model core


def test_llama3_rope_factors_become_rope_scaling(tmp_path):
    original = random_llama(LLAMA3_SCALED)
    factors = llama3_rope_factors(LLAMA3_SCALED)
    assert 1 < len(set(factors.tolist())) and factors.max() == 8.0, "the test needs factors in all three bands"
    checkpoint = open_checkpoint(write_gguf(tmp_path / "model.gguf", LLAMA3_SCALED, core_state(original)))
    assert checkpoint.config.rope_scaling == LLAMA3_SCALED.rope_scaling
    assert "rope_freqs.weight" not in checkpoint.tensors
    tokens = torch.randint(0, LLAMA3_SCALED.vocab_size, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (load_model(checkpoint)(tokens) - original(tokens)).abs().max() <= 1e-5


def test_rope_factors_that_are_not_llama3_scaling_are_refused(tmp_path):
    factors = torch.linspace(1.0, 3.0, GQA_TIED.head_dim // 2)
    path = write_gguf(tmp_path / "model.gguf", GQA_TIED, core_state(random_llama(GQA_TIED)), rope_freqs=factors)
    with pytest.raises(UnsupportedError, match=r"model\.gguf: rope_freqs\.weight holds per-frequency RoPE factors"):
        open_checkpoint(path)


def _stories_vocab(shared) -> dict:
    """tok512.bin as llama.cpp's converter would write tok512.model: U+2581 pieces and token types."""
    tok = ScoredBPETokenizer.from_llama2c(shared / "models" / "stories260K" / "tok512.bin", 512)
    types = [gguf.TokenType.UNKNOWN if i == 0 else gguf.TokenType.CONTROL if i in (1, 2)
             else gguf.TokenType.BYTE if piece.startswith("<0x") else gguf.TokenType.NORMAL
             for i, piece in enumerate(tok.pieces)]
    # llama2.c writes BOS/EOS as "\n<s>\n" and "\n</s>\n"; the .model (and a converted GGUF) says "<s>", "</s>".
    pieces = ["<unk>", "<s>", "</s>"] + [piece.replace(" ", "\u2581") for piece in tok.pieces[3:]]
    return {"model": "llama", "tokens": pieces,
            "scores": tok.scores, "token_types": [int(t) for t in types], "bos_id": 1, "eos_id": 2}


@pytest.fixture(scope="module")
def paragraphs(shared) -> list[str]:
    text = (shared / "data" / "tinystories-valid" / "tinystories_valid_head.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()][:50]


def test_gguf_spm_vocabulary_matches_sentencepiece(tmp_path, shared, paragraphs):
    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, hidden_dim=64, max_seq_len=64)
    path = write_gguf(tmp_path / "model.gguf", config, core_state(random_llama(config)),
                      tokenizer=_stories_vocab(shared))
    ours = open_checkpoint(path).tokenizer
    reference = SentencePieceTokenizer(shared / "models" / "stories260K" / "tok512.model")
    assert (ours.kind, ours.vocab_size, ours.bos_id, ours.eos_id) == ("gguf-llama", 512, 1, 2)
    assert ours.pieces == [reference._sp.IdToPiece(i) for i in range(512)]
    for text in paragraphs + ["", "naïve café — ünïcødé 日本", "a line\nand a newline"]:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids), text


def test_gguf_add_bos_token_false_is_respected(tmp_path, shared):
    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, hidden_dim=64, max_seq_len=64)
    vocab = {**_stories_vocab(shared), "add_bos": False}
    path = write_gguf(tmp_path / "model.gguf", config, core_state(random_llama(config)), tokenizer=vocab)
    tokenizer = open_checkpoint(path).tokenizer
    assert tokenizer.bos_id == 1 and tokenizer.encode("Once upon a time")[0] != 1


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt2"])
def test_gguf_byte_level_bpe_matches_the_trained_tokenizer(tmp_path, paragraphs, pre):
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgeforge.checkpoints.gguf import _LLAMA3_SPLIT

    reference = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))  # as in Llama 3's tokenizer.json
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]) if pre == "llama-bpe" else pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    documents = paragraphs + ["\n\n".join(paragraphs[i:i + 3]) for i in range(0, len(paragraphs), 3)]  # "\n\n" splits differ
    reference.train_from_iterator(documents, trainers.BpeTrainer(
        vocab_size=640, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model_json = json.loads(reference.to_str())["model"]
    tokens = [reference.id_to_token(i) for i in range(reference.get_vocab_size())]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]]
    vocab = {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges,
             "token_types": [3 if token in specials else 1 for token in tokens], "bos_id": 0, "eos_id": 1}
    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=len(tokens), hidden_dim=64, max_seq_len=64)
    path = write_gguf(tmp_path / "model.gguf", config, core_state(random_llama(config)), tokenizer=vocab)
    ours = open_checkpoint(path).tokenizer
    assert (ours.kind, ours.bos_id, ours.eos_id) == ("gguf-gpt2", 0, 1)
    for text in documents + ["naïve café — ünïcødé 日本 12345", "a line\n\nand  spaces <|end_of_text|>"]:
        ids = reference.encode(text).ids
        assert ours.encode(text) == [0, *ids], text
        assert ours.decode(ids) == reference.decode(ids), text


def test_unknown_tokenizer_model_is_refused(tmp_path):
    vocab = {"model": "t5", "tokens": [f"t{i}" for i in range(GQA_TIED.vocab_size)]}
    path = write_gguf(tmp_path / "model.gguf", GQA_TIED, core_state(random_llama(GQA_TIED)), tokenizer=vocab)
    with pytest.raises(UnsupportedError, match=r"model\.gguf: tokenizer model 't5'"):
        open_checkpoint(path)


def test_gguf_without_vocabulary_has_no_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", GQA_TIED, core_state(random_llama(GQA_TIED)))
    assert open_checkpoint(path).tokenizer is None


@pytest.mark.parametrize("keep_bytes", [20, 1000, -100], ids=["header", "metadata", "tensor-data"])
def test_truncated_gguf_is_a_one_line_input_error(tmp_path, keep_bytes):
    path = write_gguf(tmp_path / "model.gguf", GQA_TIED, core_state(random_llama(GQA_TIED)))
    path.write_bytes(path.read_bytes()[:keep_bytes])
    with pytest.raises(InputError, match=r"model\.gguf: not a readable GGUF file: truncated or corrupt") as info:
        open_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_file_without_gguf_magic_is_an_input_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(InputError, match=r"model\.gguf: not a GGUF file \(starts with b'PK\\x03\\x04'"):
        open_checkpoint(path)


def test_non_llama_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", GQA_TIED, core_state(random_llama(GQA_TIED)), architecture="gpt2")
    with pytest.raises(UnsupportedError, match=r"model\.gguf: GGUF architecture 'gpt2' \(only llama is read\)"):
        open_checkpoint(path)


def test_missing_metadata_key_is_named(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", GQA_TIED, core_state(random_llama(GQA_TIED)),
                      omit=("llama.block_count",))
    with pytest.raises(InputError, match=r"model\.gguf: missing metadata key 'llama\.block_count'"):
        open_checkpoint(path)
