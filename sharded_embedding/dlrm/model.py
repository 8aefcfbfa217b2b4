"""DLRM (Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization and
Recommendation Systems"; TorchRec's ``torchrec.models.dlrm.DLRM``) over a
`ShardedEmbeddingBagCollection`.

    dense [B, 13] -> dense arch (MLP)                 -> d [B, D]
    bags of ids   -> the collection (pooled, sharded) -> e_1..e_F [B, D]
    interaction:  the dot products of every pair among (d, e_1, ..., e_F), beside d
    over arch:    MLP -> one logit per sample

The dense and over arches are data-parallel (wrap the model in DDP: the tables stay out of
it by themselves); the collection is model-parallel and looks every feature up in one
exchange per step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..collection import ShardedEmbeddingBagCollection

__all__ = ["DLRM", "mlp"]


def mlp(sizes: list[int], last_activation: bool = True) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between (and after the last, if asked)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """``DLRM(tables, num_dense, dense_arch, over_arch)``: ``tables`` are `TableConfig` s of one
    ``embedding_dim`` (D) with pooling; ``dense_arch`` the hidden sizes of the dense MLP (its
    output is D); ``over_arch`` the hidden sizes of the over MLP (its output is one logit).
    ``forward(dense [B, num_dense], features) -> logits [B]``."""

    def __init__(self, tables, num_dense: int, dense_arch: list[int], over_arch: list[int], *,
                 comm_dtype: torch.dtype | None = None, process_group=None):
        super().__init__()
        dims = {t.embedding_dim for t in tables}
        if len(dims) != 1 or any(t.pooling is None for t in tables):
            raise ValueError("DLRM's dot interaction needs every table pooled, with one embedding_dim")
        dim = dims.pop()
        self.sparse = ShardedEmbeddingBagCollection(tables, process_group=process_group, comm_dtype=comm_dtype)
        self.dense = mlp([num_dense, *dense_arch, dim])
        features = len(self.sparse.pooled_feature_names)
        pairs = (features + 1) * features // 2
        self.over = mlp([dim + pairs, *over_arch, 1], last_activation=False)
        rows, cols = torch.triu_indices(features + 1, features + 1, offset=1)
        self.register_buffer("_pairs", rows * (features + 1) + cols, persistent=False)

    def forward(self, dense: torch.Tensor, features) -> torch.Tensor:
        d = self.dense(dense)  # [B, D]
        pooled = self.sparse(features)
        stacked = torch.stack([d, *(pooled[f] for f in self.sparse.pooled_feature_names)], 1)  # [B, F + 1, D]
        dots = torch.bmm(stacked, stacked.transpose(1, 2)).flatten(1)[:, self._pairs]  # every pair once
        return self.over(torch.cat([d, dots], 1)).squeeze(1)
