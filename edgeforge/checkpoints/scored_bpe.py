"""Scored BPE vocabularies: pieces and scores with no model file (llama2.c ``tok*.bin``, GGUF "llama" vocabularies),
encoded as SentencePiece's BPE encodes them. Found beside checkpoints by :func:`~.tokenizers.find_tokenizer`."""

from __future__ import annotations

import heapq
import struct
from pathlib import Path

from edgeforge.errors import InputError
from edgeforge.fileio import read_bytes


class ScoredBPETokenizer:
    """SentencePiece-style BPE from pieces and scores: repeatedly merge the adjacent pair whose
    concatenation is a piece with the highest score (leftmost on ties), falling back to byte
    pieces ``<0xXX>`` for characters not in the vocabulary. This is llama2.c's ``run.c`` encoder
    and llama.cpp's SPM tokenizer; a heap keeps it O(n log n) instead of run.c's O(n^2).
    """

    def __init__(self, pieces: list[str], scores: list[float], *, bos_id: int | None, eos_id: int | None,
                 space: str = " ", control_ids: set[int] | None = None, add_bos: bool = True,
                 eos_ids: tuple[int, ...] = (), kind: str = "scored-bpe", source: Path | None = None,
                 files: list[Path] | None = None):
        self.kind, self.source, self.files = kind, source, [source] if files is None and source else list(files or [])
        self.pieces, self.scores, self.space = pieces, scores, space
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos and bos_id is not None
        self.eos_ids = tuple(dict.fromkeys(([eos_id] if eos_id is not None else []) + list(eos_ids)))
        self._ids = {piece: i for i, piece in reversed(list(enumerate(pieces)))}  # first id wins
        self._byte_ids = {b: self._ids[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in self._ids}
        self._byte_of = {i: b for b, i in self._byte_ids.items()}
        self._control = set(control_ids or ()) | {i for i in (bos_id, eos_id) if i is not None}

    @classmethod
    def from_llama2c(cls, path: Path, vocab_size: int) -> "ScoredBPETokenizer":
        """Read a llama2.c ``tok*.bin``: int32 max_len, then per token float32 score, int32 n, n bytes."""
        data = read_bytes(path)
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

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_id] if add_special_tokens and self.add_bos else []
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
