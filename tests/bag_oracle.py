"""The single-process oracle of a ShardedEmbeddingBagCollection: one ``nn.EmbeddingBag`` per
table (``nn.Embedding`` for a sequence table) with the same initial rows, fed every rank's bags.

Bags are pure functions of (seed, rank, step, feature), so every rank can rebuild every rank's
input and run the oracle locally.
"""

from __future__ import annotations

import torch
from torch import nn

from sharded_embedding import TableConfig, initial_rows
from tests.oracle import counterpart, make_optimizer


def table_configs(specs: list[dict]) -> list[TableConfig]:
    return [TableConfig(**s) for s in specs]


def make_bags(num_embeddings: int, rank: int, step: int, feature: int, *, batch: int, max_len: int,
              weighted: bool = False, skew: str = "uniform", seed: int = 0):
    """One feature's bags on one rank: ``batch`` bags of 0..max_len ids, as (values, offsets
    of the bag starts, per-sample weights or None)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 10_007 * rank + 101 * step + feature)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    n = int(lengths.sum())
    if skew == "uniform":
        values = torch.randint(0, num_embeddings, (n,), generator=g)
    elif skew == "zipf":
        u = torch.rand(n, generator=g, dtype=torch.float64)
        values = (num_embeddings ** u - 1).floor().long().clamp_(0, num_embeddings - 1)
    elif skew == "hot":
        values = torch.randint(0, min(3, num_embeddings), (n,), generator=g)
    else:
        raise ValueError(skew)
    weights = torch.rand(n, generator=g) * 2 - 0.5 if weighted else None
    return values, torch.cumsum(lengths, 0) - lengths, weights


def as_input(bags, form: str = "offsets"):
    """(values, offsets, weights) as the collection takes it: "offsets" ((values, offsets[,
    weights])), "last_offset" (offsets with the final end: include_last_offset=True),
    "lengths" (a mapping), "int32" (int32 values and offsets)."""
    values, offsets, weights = bags
    if form == "lengths":
        ends = torch.cat([offsets[1:], torch.tensor([values.numel()])]) if offsets.numel() else offsets
        out = {"values": values, "lengths": ends - offsets}
        if weights is not None:
            out["weights"] = weights
        return out
    if form == "last_offset":
        offsets = torch.cat([offsets, torch.tensor([values.numel()])])
    elif form == "int32":
        values, offsets = values.int(), offsets.int()
    return (values, offsets) if weights is None else (values, offsets, weights)


def loss_weights(out_rows: int, dim: int, rank: int, step: int, feature: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * seed + 31 * rank + 7 * step + feature + 1)
    return torch.randn(out_rows, dim, generator=g)


class BagOracle:
    """One nn.EmbeddingBag (or nn.Embedding) per table, same initial rows, optimizer per table:
    the fused optimizer's torch counterpart, or ``optimizer`` for tables without one."""

    def __init__(self, configs: list[TableConfig], optimizer: str | None = "sgd", lr: float = 0.1):
        self.configs = configs
        self.modules, self.opts = {}, {}
        for c in configs:
            if c.pooling is None:
                m = nn.Embedding(c.num_embeddings, c.embedding_dim, sparse=True)
            else:
                m = nn.EmbeddingBag(c.num_embeddings, c.embedding_dim, mode=c.pooling, sparse=True)
            with torch.no_grad():
                m.weight.copy_(initial_rows(c.seed, c.embedding_dim, 0, c.num_embeddings))
            self.modules[c.name] = m
            if c.fused_optimizer is not None:
                self.opts[c.name] = counterpart(dict(c.fused_optimizer), m.parameters())
            elif optimizer is not None:
                self.opts[c.name] = make_optimizer(optimizer, m.parameters(), lr)

    def table(self, name: str) -> torch.Tensor:
        return self.modules[name].weight.detach()

    def state(self, name: str, key: str) -> torch.Tensor:
        return self.opts[name].state[self.modules[name].weight][key]

    def forward(self, features: dict) -> dict:
        """``features``: {name: (values, offsets, weights)} -> {name: output}."""
        out = {}
        for c in self.configs:
            m = self.modules[c.name]
            for f in c.feature_names:
                values, offsets, weights = features[f]
                out[f] = m(values) if c.pooling is None else m(values, offsets, per_sample_weights=weights)
        return out

    def step(self, per_rank_features: list[dict], per_rank_weights: list[dict]):
        """Every rank's loss sum((out * w).sum()), summed over ranks; backward; optimizer
        steps. Returns (outputs by rank, dense gradient by table)."""
        outs = [self.forward(f) for f in per_rank_features]
        loss = sum((o[f] * w[f]).sum() for o, w in zip(outs, per_rank_weights) for f in o)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        grads = {}
        for c in self.configs:
            g = self.modules[c.name].weight.grad
            grads[c.name] = (g.to_dense() if g is not None else torch.zeros(c.num_embeddings, c.embedding_dim)).clone()
        for name, opt in self.opts.items():
            if self.modules[name].weight.grad is not None:
                opt.step()
            opt.zero_grad(set_to_none=True)
        for m in self.modules.values():
            m.weight.grad = None
        return [{f: v.detach() for f, v in o.items()} for o in outs], grads
