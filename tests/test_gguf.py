"""GGUF: logits parity (F32), rounding (F16/BF16), exact dequantization (Q8_0/Q4_0/Q4_1), RoPE scaling,
the metadata vocabulary against SentencePiece and a trained byte-level BPE, and bad files."""

import json
from pathlib import Path

import gguf
import pytest
import torch

from edgeforge.checkpoints import load_model, open_checkpoint
from edgeforge.checkpoints.scored_bpe import ScoredBPETokenizer
from edgeforge.checkpoints.tokenizers import SentencePieceTokenizer
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


def test_gguf_spm_add_bos_token_false_is_respected(tmp_path, shared):
    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, hidden_dim=64, max_seq_len=64)
    vocab = {**_stories_vocab(shared), "add_bos": False}
    path = write_gguf(tmp_path / "model.gguf", config, core_state(random_llama(config)), tokenizer=vocab)
    tokenizer = open_checkpoint(path).tokenizer
    assert tokenizer.bos_id == 1 and tokenizer.encode("Once upon a time")[0] != 1


@pytest.fixture(scope="module")
def byte_level_vocab(paragraphs) -> dict:
    """A byte-level BPE trained on GPT-2-split text (so merges join digits and spaces), as GGUF metadata."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(_documents(paragraphs) + SPLIT_TEXTS * 20, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = json.loads(trained.to_str())["model"]["merges"]
    tokens = [trained.id_to_token(i) for i in range(trained.get_vocab_size())]
    return {"model": "gpt2", "tokens": tokens, "merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
            "token_types": [3 if token.startswith("<|") else 1 for token in tokens], "bos_id": 0, "eos_id": 1}


def _byte_level_gguf(tmp_path, vocab: dict, name: str = "model", **fields) -> Path:
    """A one-layer GGUF carrying ``vocab`` with the metadata ``fields`` (pre, add_bos) set."""
    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=len(vocab["tokens"]), hidden_dim=64, max_seq_len=64)
    return write_gguf(tmp_path / f"{name}.gguf", config, core_state(random_llama(config)),
                      tokenizer={**vocab, **fields})


def _documents(paragraphs: list[str]) -> list[str]:
    return paragraphs + ["\n\n".join(paragraphs[i:i + 3]) for i in range(0, len(paragraphs), 3)]  # "\n\n" splits differ


# text where the pre-tokenizers disagree: digits (ASCII and not), contractions, case, runs of spaces and newlines
SPLIT_TEXTS = ["naïve café — ünïcødé 日本 12345 ٣٤٥ ²", "a line\n\nand  spaces <|end_of_text|>",
               "I'LL it's WE'RE x1y22",
               "def f(x):\n\treturn x**2  # 1,000,000\r\n", "   lead", "CamelCaseWords and UPPERlower", "3.14159/2"]


def _reference(pre: str):
    """The tokenizer.json pre-tokenizer of the family each name comes from, taken from transformers where it
    keeps one (Llama 3, Qwen2, Tekken), else the family's own (GPT-2: ByteLevel; StarCoder/SmolLM2: digits first)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre in GGUF_PRE_TOKENIZER_SPLITS:
        split = pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if pre in ("smollm", "starcoder", "refact") else byte_level


@pytest.mark.parametrize("pre, adds_bos", [("llama-bpe", True), ("tekken", True), ("qwen2", False), ("dbrx", False),
                                           ("gpt-2", False), ("smollm", False), ("starcoder", False)])
def test_gguf_byte_level_bpe_splits_as_its_pre_tokenizer_name_says(tmp_path, paragraphs, byte_level_vocab, pre,
                                                                   adds_bos):
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(byte_level_vocab["tokens"])}
    merges = [tuple(m.split(" ")) for m in byte_level_vocab["merges"]]
    reference = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "tekken")))  # as their files
    reference.pre_tokenizer, reference.decoder = _reference(pre), decoders.ByteLevel()
    reference.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    ours = open_checkpoint(_byte_level_gguf(tmp_path, byte_level_vocab, pre=pre)).tokenizer
    assert (ours.kind, ours.bos_id, ours.add_bos, ours.eos_ids) == (f"gguf-gpt2 ({pre})", 0, adds_bos, (1,))
    for text in _documents(paragraphs) + SPLIT_TEXTS:
        ids = reference.encode(text).ids
        assert ours.encode(text) == [0] * adds_bos + ids, (pre, text)
        assert ours.decode(ids) == reference.decode(ids), text


