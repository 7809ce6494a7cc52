"""Tokenizers behind one small interface: HF tokenizer.json, SentencePiece .model, tiktoken BPE files
(Meta's Llama 3 ``tokenizer.model``), and scored BPE vocabularies (llama2.c tok*.bin, GGUF "llama" vocab)
that have pieces and scores but no model file.

``encode(text)`` adds BOS/EOS exactly as the tokenizer defines them, which is what transformers'
``AutoTokenizer(...)(text)["input_ids"]`` gives for the same files: a tokenizer.json's post-processor
(transformers 5 loads a tokenizer.json without applying tokenizer_config.json's ``add_bos_token``, so
neither do we); BOS first for SentencePiece and llama2.c vocabularies and for Meta's tiktoken files;
for GGUF vocabularies ``tokenizer.ggml.add_bos_token``, else llama.cpp's default for the vocabulary.
``encode(text, add_special_tokens=False)`` gives the text's ids alone.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgeforge.checkpoints.scored_bpe import ScoredBPETokenizer
from edgeforge.errors import InputError
from edgeforge.fileio import read_bytes


GENERATION_CONFIG = "generation_config.json"  # Hugging Face: where several end-of-sequence ids are listed
# Llama 3's split (its tokenizer.json, Meta's tokenizer.py, llama.cpp's "llama-bpe"); Split + ByteLevel reproduce it
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's llama3 tokenizer.py: 256 special tokens after the BPE ranks (128000 ranks: <|begin_of_text|> is 128000)
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                         "<|image|>"]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL_TOKENS))]
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # Meta's stop_tokens


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eos_ids: tuple[int, ...]  # every id that ends generation
    add_bos: bool  # whether encode(text) puts BOS first

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A ``tokenizers.Tokenizer``: a Hugging Face ``tokenizer.json``, or one built from a GGUF vocabulary or
    tiktoken ranks (``files`` is empty then: nothing on disk is this tokenizer by itself).

    BOS/EOS come from the tokenizer's post-processor. Padding and truncation stored in the file are
    dropped: ``encode`` returns a text's own ids and ``encode_batch`` pads and truncates per call.
    """

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, source: Path | None = None, eos_ids: tuple[int, ...] = (),
                 kind: str = "hf-tokenizer.json", files: list[Path] | None = None):
        self._tok, self.kind, self.source = tokenizer, kind, source
        self.files = [source] if files is None and source is not None else list(files or [])
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        # generation stops at any of these (Llama 3 instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>)
        self.eos_ids = tuple(dict.fromkeys(([self.eos_id] if self.eos_id is not None else []) + list(eos_ids)))
        padding = tokenizer.padding  # the file's padding settings, if any, name the pad id
        self.pad_id = padding["pad_id"] if padding else (tokenizer.token_to_id(pad_token) if pad_token else None)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        probe = tokenizer.encode("a", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and probe[:1] == [self.bos_id] != \
            tokenizer.encode("a", add_special_tokens=False).ids[:1]

    @classmethod
    def from_dir(cls, directory: Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as FastTokenizer

        path = directory / "tokenizer.json"
        try:
            tok = FastTokenizer.from_file(str(path))
        except Exception as exc:
            raise InputError(f"cannot read tokenizer: {exc}", path=path) from exc
        special = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.exists():
            try:
                special = json.loads(config_path.read_text())
            except (ValueError, OSError) as exc:
                raise InputError(f"cannot read tokenizer config: {exc}", path=config_path) from exc
        bos, eos = _token_text(special.get("bos_token")), _token_text(special.get("eos_token"))
        files = [path, *(directory / name for name in ("tokenizer_config.json", "special_tokens_map.json",
                                                       "vocab.txt", GENERATION_CONFIG) if (directory / name).exists())]
        return cls(tok, bos_token=bos, eos_token=eos, pad_token=_token_text(special.get("pad_token")), source=path,
                   eos_ids=_generation_eos_ids(directory / GENERATION_CONFIG), files=files)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: Path) -> list[str]:
        """Write tokenizer.json (post-processor included), tokenizer_config.json (special tokens by name,
        whether encode adds BOS) and generation_config.json (the end ids): what from_dir reads back as this
        tokenizer, and what onnxruntime-genai reads. Returns the names written."""
        self._tok.save(str(directory / "tokenizer.json"))
        names = {key: None if token_id is None else self._tok.id_to_token(token_id)
                 for key, token_id in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))}
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **{f"{key}_token": name for key, name in names.items()},
             "add_bos_token": self.add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False},
            indent=2) + "\n")
        (directory / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": list(self.eos_ids)}) + "\n")
        return ["tokenizer.json", "tokenizer_config.json", GENERATION_CONFIG]

    def encode_batch(self, texts: list[str], max_length: int):
        """Encoder inputs (input_ids, attention_mask, token_type_ids), int64 [len(texts), longest]: special
        tokens from the post-processor, each text truncated to ``max_length`` tokens, padded on the right."""
        import torch

        # Padded positions are masked out, so any id will do when the tokenizer names no pad token.
        self._tok.enable_padding(pad_id=0 if self.pad_id is None else self.pad_id)
        self._tok.enable_truncation(max_length)
        try:
            encodings = self._tok.encode_batch(list(texts))
        finally:
            self._tok.no_padding()
            self._tok.no_truncation()
        return tuple(torch.tensor([getattr(e, field) for e in encodings], dtype=torch.int64)
                     for field in ("ids", "attention_mask", "type_ids"))


def bos_template(tokenizer, bos: str | None):
    """A TemplateProcessing post-processor putting ``bos`` first (nothing when it is None)."""
    from tokenizers import processors

    if bos is None:
        return processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                         special_tokens=[(bos, tokenizer.token_to_id(bos))])


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


