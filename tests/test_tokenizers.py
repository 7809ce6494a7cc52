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
