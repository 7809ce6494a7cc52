"""Tokenizers: llama2.c tok.bin encoder against SentencePiece, BOS/EOS as each format defines them (HF
directories against transformers), tiktoken files against the tiktoken library, decoding."""

import base64
import contextlib
import io
import json

import pytest

from edgeforge.checkpoints.scored_bpe import ScoredBPETokenizer
from edgeforge.checkpoints.tokenizers import (LLAMA3_SPECIAL_TOKENS, LLAMA3_SPLIT, HFTokenizer, SentencePieceTokenizer,
                                              TokenizerPolicy, find_tokenizer, is_tiktoken_file)
from edgeforge.errors import InputError
from tests.conftest import SHARED, STORIES

TEXTS = ["Once upon a time, there was a girl.", "naïve café — ünïcødé 日本 🙂", "digits 12345 and 3.14",
         "a line\nand\n\na newline", "  two  spaces ", "def f(x):\n\treturn x**2", "it's I'LL we'Re", ""]


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


@pytest.mark.parametrize("tokenizer", [ScoredBPETokenizer.from_llama2c(STORIES / "tok512.bin", 512),
                                       SentencePieceTokenizer(STORIES / "tok512.model")], ids=["tok.bin", "model"])
def test_sentencepiece_and_llama2c_vocabularies_put_bos_first(tokenizer):
    plain = tokenizer.encode("Once upon a time", add_special_tokens=False)
    assert tokenizer.encode("Once upon a time") == [1, *plain] and plain[0] != 1
    assert (tokenizer.add_bos, tokenizer.bos_id, tokenizer.eos_ids) == (True, 1, (2,))


def test_truncated_llama2c_tokenizer_names_the_file(tmp_path):
    broken = tmp_path / "tok512.bin"
    broken.write_bytes((STORIES / "tok512.bin").read_bytes()[:3000])
    with pytest.raises(InputError, match=r"tok512\.bin: truncated llama2\.c tokenizer"):
        ScoredBPETokenizer.from_llama2c(broken, 512)


