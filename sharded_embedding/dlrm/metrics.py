"""ROC AUC, the click model's metric."""

from __future__ import annotations

import torch

__all__ = ["auc"]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a positive scores above a negative, ties
    counting one half (the Mann-Whitney statistic). ``labels`` in [0, 1]: a sample counts as a
    positive with weight ``y`` and as a negative with weight ``1 - y`` (hard labels: 0 or 1;
    soft labels give the AUC expected over Bernoulli(y) labels, up to the pairs of a sample
    with itself). Returns nan without both positives and negatives."""
    s, y = scores.detach().double().flatten(), labels.detach().double().flatten()
    order = torch.argsort(s)
    s, pos = s[order], y[order]
    neg = 1.0 - pos
    _, inverse, _ = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    groups = int(inverse[-1]) + 1 if inverse.numel() else 0
    pos_g = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, pos)
    neg_g = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, neg)
    below = torch.cumsum(neg_g, 0) - neg_g
    den = float(pos.sum()) * float(neg.sum())
    return float((pos_g * (below + 0.5 * neg_g)).sum()) / den if den > 0 else float("nan")