def test_gguf_pre_tokenizers_tell_digit_splitting_apart(tmp_path, byte_level_vocab):
    """smollm splits every digit before GPT-2's regex, gpt-2 keeps " 12345" whole, llama-bpe cuts 3 by 3."""
    splits = {}
    for pre in ("smollm", "gpt-2", "llama-bpe"):
        tokenizer = open_checkpoint(_byte_level_gguf(tmp_path, byte_level_vocab, pre, pre=pre)).tokenizer
        splits[pre] = tokenizer._tok.pre_tokenizer.pre_tokenize_str("x 12345")
    assert [piece for piece, _ in splits["smollm"]] == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert [piece for piece, _ in splits["gpt-2"]] == ["x", "Ġ12345"]
    assert [piece for piece, _ in splits["llama-bpe"]] == ["x", "Ġ", "123", "45"]


def test_gguf_add_bos_token_overrides_the_pre_tokenizer_default(tmp_path, byte_level_vocab):
    tokenizer = open_checkpoint(_byte_level_gguf(tmp_path, byte_level_vocab, pre="llama-bpe", add_bos=False)).tokenizer
    assert tokenizer.add_bos is False and tokenizer.encode("Once upon a time")[0] != 0


def test_gguf_vocabulary_survives_quantization_as_a_tokenizer_json(tmp_path, paragraphs, byte_level_vocab):
    """The quantized checkpoint of a GGUF carries its vocabulary as a tokenizer.json: same ids, BOS and end ids."""
    from edgeforge.quantize import load_recipe, quantize_checkpoint

    checkpoint = open_checkpoint(_byte_level_gguf(tmp_path, byte_level_vocab, pre="llama-bpe"))
    quantize_checkpoint(checkpoint, load_recipe("int4-xnnpack"), calibration=None, output_dir=tmp_path / "int4")
    ours, back = checkpoint.tokenizer, open_checkpoint(tmp_path / "int4").tokenizer
    assert sorted(p.name for p in (tmp_path / "int4").glob("*.json") if "token" in p.name or "generation" in p.name) \
        == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert (back.add_bos, back.bos_id, back.eos_ids) == (ours.add_bos, ours.bos_id, ours.eos_ids) == (True, 0, (1,))
    assert [t for t in _documents(paragraphs) + SPLIT_TEXTS if back.encode(t) != ours.encode(t)] == []


def test_unknown_pre_tokenizer_is_refused_with_the_supported_names(tmp_path, byte_level_vocab):
    path = _byte_level_gguf(tmp_path, byte_level_vocab, pre="jais-2")
    with pytest.raises(UnsupportedError, match=r"model\.gguf: byte-level BPE pre-tokenizer 'jais-2' \(supported: "
                                               r"llama3, .*smollm, .*default\)") as info:
        open_checkpoint(path)
    assert "\n" not in str(info.value)


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


SMOLLM2 = Path(__file__).resolve().parents[1] / "benchmarks" / "work" / "smollm2"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (SMOLLM2 / "hf" / "greedy.json").exists():
        pytest.fail(f"{SMOLLM2} is not built: python ../shared/models/smollm2-135m/build.py {SMOLLM2}")
    return SMOLLM2


@pytest.mark.slow
def test_smollm2_gguf_and_hf_directory_encode_alike_and_generate_transformers_greedy_text(smollm2, shared):
    """The real SmolLM2-135M-Instruct: its GGUF ("smollm" pre-tokenizer, add_bos_token false) and the HF directory
    transformers made from it give the same ids on varied text, and `edgeforge generate` reproduces transformers'
    greedy continuations (24 tokens) from both."""
    from click.testing import CliRunner

    from edgeforge.cli import main

    gguf_file, hf_dir = smollm2 / "smollm2-135m-instruct.q4_1.gguf", smollm2 / "hf"
    from_gguf, from_hf = open_checkpoint(gguf_file).tokenizer, open_checkpoint(hf_dir).tokenizer
    wiki = (shared / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text()
    # ASCII digits only: transformers' GGUF conversion drops SmolLM2's digit split, which shows on other numerals
    texts = [p for p in wiki.split("\n \n")[:300] if p.strip()] + SPLIT_TEXTS[1:] + [
        "digits 0123456789 12 345 6789 3.14159 1,000,000", "<|im_start|>user\nHi<|im_end|>\n", "\t tabs\r\n"]
    assert [t[:60] for t in texts if from_gguf.encode(t) != from_hf.encode(t)] == []
    greedy = json.loads((hf_dir / "greedy.json").read_text())
    for path in (hf_dir, gguf_file):
        for prompt, expected in greedy.items():
            assert from_gguf.encode(prompt) == expected["prompt_ids"]  # no BOS: this tokenizer adds none
            result = CliRunner().invoke(main, ["generate", str(path), "--prompt", prompt, "-n", "24"])
            assert result.exit_code == 0, result.output + result.stderr
            assert result.stdout == prompt + expected["text"] + "\n", (path.name, prompt)
