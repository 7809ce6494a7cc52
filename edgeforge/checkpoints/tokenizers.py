"""Tokenizers behind one small interface: HF tokenizer.json, SentencePiece .model, and scored BPE
vocabularies (llama2.c tok*.bin, GGUF "llama" vocab) that have pieces and scores but no model file.

BOS/EOS follow the source format: HF tokenizers add what their post-processor defines,
SentencePiece and llama2.c put BOS first when asked.
"""

from __future__ import annotations

import heapq
import json
import struct
from pathlib import Path
from typing import Protocol

from edgeforge.errors import InputError


GENERATION_CONFIG = "generation_config.json"  # Hugging Face: where several end-of-sequence ids are listed


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, *, bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (fast tokenizers library).

    Padding and truncation stored in the file are dropped: ``encode`` returns a text's own ids and
    ``encode_batch`` pads and truncates per call.
    """

    kind = "hf-tokenizer.json"

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, add_bos: bool = True, source: Path | None = None,
                 extra_eos_ids: tuple[int, ...] = ()):
        self._tok = tokenizer
        self.source, self.add_bos = source, add_bos  # add_bos: whether encode(bos=True) adds BOS
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        # generation stops at any of these (Llama 3 instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>)
        self.eos_ids = tuple(dict.fromkeys(([self.eos_id] if self.eos_id is not None else []) + list(extra_eos_ids)))
        padding = tokenizer.padding  # the file's padding settings, if any, name the pad id
        self.pad_id = padding["pad_id"] if padding else (tokenizer.token_to_id(pad_token) if pad_token else None)
        tokenizer.no_padding()
        tokenizer.no_truncation()

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
        return cls(tok, bos_token=_token_text(special.get("bos_token")),
                   eos_token=_token_text(special.get("eos_token")),
                   pad_token=_token_text(special.get("pad_token")), source=path,
                   extra_eos_ids=_generation_eos_ids(directory / GENERATION_CONFIG))

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        bos = bos and self.add_bos
        ids = self._tok.encode(text, add_special_tokens=bos).ids
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

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


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece

        self.source = path
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError with C++ text
            raise InputError(f"not a SentencePiece model ({str(exc).splitlines()[0]})", path=path) from exc
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = _valid_id(self._sp.bos_id())
        self.eos_id = _valid_id(self._sp.eos_id())

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(list(ids))


def _valid_id(value: int) -> int | None:
    return value if value >= 0 else None


class ScoredBPETokenizer:
    """SentencePiece-style BPE from pieces and scores: repeatedly merge the adjacent pair whose
    concatenation is a piece with the highest score (leftmost on ties), falling back to byte
    pieces ``<0xXX>`` for characters not in the vocabulary. This is llama2.c's ``run.c`` encoder
    and llama.cpp's SPM tokenizer; a heap keeps it O(n log n) instead of run.c's O(n^2).
    """

    def __init__(self, pieces: list[str], scores: list[float], *, bos_id: int | None, eos_id: int | None,
                 space: str = " ", control_ids: set[int] | None = None, add_bos: bool = True,
                 kind: str = "scored-bpe", source: Path | None = None):
        self.kind, self.source, self.add_bos = kind, source, add_bos  # add_bos: whether encode(bos=True) adds BOS
        self.pieces, self.scores, self.space = pieces, scores, space
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id = bos_id, eos_id
        self._ids = {piece: i for i, piece in reversed(list(enumerate(pieces)))}  # first id wins
        self._byte_ids = {b: self._ids[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in self._ids}
        self._byte_of = {i: b for b, i in self._byte_ids.items()}
        self._control = set(control_ids or ()) | {i for i in (bos_id, eos_id) if i is not None}

    @classmethod
    def from_llama2c(cls, path: Path, vocab_size: int) -> "ScoredBPETokenizer":
        """Read a llama2.c ``tok*.bin``: int32 max_len, then per token float32 score, int32 n, n bytes."""
        data = _read_bytes(path)
        pieces, scores, offset = [], [], 4
        try:
            for _ in range(vocab_size):
                score, length = struct.unpack_from("<fi", data, offset)
                offset += 8
                if length < 0 or offset + length > len(data):
                    raise struct.error("record runs past the end of the file")
                pieces.append(data[offset:offset + length].decode("utf-8", errors="replace"))
                scores.append(score)
                offset += length
        except struct.error as exc:
            raise InputError(f"truncated llama2.c tokenizer: {len(pieces)} of {vocab_size} tokens read ({exc})",
                             path=path) from exc
        # llama2.c: 0 <unk>, 1 BOS, 2 EOS; pieces use a plain space where SentencePiece has U+2581.
        return cls(pieces, scores, bos_id=1, eos_id=2, control_ids={0}, kind="llama2c-tok.bin", source=path)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = [self.bos_id] if bos and self.add_bos and self.bos_id is not None else []
        if not text:
            return ids
        text = (" " + text).replace(" ", self.space)  # dummy-prefix space, as SentencePiece adds
        symbols: list[list[int]] = []
        for char in text:
            if char in self._ids:
                symbols.append([self._ids[char]])
            else:
                symbols.extend([self._byte_ids[b]] for b in char.encode("utf-8") if b in self._byte_ids)
        return ids + self._merge([s[0] for s in symbols])

    def _merge(self, tokens: list[int]) -> list[int]:
        count = len(tokens)
        prev, nxt = list(range(-1, count - 1)), list(range(1, count + 1))
        alive = [True] * count
        heap: list[tuple[float, int, int, int, int, int]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right < count:
                merged = self._ids.get(self.pieces[tokens[left]] + self.pieces[tokens[right]])
                if merged is not None:
                    heapq.heappush(heap, (-self.scores[merged], left, right, tokens[left], tokens[right], merged))

        for i in range(count - 1):
            push(i)
        while heap:
            _, left, right, left_token, right_token, merged = heapq.heappop(heap)
            if not (alive[left] and alive[right] and nxt[left] == right
                    and tokens[left] == left_token and tokens[right] == right_token):
                continue  # stale: a neighbour was merged since this pair was pushed
            tokens[left] = merged
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] < count:
                prev[nxt[right]] = left
            if prev[left] >= 0:
                push(prev[left])
            push(left)
        return [tokens[i] for i in range(count) if alive[i]]

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for position, token in enumerate(ids):
            if token in self._control or not 0 <= token < self.vocab_size:
                continue
            if token in self._byte_of:
                out.append(self._byte_of[token])
                continue
            piece = self.pieces[token].replace(self.space, " ")
            if not out and piece.startswith(" "):  # SentencePiece drops the dummy-prefix space
                piece = piece[1:]
            out.extend(piece.encode("utf-8"))
        return out.decode("utf-8", errors="replace")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=path) from exc


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
    """The tokenizer's own file, and beside a tokenizer.json the configs that travel with it."""
    source = getattr(tokenizer, "source", None)
    if source is None or not Path(source).is_file():
        return []
    source = Path(source)
    if source.name != "tokenizer.json":
        return [source]
    siblings = ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt", GENERATION_CONFIG)
    return [source, *(source.parent / name for name in siblings if (source.parent / name).exists())]


def end_of_sequence_ids(tokenizer) -> list[int]:
    """Every id that ends generation: a tokenizer's ``eos_ids`` if it has several, else its ``eos_id``."""
    ids = getattr(tokenizer, "eos_ids", None)
    if ids:
        return list(ids)
    eos_id = getattr(tokenizer, "eos_id", None)
    return [] if eos_id is None else [eos_id]


def find_tokenizer(directory: Path, *, vocab_size: int | None = None):
    """The tokenizer stored beside a checkpoint, or None: tokenizer.json, then *.model, then llama2.c tok*.bin."""
    if (directory / "tokenizer.json").exists():
        return HFTokenizer.from_dir(directory)
    models = sorted(directory.glob("tokenizer.model")) + sorted(directory.glob("tok*.model"))
    if models:
        return SentencePieceTokenizer(models[0])
    bins = sorted(directory.glob("tokenizer.bin")) + sorted(directory.glob(f"tok{vocab_size}.bin"))
    if bins and vocab_size:
        return ScoredBPETokenizer.from_llama2c(bins[0], vocab_size)
    return None