@pytest.fixture(scope="module")
def byte_level_bpe(paragraphs):
    """A byte-level BPE trained here, with Llama 3's split and special tokens at ids 0 and 1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(paragraphs, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer.to_str()


# (tokenizer.json post-processor, tokenizer_config.json flags): transformers 5 follows the post-processor alone
HF_POLICIES = {
    "template-bos (Llama 3)": ("template-bos", {}),
    "byte-level post-processor (SmolLM2)": ("byte-level", {}),
    "no post-processor, add_bos_token": (None, {"add_bos_token": True}),
    "no post-processor, no flags": (None, {}),
    "template-bos overridden by add_bos_token false": ("template-bos", {"add_bos_token": False}),
    "add_bos_token, add_eos_token": ("byte-level", {"add_bos_token": True, "add_eos_token": True}),
}


@pytest.mark.parametrize("policy", HF_POLICIES)
def test_hf_directory_encodes_as_transformers_does(tmp_path, byte_level_bpe, policy):
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    post, flags = HF_POLICIES[policy]
    tokenizer = Tokenizer.from_str(byte_level_bpe)
    tokenizer.post_processor = {
        "template-bos": processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
            ("<|begin_of_text|>", 0)]),
        "byte-level": processors.ByteLevel(trim_offsets=False), None: None}[post]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
         "eos_token": "<|end_of_text|>", **flags}))
    ours, reference = HFTokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|end_of_text|> in the text"]:
        assert ours.encode(text) == reference(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]
    assert ours.add_bos == (reference("a")["input_ids"][0] == 0)


def _tiktoken_ranks(paragraphs) -> dict[bytes, int]:
    from tiktoken._educational import bpe_train

    with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints every merge
        return bpe_train(" ".join(paragraphs)[:12000], 300, LLAMA3_SPLIT)


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory, paragraphs):
    """A Meta-style directory holding a tiktoken tokenizer.model of 300 ranks, and the ranks."""
    ranks = _tiktoken_ranks(paragraphs)
    directory = tmp_path_factory.mktemp("tiktoken")
    (directory / "tokenizer.model").write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank
                                                         for token, rank in sorted(ranks.items(), key=lambda r: r[1])))
    return directory, ranks


def test_tiktoken_file_encodes_as_the_tiktoken_library(tiktoken_dir, paragraphs):
    import tiktoken

    directory, ranks = tiktoken_dir
    base = len(ranks)
    reference = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks,
                                  special_tokens={token: base + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)})
    ours = find_tokenizer(directory)
    assert (ours.kind, ours.vocab_size, ours.bos_id, ours.add_bos) == ("tiktoken", base + 256, base, True)
    assert ours.eos_ids == (base + 1, base + 8, base + 9)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    for text in paragraphs[:100] + TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]:
        ids = reference.encode(text, allowed_special="all")
        assert ours.encode(text) == [base, *ids], text
        assert ours.decode(ids) == reference.decode([i for i in ids if i < base]), text  # specials skipped


def test_llama3_special_tokens_are_the_ones_executorch_reads_the_file_with():
    from pytorch_tokenizers.constants import LLAMA_SPECIAL_TOKENS

    assert LLAMA3_SPECIAL_TOKENS == LLAMA_SPECIAL_TOKENS and len(LLAMA3_SPECIAL_TOKENS) == 256


def test_tokenizer_model_is_told_apart_by_content(tiktoken_dir):
    directory, _ = tiktoken_dir
    assert is_tiktoken_file(directory / "tokenizer.model")
    assert not is_tiktoken_file(STORIES / "tok512.model") and not is_tiktoken_file(STORIES / "tok512.bin")
    assert find_tokenizer(STORIES).kind == "sentencepiece"


def test_tiktoken_file_with_a_bad_line_names_the_file_and_line(tmp_path, tiktoken_dir):
    directory, _ = tiktoken_dir
    broken = tmp_path / "tokenizer.model"
    broken.write_bytes((directory / "tokenizer.model").read_bytes() + b"not-base64! 300\n")
    with pytest.raises(InputError, match=r"tokenizer\.model: line 301 is not '<base64 token> <rank>'"):
        find_tokenizer(tmp_path)


def test_tiktoken_tokenizer_converts_to_the_tokenizer_json_genai_reads(tiktoken_dir, tmp_path, paragraphs):
    """tokenizers and onnxruntime-genai read the converted file as the ranks encode; genai's encode adds no BOS
    (for any tokenizer), so a genai caller prepends genai_config's bos_token_id where the manifest says adds_bos."""
    from tokenizers import Tokenizer

    from edgeforge.export import export
    from edgeforge.checkpoints.tokenizer_json import write_tokenizer_json
    from tests.test_llama import GQA_TIED
    from tests.writers import core_state, random_llama, write_hf

    ours = find_tokenizer(tiktoken_dir[0])
    artifact = export(write_hf(tmp_path / "hf", GQA_TIED, core_state(random_llama(GQA_TIED))), "onnx-cpu",
                      tmp_path / "onnx", max_seq_len=32, check=False)
    assert write_tokenizer_json(ours, artifact.path) is None
    texts = paragraphs[:100] + TEXTS
    fast = Tokenizer.from_file(str(artifact.path / "tokenizer.json"))
    assert [t for t in texts if fast.encode(t).ids != ours.encode(t)] == []
    config = json.loads((artifact.path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == \
        ("<|begin_of_text|>", "<|end_of_text|>", True)
    og = pytest.importorskip("onnxruntime_genai", reason="pip install onnxruntime-genai (needs onnxruntime>=1.31)")
    genai = og.Tokenizer(og.Model(str(artifact.path)))
    assert [t for t in texts if [*map(int, genai.encode(t))] != ours.encode(t, add_special_tokens=False)] == []


def test_meta_checkpoint_with_a_tiktoken_tokenizer_is_inspected_as_one(tiktoken_dir, tmp_path):
    from edgeforge.checkpoints import open_checkpoint
    from edgeforge.checkpoints.summary import format_summary, summarize
    from edgeforge.models.llama import LlamaConfig
    from tests.writers import core_state, random_llama, write_meta

    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=556, hidden_dim=64, max_seq_len=64)
    directory = write_meta(tmp_path / "meta", config, core_state(random_llama(config)))
    (directory / "tokenizer.model").write_bytes((tiktoken_dir[0] / "tokenizer.model").read_bytes())
    record = summarize(open_checkpoint(directory))
    assert record["tokenizer"]["kind"] == "tiktoken" and record["tokenizer"]["adds_bos"] is True
    assert "tiktoken (" in format_summary(record) and "bos 300 (added by encode), ends at 301, 308, 309" in \
        format_summary(record)


def _word_level_dir(directory, generation_config: str | None):
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
    from types import SimpleNamespace

    from edgeforge.checkpoints.tokenizers import tokenizer_files
    from edgeforge.export.executorch.exporter import runner_metadata
    from edgeforge.export.onnx.lower import write_genai_files
    from edgeforge.models.llama import LlamaConfig

    directory = _word_level_dir(tmp_path / "tok", '{"eos_token_id": [2, 1]}')
    tokenizer = HFTokenizer.from_dir(directory)
    assert tokenizer.eos_id == 1 and tokenizer.eos_ids == (1, 2)
    assert [f.name for f in tokenizer_files(tokenizer)] == ["tokenizer.json", "tokenizer_config.json",
                                                            "generation_config.json"]
    config = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=5, hidden_dim=64, max_seq_len=16)
    source = SimpleNamespace(config=config, tokenizer=tokenizer, tokenizer_files=tokenizer_files(tokenizer))
    assert runner_metadata(source, max_seq_len=16)["get_eos_ids"] == [1, 2]
    write_genai_files(source, tmp_path, model_type="llama", max_seq_len=16)
    model = json.loads((tmp_path / "genai_config.json").read_text())["model"]
    assert model["eos_token_id"] == [1, 2] and model["pad_token_id"] == 1
    assert HFTokenizer.from_dir(_word_level_dir(tmp_path / "one", '{"eos_token_id": 1}')).eos_ids == (1,)


def test_a_malformed_generation_config_names_the_file(tmp_path):
    with pytest.raises(InputError, match=r"generation_config.json.*eos_token_id must be an integer or a list"):
        HFTokenizer.from_dir(_word_level_dir(tmp_path / "tok", '{"eos_token_id": "</s>"}'))


def test_quantized_checkpoint_and_artifact_manifests_record_the_tokenizer_policy(tmp_path):
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT, open_checkpoint
    from edgeforge.export import export
    from edgeforge.quantize import load_recipe, quantize_checkpoint

    policy = TokenizerPolicy(kind="sentencepiece", adds_bos=True, bos_id=1, eos_ids=[2])
    result = quantize_checkpoint(open_checkpoint(DEFAULT_CHECKPOINT), load_recipe("int4-xnnpack"), calibration=None,
                                 output_dir=tmp_path / "int4")
    assert result.record.tokenizer == policy
    artifact = export(tmp_path / "int4", "onnx-cpu", tmp_path / "onnx", max_seq_len=32, check=False)
    assert artifact.record.tokenizer == policy
