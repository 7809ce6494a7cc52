"""The fp32 reference's results on the evaluation tokens, computed once and cached compactly.

llama.cpp keeps the base model's full logits (11 GiB for LLaMA 2 on wikitext); we keep, per scored
position, only what the drift statistics need:

    tokens          int32   [N, L]       the windows (so a cached file names its own token stream)
    topk_ids        int32   [N, L-1, k]  the reference's k most likely next tokens, most likely first
    topk_logprobs   float32 [N, L-1, k]  their log-probabilities (nats)
    rest_logprob    float64 [N, L-1]     log of the probability left outside the top k
    ref_nll         float64 [N, L-1]     -log p_ref(the token that actually follows)
    ref_top1        int32   [N, L-1]     argmax of the reference logits

(about 8 bytes x k per token: 8 MiB for 16k tokens at k = 64). Encoders cache their sentence
embeddings, float32 [N, dim]. An artifact's eager source (the quantized checkpoint it was exported
from) caches its per-token drift against these, ``kld``, ``test_nll``, ``delta_p`` float64 and
``same_top1`` bool [N, L-1], under kind ``decoder-eager-drift`` with its content hash and activation numerics. A file is named by the SHA-256 of its :class:`CacheKey` (reference
checkpoint hash, evaluation text hash, the token stream's hash and the window settings) and written
to a temporary sibling that is renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgeforge import __version__
from edgeforge.errors import InputError
from edgeforge.fileio import atomic_file
from edgeforge.verify.drift import TokenStats

CACHE_VERSION = 1
DEFAULT_TOP_K = 128
CACHE_ENV = "EDGEFORGE_CACHE"  # root of edgeforge's caches; the reference cache is its "reference" folder


def default_cache_dir() -> Path:
    """``$EDGEFORGE_CACHE/reference``, else ``~/.cache/edgeforge/reference``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "edgeforge") / "reference"


def tokens_sha256(*tensors: torch.Tensor) -> str:
    """Hash of token ids (their int64 values and shapes), to key and check a cached token stream."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached reference results depend on."""

    kind: str  # "decoder-topk" | "encoder-embeddings"
    reference_sha256: str
    data_sha256: str
    tokens_sha256: str
    seq_len: int  # window length (decoders) or truncation length (encoders), tokens
    count: int  # windows or sentences
    top_k: int = 0  # decoders only
    model: str = ""  # decoder-eager-drift: the eager model, "<content sha256> <activation numerics>"; else ""

    def digest(self) -> str:
        record = {"cache_version": CACHE_VERSION, **asdict(self)}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CachedReference:
    """The reference's tensors (names as in the module docstring), where they came from, and whether
    this run computed them (``hit`` False) or read them back."""

    tensors: dict[str, torch.Tensor]
    path: Path | None
    hit: bool
    seconds: float  # spent computing them (0 on a hit)


def cached(key: CacheKey, cache_dir: Path | None, compute: Callable[[], dict[str, torch.Tensor]],
           *, say: Callable[[str], None] = lambda message: None, role: str = "reference") -> CachedReference:
    """The reference tensors for ``key``: read from ``cache_dir`` when present, else computed and stored.

    ``cache_dir`` None computes without caching; ``role`` names what is cached in progress lines.
    """
    import time

    path = None if cache_dir is None else Path(cache_dir) / f"{key.digest()[:32]}.safetensors"
    if path is not None and path.is_file():
        tensors = _load(path, key, say)
        if tensors is not None:
            say(f"{role}: cached ({path})")
            return CachedReference(tensors, path, True, 0.0)
    start = time.perf_counter()
    tensors = compute()
    seconds = time.perf_counter() - start
    if path is not None:
        _save_atomic(tensors, path, key)
        say(f"{role}: computed in {seconds:.1f} s, cached to {path}")
    return CachedReference(tensors, path, False, seconds)


def _load(path: Path, key: CacheKey, say: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file whose recorded key is ``key``; None (recompute) when it is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = json.loads((handle.metadata() or {}).get("key", "null"))
            names = list(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names}
    except (OSError, ValueError, SafetensorError) as exc:  # a truncated or foreign file: say so and recompute
        say(f"reference: cache file {path} is unreadable ({exc}); recomputing")
        return None
    if recorded != asdict(key):
        raise InputError("cache file was written for another key (edited, or a hash collision); remove it", path=path)
    return tensors


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, key: CacheKey) -> None:
    from safetensors.torch import save_file

    metadata = {"kind": "edgeforge.reference_cache", "cache_version": str(CACHE_VERSION), "edgeforge": __version__,
                "key": json.dumps(asdict(key), sort_keys=True)}
    with atomic_file(path) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)


