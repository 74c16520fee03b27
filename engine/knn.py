"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

Features are L2-normalised; each query takes its ``k`` most cosine-similar training features,
and neighbour ``i`` votes for its label with weight ``exp(similarity_i / temperature)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class of every query.

    Args:
        train_features: (N, C) reference features; train_labels: (N,) int64 in [0, classes).
        query_features: (M, C).
        num_classes: defaults to ``train_labels.max() + 1``.
        k: neighbours (capped at N); temperature: vote weight ``exp(sim / temperature)``.
        chunk_size: queries per similarity matrix (memory ~ chunk_size * N floats).
    Returns: (M,) int64.
    """
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, len(train_features))
    train_features = F.normalize(train_features.float(), dim=1)
    predictions = []
    for query in F.normalize(query_features.float(), dim=1).split(chunk_size):
        similarity, neighbours = (query @ train_features.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, query_features, query_labels, **knn_kwargs) -> float:
    """Top-1 accuracy (%) of ``knn_predict`` against ``query_labels``."""
    predictions = knn_predict(train_features, train_labels, query_features, **knn_kwargs)
    return 100.0 * (predictions == query_labels).float().mean().item()