def is_tiktoken_file(path: Path) -> bool:
    """Whether ``path`` is a tiktoken BPE file (lines "<base64 token> <rank>") rather than a SentencePiece model."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(512).split()
    except OSError:
        return False
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def tiktoken_tokenizer(path: Path) -> HFTokenizer:
    """Meta's Llama 3 ``tokenizer.model`` (tiktoken ranks) with Llama 3's split and special tokens, as a
    ``tokenizers`` BPE built the way transformers' TikTokenConverter builds it: the same library as every
    other byte-level tokenizer here, and savable as the tokenizer.json onnxruntime-genai reads."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer

    ranks = _read_tiktoken_ranks(path)
    byte_chars = _byte_level_alphabet()

    def spell(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    merges = []
    for token, rank in ranks.items():  # each token's merge: the split whose halves are ranks, lowest ranks first
        splits = [(ranks[token[:cut]], ranks[token[cut:]], cut) for cut in range(1, len(token))
                  if token[:cut] in ranks and token[cut:] in ranks]
        merges += [(rank, left, right, token[:cut], token[cut:]) for left, right, cut in sorted(splits)]
    merges.sort()
    tok = FastTokenizer(models.BPE({spell(t): r for t, r in ranks.items()},
                                   [(spell(left), spell(right)) for *_, left, right in merges],
                                   fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    base = len(ranks)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    if [tok.token_to_id(t) for t in LLAMA3_SPECIAL_TOKENS[:2]] != [base, base + 1]:
        raise InputError(f"tiktoken ranks are not 0..{base - 1}: the special tokens would not get Meta's ids",
                         path=path)
    tok.post_processor = bos_template(tok, "<|begin_of_text|>")  # Meta's encode(bos=True)
    return HFTokenizer(tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", source=path,
                       eos_ids=tuple(tok.token_to_id(t) for t in LLAMA3_STOP_TOKENS), kind="tiktoken")


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(read_bytes(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise InputError(f"line {number} is not '<base64 token> <rank>' ({exc})", path=path) from exc
    return ranks


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenizers spell bytes with)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file; ``encode`` puts BOS first (Llama 2's and llama2.c's convention)."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece

        self.source, self.files = path, [path]
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError with C++ text
            raise InputError(f"not a SentencePiece model ({str(exc).splitlines()[0]})", path=path) from exc
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = _valid_id(self._sp.bos_id())
        self.eos_id = _valid_id(self._sp.eos_id())
        self.eos_ids = () if self.eos_id is None else (self.eos_id,)
        self.add_bos = self.bos_id is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_special_tokens and self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(list(ids))


def _valid_id(value: int) -> int | None:
    return value if value >= 0 else None


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    """The ``eos_token_id`` (an int or a list) of a Hugging Face generation_config.json, if there is one."""
    if not path.exists():
        return ()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, OSError, AttributeError) as exc:
        raise InputError(f"cannot read generation config: {exc}", path=path) from exc
    ids = value if isinstance(value, list) else [value] if value is not None else []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"eos_token_id must be an integer or a list of integers, got {value!r}", path=path)
    return tuple(ids)


def tokenizer_files(tokenizer) -> list[Path]:
    """The files that are the tokenizer (copied beside quantized checkpoints and artifacts): a tokenizer.json
    with the configs that travel with it, a .model, a tok*.bin; none for a vocabulary read from a GGUF."""
    return [Path(f) for f in getattr(tokenizer, "files", []) if Path(f).is_file()]


def save_tokenizer(tokenizer, directory: Path) -> list[str]:
    """Put the tokenizer in ``directory`` (a quantized checkpoint) so that find_tokenizer reads it back with the
    same ids and BOS/EOS policy: its files copied, or a byte-level vocabulary read from a GGUF saved as a
    tokenizer.json. A GGUF SentencePiece vocabulary has no such form here yet: nothing is written. Returns
    the names written."""
    import shutil

    files = tokenizer_files(tokenizer)
    for file in files:
        shutil.copyfile(file, directory / file.name)
    if files or not isinstance(tokenizer, HFTokenizer):
        return [file.name for file in files]
    return tokenizer.save(directory)


def end_of_sequence_ids(tokenizer) -> list[int]:
    """Every id that ends generation (empty without a tokenizer)."""
    return list(getattr(tokenizer, "eos_ids", ()))


@dataclass(frozen=True)
class TokenizerPolicy:
    """What records say of a tokenizer: its kind, whether encode adds BOS (and which), which ids end generation."""

    kind: str
    adds_bos: bool
    bos_id: int | None
    eos_ids: list[int]


def tokenizer_policy(tokenizer) -> TokenizerPolicy | None:
    """The policy quantized checkpoints and artifacts record (None without a tokenizer)."""
    if tokenizer is None:
        return None
    return TokenizerPolicy(kind=tokenizer.kind, adds_bos=tokenizer.add_bos, bos_id=tokenizer.bos_id,
                           eos_ids=end_of_sequence_ids(tokenizer))


TOKENIZER_FILES = "tokenizer.json, tokenizer.model, tok*.model or tok*.bin"  # what find_tokenizer looks for


def find_tokenizer(directory: Path, *, vocab_size: int | None = None):
    """The tokenizer stored beside a checkpoint, or None: tokenizer.json, then tokenizer.model / tok*.model
    (tiktoken or SentencePiece, told apart by content), then llama2.c tokenizer.bin / tok{vocab}.bin."""
    if (directory / "tokenizer.json").exists():
        return HFTokenizer.from_dir(directory)
    models = sorted(directory.glob("tokenizer.model")) + sorted(directory.glob("tok*.model"))
    if models:
        return tiktoken_tokenizer(models[0]) if is_tiktoken_file(models[0]) else SentencePieceTokenizer(models[0])
    bins = sorted(directory.glob("tokenizer.bin")) + sorted(directory.glob(f"tok{vocab_size}.bin"))
    if bins and vocab_size:
        return ScoredBPETokenizer.from_llama2c(bins[0], vocab_size)
    return None
