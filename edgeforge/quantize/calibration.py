"""Calibration data: real text, tokenized with the model's own tokenizer into samples x seq_len tokens.

Sources: a text file (documents separated by blank lines), a ``.jsonl`` file with a ``text`` field
per line, or a folder of ``.txt`` files. Each document is encoded with BOS and the documents are
concatenated; the stream is cut into non-overlapping windows and ``samples`` of them are drawn
with ``seed``. The text's SHA-256 and a fingerprint of every document that reached a window go
into the manifest, so verify can refuse evaluation text that overlaps the calibration text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgeforge.errors import ConfigError, InputError

TOKENIZE_HEADROOM = 4  # tokenize at most this many times the tokens needed, not a whole corpus


@dataclass(frozen=True)
class CalibrationSet:
    tokens: torch.Tensor  # [samples, seq_len] int64
    source: str
    sha256: str
    available_tokens: int
    document_fingerprints: tuple[str, ...]

    @property
    def samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def describe(self) -> dict:
        """Manifest record (without the fingerprints, which go to their own file)."""
        return {"source": self.source, "sha256": self.sha256, "samples": self.samples, "seq_len": self.seq_len,
                "available_tokens": self.available_tokens, "documents": len(self.document_fingerprints)}


def document_fingerprint(text: str) -> str:
    """Whitespace-insensitive 64-bit hash of one document."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]


def read_documents(path: str | Path) -> tuple[list[str], str]:
    """(documents, SHA-256 of the source bytes) from a .txt file, a .jsonl file or a folder of .txt files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise InputError("folder holds no .txt files", path=path)
    elif path.is_file():
        files = [path]
    else:
        raise InputError("no such file or directory", path=path)
    digest, documents = hashlib.sha256(), []
    for file in files:
        try:
            raw = file.read_bytes()
            text = raw.decode("utf-8")
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror}", path=file) from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=file) from exc
        digest.update(raw)
        documents.extend(_jsonl_texts(file, text) if file.suffix == ".jsonl" else
                         [d.strip() for d in text.split("\n\n") if d.strip()])
    if not documents:
        raise InputError("calibration text is empty", path=path)
    return documents, digest.hexdigest()


def _jsonl_texts(file: Path, text: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InputError(f"line {number} is not JSON ({exc})", path=file) from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"line {number} has no string 'text' field", path=file)
        texts.append(record["text"])
    return texts


def build_calibration(path: str | Path, tokenizer, *, samples: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    """Draw ``samples`` windows of ``seq_len`` tokens from the text at ``path``, deterministically for ``seed``."""
    if samples <= 0 or seq_len <= 1:
        raise ConfigError(f"calibration needs samples >= 1 and seq_len >= 2, got {samples} x {seq_len}")
    documents, sha256, stream, owners, order = _drawn_windows(path, tokenizer, samples=samples, seq_len=seq_len,
                                                             seed=seed)
    chosen = sorted(order[:samples])
    tokens = torch.tensor([stream[w * seq_len:(w + 1) * seq_len] for w in chosen], dtype=torch.long)
    used = sorted({owners[i] for w in chosen for i in range(w * seq_len, (w + 1) * seq_len)})
    return CalibrationSet(tokens=tokens, source=str(path), sha256=sha256, available_tokens=len(stream),
                          document_fingerprints=tuple(document_fingerprint(documents[i]) for i in used))


def held_out_windows(path: str | Path, tokenizer, *, samples: int, seq_len: int, seed: int, count: int,
                     length: int) -> torch.Tensor:
    """``count`` windows [count, length] of the calibration text that :func:`build_calibration` with the same
    settings does not draw (the first ``length`` tokens of undrawn windows, in draw order): text to measure a
    quantized model on without touching the evaluation text or the calibration windows."""
    path = Path(path)
    _, _, stream, _, order = _drawn_windows(path, tokenizer, samples=samples, seq_len=seq_len, seed=seed)
    spare = order[samples:samples + count]
    if len(spare) < count:
        raise InputError(f"calibration text too short to hold out {count} windows of {seq_len} tokens beside the "
                         f"{samples} calibration samples", path=path)
    return torch.tensor([stream[w * seq_len:w * seq_len + length] for w in spare], dtype=torch.long)


def _drawn_windows(path, tokenizer, *, samples: int, seq_len: int, seed: int):
    """(documents, sha256, token stream, document index of every token, window indices in draw order)."""
    documents, sha256 = read_documents(path)
    needed = samples * seq_len
    stream: list[int] = []
    owners: list[int] = []  # document index of every token
    for index, document in enumerate(documents):
        ids = tokenizer.encode(document)  # BOS/EOS as the tokenizer adds them
        stream.extend(ids)
        owners.extend([index] * len(ids))
        if len(stream) >= TOKENIZE_HEADROOM * needed:
            break
    windows = len(stream) // seq_len
    if windows < samples:
        raise InputError(f"calibration text too short: {len(stream)} tokens make {windows} windows of {seq_len}, "
                         f"{samples} samples need {needed} tokens", path=path)
    generator = torch.Generator().manual_seed(seed)
    return documents, sha256, stream, owners, torch.randperm(windows, generator=generator).tolist()


def with_calibration(recipe, *, samples: int | None = None, seq_len: int | None = None, seed: int | None = None):
    """``recipe`` with the calibration settings given in place of its own (None keeps the recipe's)."""
    given = {"samples": samples, "seq_len": seq_len, "seed": seed}
    settings = replace(recipe.calibration, **{key: value for key, value in given.items() if value is not None})
    return replace(recipe, calibration=settings)


def check_calibration(checkpoint, recipe) -> None:
    """Pre-flight, before any text or weight is read: InputError when ``checkpoint`` has no tokenizer to
    encode calibration text, ConfigError when the recipe's calibration seq_len exceeds the model's context."""
    if checkpoint.tokenizer is None:
        raise InputError("no tokenizer: calibration text cannot be tokenized", path=checkpoint.path)
    seq_len, context = recipe.calibration.seq_len, checkpoint.config.max_seq_len
    if seq_len > context:
        raise ConfigError(f"calibration seq_len {seq_len} exceeds the model's context {context}: "
                          f"pass --seq-len {context} or less", path=checkpoint.path)


def calibration_for(checkpoint, recipe, text: str | Path) -> CalibrationSet:
    """The calibration set ``recipe`` asks for, drawn from ``text`` in ``checkpoint``'s tokens."""
    check_calibration(checkpoint, recipe)
    settings = recipe.calibration
    return build_calibration(text, checkpoint.tokenizer, samples=settings.samples, seq_len=settings.seq_len,
                             seed=settings.seed)
