"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

Features are L2-normalised; each query takes the ``k`` reference features most cosine-similar
to it, and neighbour ``i`` votes for its label with weight ``exp(similarity_i / temperature)``;
the class with the largest vote wins.

* ``knn_predict`` / ``knn_accuracy``: one process holds the references and the queries.
* ``sharded_knn_top1``: the references (the "bank") are sharded over the ranks, each rank
  holding the rows it embedded, and each rank has its own queries. The queries visit every
  rank in turn (a broadcast per chunk); each rank takes the top-k of the chunk against its
  shard, the per-rank (similarity, label) lists are all-gathered and their ``k`` largest
  vote. The global top-k of a query is among the shards' top-k, so the neighbours, their
  order and the votes are those of one process holding the whole bank.

Memory on each rank: its shard and queries, (rows, C) float32 each, plus one chunk's
similarities, (queries per chunk, shard rows) float32, kept below ``SIMILARITY_BLOCK_ELEMENTS``
by the chunk size (``queries_per_chunk``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import get_rank, get_world_size

KNN_TEMPERATURE = 0.07  # DINO's k-NN protocol
SIMILARITY_BLOCK_ELEMENTS = 2**26  # query-reference similarities per chunk: 256 MiB of float32


class KNNScore(NamedTuple):
    """Top-1 (%) of ``queries`` images classified against ``references`` images."""

    top1: float
    queries: int
    references: int


def queries_per_chunk(reference_rows: int) -> int:
    """Queries whose similarities to ``reference_rows`` references fit one block."""
    return max(1, SIMILARITY_BLOCK_ELEMENTS // max(reference_rows, 1))


def top1_percent(correct: int, total: int) -> float:
    """``100 * correct / total`` (nan without queries)."""
    return 100.0 * correct / total if total else math.nan


def nearest_neighbours(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` references most similar to each query, most similar first.

    Args: bank (N, C) and queries (M, C), both L2-normalised; bank_labels (N,) int64.
    Returns: similarities (M, k) and labels (M, k) int64; with fewer than ``k`` references the
    missing columns hold similarity -inf and label -1.
    """
    similarity, index = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    missing = k - similarity.shape[1]
    if missing:
        similarity = F.pad(similarity, (0, missing), value=-math.inf)
        return similarity, F.pad(bank_labels[index], (0, missing), value=-1)
    return similarity, bank_labels[index]


def weighted_vote(similarity: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """(M, k) neighbour similarities and labels -> (M,) int64: the class with the largest
    ``sum(exp(similarity / temperature))``."""
    votes = torch.zeros(len(similarity), num_classes, device=similarity.device)
    votes.scatter_add_(1, labels, (similarity / temperature).exp())
    return votes.argmax(dim=1)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Predicted class of every query.

    Args:
        train_features: (N, C) reference features; train_labels: (N,) int64 in [0, classes).
        query_features: (M, C).
        num_classes: defaults to ``train_labels.max() + 1``.
        k: neighbours (capped at N); temperature: vote weight ``exp(sim / temperature)``.
        chunk_size: queries per similarity matrix; default ``queries_per_chunk(N)``.
    Returns: (M,) int64.
    """
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, len(train_features))
    bank = F.normalize(train_features.float(), dim=1)
    predictions = []
    for query in F.normalize(query_features.float(), dim=1).split(chunk_size or queries_per_chunk(len(bank))):
        predictions.append(weighted_vote(*nearest_neighbours(bank, train_labels, query, k), num_classes, temperature))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, query_features, query_labels, **knn_kwargs) -> float:
    """Top-1 accuracy (%) of ``knn_predict`` against ``query_labels``."""
    predictions = knn_predict(train_features, train_labels, query_features, **knn_kwargs)
    return top1_percent(int((predictions == query_labels).sum()), len(query_labels))


@torch.no_grad()
def sharded_knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                     num_classes: int, k: int = 20, temperature: float = KNN_TEMPERATURE) -> KNNScore:
    """k-NN top-1 of every rank's queries against the union of every rank's bank shard (module
    docstring); the same ``KNNScore`` on every rank. Collective: every rank calls it.

    Args:
        bank: (N_rank, C) L2-normalised float features of this rank's references; bank_labels: (N_rank,) int64.
        queries: (M_rank, C) L2-normalised, same dtype and device; query_labels: (M_rank,) int64.
        num_classes, k, temperature: as in ``knn_predict`` (k capped at the number of references).
    """
    rank, world_size = get_rank(), get_world_size()
    rows = torch.tensor([len(bank), len(queries)], device=bank.device)
    if world_size > 1:
        gathered = [torch.empty_like(rows) for _ in range(world_size)]
        dist.all_gather(gathered, rows)
        rows = torch.stack(gathered)
    bank_rows, query_rows = rows.view(-1, 2).T.tolist()
    k, chunk = min(k, sum(bank_rows)), queries_per_chunk(max(bank_rows))
    correct = torch.zeros((), dtype=torch.int64, device=bank.device)
    for source in range(world_size):  # the queries of rank ``source``, chunk by chunk, against every shard
        for start in range(0, query_rows[source], chunk):
            if source == rank:
                chunk_queries = queries[start:start + chunk]
            else:
                chunk_queries = queries.new_empty(min(chunk, query_rows[source] - start), queries.shape[1])
            if world_size > 1:
                dist.broadcast(chunk_queries, src=source)
            similarity, labels = nearest_neighbours(bank, bank_labels, chunk_queries, k)
            if world_size > 1:
                similarity, labels = merge_nearest(similarity, labels, k, world_size)
            if source == rank:
                predictions = weighted_vote(similarity, labels, num_classes, temperature)
                correct += (predictions == query_labels[start:start + chunk]).sum()
    counts = torch.stack([correct, torch.tensor(len(queries), device=bank.device)])
    if world_size > 1:
        dist.all_reduce(counts)
    correct_total, query_total = counts.tolist()
    return KNNScore(top1_percent(correct_total, query_total), query_total, sum(bank_rows))


def merge_nearest(similarity: torch.Tensor, labels: torch.Tensor, k: int,
                  world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (M, k) neighbours of the same queries -> the ``k`` most similar of all, most
    similar first, on every rank (an all-gather; labels travel as floats, exact below 2**24)."""
    candidates = torch.stack([similarity, labels.to(similarity.dtype)], dim=2)  # (M, k, 2): one collective
    gathered = [torch.empty_like(candidates) for _ in range(world_size)]
    dist.all_gather(gathered, candidates)
    candidates = torch.cat(gathered, dim=1)  # (M, world_size * k, 2)
    similarity, index = candidates[..., 0].topk(k, dim=1)
    return similarity, candidates[..., 1].gather(1, index).long()
