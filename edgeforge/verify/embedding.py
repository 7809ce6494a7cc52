"""Embedding drift: a sentence encoder's embeddings against the fp32 reference's, on the same sentences.

Two questions a user of an embedding model asks:

- Does each sentence still land in the same place? Cosine between the test and reference embedding of
  every sentence: mean ± SEM, median, p1 and min (the tail is where a broken lowering shows first).
- Does retrieval still return the same neighbours? For every sentence, the reference's 10 nearest
  other sentences of the corpus (by cosine) against the test model's 10 nearest; recall@10 is the
  share the test model finds, mean ± SEM over sentences. 1.0 means search results are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from edgeforge.errors import InputError
from edgeforge.records import described

NEIGHBOURS = 10
MIN_SENTENCES = 3  # the neighbour check needs at least two other sentences


def sentences_of(documents: list[str]) -> tuple[list[str], list[int]]:
    """The non-empty lines of the documents (a sentence or paragraph each) and, for each, its document index."""
    sentences, owners = [], []
    for index, document in enumerate(documents):
        for line in document.splitlines():
            if line.strip():
                sentences.append(line.strip())
                owners.append(index)
    return sentences, owners


@dataclass(frozen=True)
class EmbeddingStats:
    """Embedding drift over ``sentence_count`` sentences; cosines and recall are unitless, in [-1, 1] / [0, 1]."""

    sentence_count: int = described("sentences embedded")
    cosine_mean: float = described("mean cosine of each sentence's embeddings against the reference's")
    cosine_mean_sem: float = described("its standard error")
    cosine_median: float = described("median cosine")
    cosine_p1: float = described("1st percentile cosine")
    cosine_min: float = described("lowest cosine")
    neighbours: int = described("k of recall@k (10, or fewer on a corpus of 11 sentences or less)")
    recall_at_k: float = described("share of the reference's k nearest sentences the model also ranks nearest")
    recall_at_k_sem: float = described("its standard error")

    def to_dict(self) -> dict:
        return asdict(self)


def _sem(values: torch.Tensor) -> float:
    return float(values.std(correction=1) / math.sqrt(values.numel())) if values.numel() > 1 else 0.0


def nearest(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [N, k] of each row's k most cosine-similar other rows."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.topk(k, dim=-1).indices


def embedding_stats(reference: torch.Tensor, test: torch.Tensor, *,
                    neighbours: int = NEIGHBOURS) -> tuple[EmbeddingStats, torch.Tensor]:
    """Summary of ``test`` [N, dim] against ``reference`` [N, dim], and the per-sentence cosines [N]."""
    if reference.shape != test.shape or reference.ndim != 2:
        raise InputError(f"reference embeddings {tuple(reference.shape)} and test embeddings {tuple(test.shape)} "
                         "must both be [sentences, dim]")
    count = reference.shape[0]
    if count < MIN_SENTENCES:
        raise InputError(f"embedding drift needs at least {MIN_SENTENCES} sentences, got {count}")
    cosine = torch.nn.functional.cosine_similarity(reference.double(), test.double(), dim=-1)
    k = min(neighbours, count - 1)
    ref_nearest, test_nearest = nearest(reference, k), nearest(test, k)
    found = (ref_nearest[:, :, None] == test_nearest[:, None, :]).any(-1).double().sum(-1) / k  # [N]
    ordered = cosine.sort().values
    return EmbeddingStats(
        sentence_count=count, cosine_mean=float(cosine.mean()), cosine_mean_sem=_sem(cosine),
        cosine_median=float(ordered.quantile(0.5)), cosine_p1=float(ordered.quantile(0.01)),
        cosine_min=float(ordered[0]), neighbours=k, recall_at_k=float(found.mean()), recall_at_k_sem=_sem(found),
    ), cosine
