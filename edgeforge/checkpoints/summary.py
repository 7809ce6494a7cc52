"""The record `edgeforge inspect` prints: what a checkpoint is, without loading its weights."""

from __future__ import annotations

from edgeforge.checkpoints.base import Checkpoint


def summarize(checkpoint: Checkpoint) -> dict:
    """Plain-JSON description: format, architecture, config, parameters, dtypes, size, tokenizer, quantization."""
    tokenizer = checkpoint.tokenizer
    return {
        "path": str(checkpoint.path),
        "format": checkpoint.format,
        "architecture": checkpoint.architecture,
        "config": checkpoint.config.to_dict(),
        "shape": checkpoint.config.shape_line(),
        "parameter_count": checkpoint.parameter_count,
        "tensor_count": len(checkpoint.tensors),
        "dtypes": checkpoint.dtype_counts(),
        "size_bytes": checkpoint.size_bytes,
        "files": [str(f) for f in checkpoint.files],
        "tokenizer": None if tokenizer is None else {
            "kind": tokenizer.kind, "path": str(tokenizer.source) if tokenizer.source else None,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "adds_bos": tokenizer.add_bos, "eos_ids": list(tokenizer.eos_ids)},
        "quantization": checkpoint.metadata.get("quantization"),
        "metadata": {k: v for k, v in checkpoint.metadata.items() if k != "quantization"},
    }


def format_summary(record: dict) -> str:
    """Human-readable table of a :func:`summarize` record."""
    total = record["parameter_count"]
    dtypes = ", ".join(f"{name} {count / total:.0%}" for name, count in
                       sorted(record["dtypes"].items(), key=lambda item: -item[1]))
    tok = record["tokenizer"]
    tokenizer = "none found" if tok is None else (
        f"{tok['kind']} ({tok['path']}), vocab {tok['vocab_size']}, bos {tok['bos_id']} "
        f"({'added' if tok['adds_bos'] else 'not added'} by encode), "
        f"ends at {', '.join(map(str, tok['eos_ids'])) or '-'}")
    quant = record["quantization"] or "none (full precision)"
    rows = [
        ("path", record["path"]),
        ("format", record["format"] + "".join(f", {k} {v}" for k, v in record["metadata"].items())),
        ("architecture", record["architecture"]),
        ("shape", record["shape"]),
        ("parameters", f"{total:,} ({_human(total)}) in {record['tensor_count']} tensors"),
        ("dtypes", dtypes),
        ("size on disk", f"{record['size_bytes']:,} bytes ({_human(record['size_bytes'], 1024)}B)"),
        ("tokenizer", tokenizer),
        ("quantization", quant if isinstance(quant, str) else ", ".join(f"{k} {v}" for k, v in quant.items())),
    ]
    return "\n".join(f"{key:<13} {value}" for key, value in rows)


def _human(count: float, base: int = 1000) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if count < base:
            return f"{count:.1f}{unit}" if unit else f"{count:g}"
        count /= base
    return f"{count:.1f}P"