def decoder_reference(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, *, top_k: int,
                      batch_size: int = 8,
                      say: Callable[[str], None] = lambda message: None) -> dict[str, torch.Tensor]:
    """Run the reference over ``windows`` [N, L] and keep the top-k summary of every scored position."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in
                                            ("topk_ids", "topk_logprobs", "rest_logprob", "ref_nll", "ref_top1")}
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            tokens = windows[start:start + batch_size]
            logits = logits_fn(tokens)
            for row in range(tokens.shape[0]):  # one window at a time bounds the float64 copy to [L, V]
                for name, value in _summarize_window(logits[row, :-1], tokens[row, 1:], top_k).items():
                    parts[name].append(value)
            done = min(start + batch_size, windows.shape[0])
            total = windows.shape[0]
            if done == total or done * 8 // total != (done - tokens.shape[0]) * 8 // total:
                say(f"reference: {done}/{total} windows")
    out = {name: torch.stack(values) for name, values in parts.items()}
    out["tokens"] = windows.to(torch.int32)
    return out


def _summarize_window(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    logp = torch.log_softmax(logits.double(), dim=-1)  # [T, V]
    top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    return {"topk_ids": top.indices.to(torch.int32), "topk_logprobs": top.values.float(),
            "rest_logprob": _rest_logprob(logp, top.indices),
            "ref_nll": -logp.gather(-1, targets.long()[:, None])[:, 0], "ref_top1": logits.argmax(-1).to(torch.int32)}


def _rest_logprob(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside ``ids`` ([T, k]) per row of ``logp`` [T, V]; -inf when nothing is left."""
    return logp.scatter(-1, ids.long(), float("-inf")).logsumexp(-1)


def drift_inputs(test_logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """All the drift statistics read of one window's test logits [L, V], at the reference's top-k ``ids``
    [L-1, k] and the ``targets`` [L-1]: log-probs at the ids (float32, the cache's precision), the log of the
    rest (float64), the target's log-prob (float64) and the argmax. A device computes these beside the model
    (:mod:`edgeforge.verify.remote`) and sends 4k + 24 bytes per position instead of 4V.
    """
    test_logp = torch.log_softmax(test_logits[:-1].double(), dim=-1)  # [T, V]
    return {"top_logprobs": test_logp.gather(-1, ids.long()).float(),
            "rest_logprob": _rest_logprob(test_logp, ids.long()),
            "target_logprob": test_logp.gather(-1, targets.long()[:, None])[:, 0],
            "top1": test_logits[:-1].argmax(-1)}


def topk_token_stats(reference: dict[str, torch.Tensor], window: int, test_logits: torch.Tensor) -> TokenStats:
    """Per-token drift of one window's test logits [L, V] against the cached reference (window ``window``)."""
    inputs = drift_inputs(test_logits, reference["topk_ids"][window], reference["tokens"][window, 1:])
    return stats_from_inputs(reference, window, inputs)


def stats_from_inputs(reference: dict[str, torch.Tensor], window: int, test: dict[str, torch.Tensor]) -> TokenStats:
    """Per-token drift of one window's :func:`drift_inputs` against the cached reference (window ``window``).

    KL(ref || test) is computed over k + 1 outcomes: the reference's top-k tokens, and one bucket for
    every other token, p_rest = 1 - sum p_topk against q_rest = 1 - sum q over the same ids:

        KLD_k = sum_topk p_i (ln p_i - ln q_i) + p_rest (ln p_rest - ln q_rest)

    Merging outcomes can only lose information (the log-sum inequality), so KLD_k is a **lower bound**
    of the exact KLD; it misses only how the test model redistributes the reference's leftover mass
    p_rest among tokens outside the top k. With k = 64 that is within 1e-3 (relative) of the exact mean
    KLD on stories260K int4 (tests/test_verify.py). Both sides' top-k log-probabilities are compared at
    the cache's float32 precision, so identical models give exactly 0. Perplexity, top-1 agreement and
    delta_p are exact: they need only the target's and the argmax's probabilities, which are stored.
    """
    ref_top = reference["topk_logprobs"][window].double()
    test_top = test["top_logprobs"].double()
    ref_rest, test_rest = reference["rest_logprob"][window], test["rest_logprob"]
    rest = torch.where(ref_rest > float("-inf"), ref_rest.exp() * (ref_rest - test_rest), 0.0)
    kld = ((ref_top.exp() * (ref_top - test_top)).sum(-1) + rest).clamp_min(0.0)
    ref_nll = reference["ref_nll"][window]
    test_nll = -test["target_logprob"]
    same_top1 = reference["ref_top1"][window].long() == test["top1"].long()
    return TokenStats(kld=kld, ref_nll=ref_nll, test_nll=test_nll, same_top1=same_top1,
                      delta_p=torch.exp(-test_nll) - torch.exp(-ref_nll))
