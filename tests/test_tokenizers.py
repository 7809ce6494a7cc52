"""Tokenizers: llama2.c tok.bin encoder against SentencePiece, BOS handling, decoding."""

import pytest

from edgeforge.checkpoints.tokenizers import ScoredBPETokenizer, SentencePieceTokenizer
from edgeforge.errors import InputError
from tests.conftest import SHARED, STORIES


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    text = (SHARED / "data" / "tinystories-valid" / "tinystories_valid_head.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()][:200]


def test_llama2c_tokenizer_matches_sentencepiece(paragraphs):
    ours = ScoredBPETokenizer.from_llama2c(STORIES / "tok512.bin", 512)
    reference = SentencePieceTokenizer(STORIES / "tok512.model")
    samples = paragraphs + ["", "naïve café — ünïcødé 日本", "a line\nand a newline"]  # SentencePiece also collapses repeated spaces; run.c does not
    mismatches = [text for text in samples if ours.encode(text) != reference.encode(text)]
    assert not mismatches, f"{len(mismatches)} of {len(samples)} differ, first: {mismatches[0]!r}"
    for text in paragraphs[:50]:
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text)) == text


def test_bos_is_prepended_only_when_asked():
    tok = ScoredBPETokenizer.from_llama2c(STORIES / "tok512.bin", 512)
    assert tok.encode("Once upon a time")[0] == tok.bos_id == 1
    assert tok.encode("Once upon a time", bos=False)[0] != 1
    assert tok.eos_id == 2


def test_truncated_llama2c_tokenizer_names_the_file(tmp_path):
    broken = tmp_path / "tok512.bin"
    broken.write_bytes((STORIES / "tok512.bin").read_bytes()[:3000])
    with pytest.raises(InputError, match=r"tok512\.bin: truncated llama2\.c tokenizer"):
        ScoredBPETokenizer.from_llama2c(broken, 512)


def _word_level_dir(directory, generation_config: str | None):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir()
    tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<eot>": 2, "a": 3, "<unk>": 4}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(generation_config)
    return directory


def test_several_end_of_sequence_ids_reach_the_pte_metadata_and_genai_config(tmp_path):
    """Llama 3 instruct stops at <|end_of_text|>, <|eom_id|> or <|eot_id|>: generation_config.json lists them."""
    import json
    from types import SimpleNamespace

    from edgeforge.checkpoints.tokenizers import HFTokenizer, tokenizer_files
    from edgeforge.export.executorch import runner_metadata
    from edgeforge.export.onnx import write_genai_files
    from edgeforge.models.llama import LlamaConfig

    directory = _word_level_dir(tmp_path / "tok", '{"eos_token_id": [2, 1]}')
    tokenizer = HFTokenizer.from_dir(directory)
    assert tokenizer.eos_id == 1 and tokenizer.eos_ids == (1, 2)
    assert [f.name for f in tokenizer_files(tokenizer)] == ["tokenizer.json", "tokenizer_config.json",
                                                            "generation_config.json"]
    config = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=5, hidden_dim=64, max_seq_len=16)
    source = SimpleNamespace(config=config, tokenizer=tokenizer, tokenizer_files=tokenizer_files(tokenizer))
    assert runner_metadata(source, max_seq_len=16)["get_eos_ids"] == [1, 2]
    write_genai_files(source, tmp_path, max_seq_len=16)
    model = json.loads((tmp_path / "genai_config.json").read_text())["model"]
    assert model["eos_token_id"] == [1, 2] and model["pad_token_id"] == 1
    assert HFTokenizer.from_dir(_word_level_dir(tmp_path / "one", '{"eos_token_id": 1}')).eos_ids == (1,)


def test_a_malformed_generation_config_names_the_file(tmp_path):
    with pytest.raises(InputError, match=r"generation_config.json.*eos_token_id must be an integer or a list"):
        from edgeforge.checkpoints.tokenizers import HFTokenizer

        HFTokenizer.from_dir(_word_level_dir(tmp_path / "tok", '{"eos_token_id": "</s>"}'))
