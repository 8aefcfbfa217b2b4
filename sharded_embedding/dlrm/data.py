"""A generated, Criteo-shaped click dataset with a planted model, so the best achievable AUC is
known.

Each sample has 13 dense features (counts, as Criteo's I1-I13) and 26 categorical features
(C1-C26), each a bag of ids in one of the tables that `TableSpec` s describe: most bags hold
one id (as in Criteo), a few are histories of 0-k ids. Several features may read one table.

Ids of a table follow a Zipf law of exponent ``zipf`` over its rows, shuffled by a fixed
bijection so that the popular ids are spread over the table (and its pages). The click
probability is a planted logistic model:

    logit = bias + sum_j a_j std(log1p(I_j)) + b std(log1p(I_1)) std(log1p(I_2))       (dense)
          + sum_f w_f mean_{id in bag f} theta_t(f)[id]                                  (per-id effects)
          + sum_(f,g) c_fg <mean_{bag f} U_t(f), mean_{bag g} U_t(g)>                    (pairwise, dim 4)

where ``theta`` and the rows of ``U`` of the id of Zipf rank ``r`` have standard deviation
``sigma * (1 + r / head) ** -decay``: popular ids carry distinct effects, the long tail
regresses towards the mean (an id seen a handful of times cannot be learned by any model).
A label is a Bernoulli draw of ``sigmoid(logit)``. The Bayes-optimal score is the probability
itself, so the Bayes AUC is the AUC of the planted probability (`bayes_auc`).

Everything is a pure function of ``(seed, batch index)``: batch ``k`` is the same for any world
size, and the test set is a fixed range of batch indices far from the training stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["TableSpec", "DataSpec", "ClickBatch", "ClickData", "DEFAULT_TABLES", "NUM_DENSE"]

NUM_DENSE = 13
TEST_OFFSET = 1 << 40  # batch indices of the test set: never reached by training


@dataclass
class TableSpec:
    """A table of the generator: ``rows`` ids, the ``features`` reading it, bags of
    ``bag[0]..bag[1]`` ids (``[1, 1]``: one id), Zipf exponent, effect scale ``sigma``."""

    name: str
    rows: int
    features: list
    bag: list = field(default_factory=lambda: [1, 1])
    zipf: float = 1.1
    sigma: float = 1.0
    bag_features: list = field(default_factory=list)  # the features that are bags (others: one id)


# 8 tables, 26 features (C1-C26); C2, C6, C20 and C26 are histories (bags).
DEFAULT_TABLES = [
    dict(name="ad", rows=200_000, features=["C1", "C2"], bag=[0, 20], bag_features=["C2"], zipf=1.05, sigma=0.8),
    dict(name="advertiser", rows=20_000, features=["C3"], zipf=1.1, sigma=0.6),
    dict(name="user", rows=500_000, features=["C4"], zipf=1.05, sigma=0.6),
    dict(name="site", rows=50_000, features=["C5", "C6"], bag=[0, 10], bag_features=["C6"], zipf=1.1, sigma=0.7),
    dict(name="device", rows=2_000, features=["C7", "C8", "C9", "C10"], zipf=1.2, sigma=0.4),
    dict(name="geo", rows=1_000, features=["C11", "C12", "C13", "C14"], zipf=1.2, sigma=0.4),
    dict(name="category", rows=500, features=["C15", "C16", "C17", "C18", "C19", "C20"], bag=[1, 5],
         bag_features=["C20"], zipf=1.1, sigma=0.5),
    dict(name="misc", rows=10_000, features=["C21", "C22", "C23", "C24", "C25", "C26"], bag=[0, 8],
         bag_features=["C26"], zipf=1.1, sigma=0.3),
]
# Pairs of features whose latent vectors interact (ad x user, advertiser x site, ...).
DEFAULT_PAIRS = [["C1", "C4"], ["C3", "C5"], ["C4", "C15"], ["C7", "C11"], ["C2", "C4"], ["C5", "C16"]]


@dataclass
class DataSpec:
    """The generator's knobs (the ``data`` section of ``configs/dlrm.yaml``)."""

    tables: list
    pairs: list
    seed: int = 0
    scale: float = 1.0  # multiplies every table's rows (at least 16 each): CI runs tiny tables
    ctr: float = 0.25  # the average click rate the bias aims at
    head: float = 50.0  # Zipf rank scale of the effects' decay
    decay: float = 0.5
    interaction: float = 0.6  # weight of each pair's dot product
    dense: float = 0.35  # weight scale of the dense part


@dataclass
class ClickBatch:
    """``dense``: float32 ``[B, 13]`` (log1p of the counts); ``features``: {name: (values,
    offsets)}; ``labels``: float32 ``[B]``; ``probability``: float64 ``[B]`` (the planted one)."""

    dense: torch.Tensor
    features: dict
    labels: torch.Tensor
    probability: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


class ClickData:
    """The generator: planted parameters built once from the seed (the same on every rank)."""

    def __init__(self, spec: DataSpec):
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed * 7919 + 17)
        self.tables = [TableSpec(**dict(t)) for t in spec.tables]
        self.rows = {t.name: max(16, int(round(t.rows * spec.scale))) for t in self.tables}
        self.table_of = {f: t for t in self.tables for f in t.features}
        self.features = [f for t in self.tables for f in t.features]
        self._cdf, self._perm_mult, self.theta, self.latent = {}, {}, {}, {}
        for t in self.tables:
            n = self.rows[t.name]
            ranks = torch.arange(1, n + 1, dtype=torch.float64)
            cdf = torch.cumsum(ranks.pow(-t.zipf), 0)
            self._cdf[t.name] = cdf / cdf[-1]
            self._perm_mult[t.name] = _coprime(n)
            scale = t.sigma * (1 + (ranks - 1) / spec.head).pow(-spec.decay)
            ids = self._shuffle(t.name, torch.arange(n))
            theta = torch.zeros(n, dtype=torch.float64)
            theta[ids] = scale * torch.randn(n, generator=g, dtype=torch.float64)
            latent = torch.zeros(n, 4, dtype=torch.float64)
            latent[ids] = scale[:, None] * torch.randn(n, 4, generator=g, dtype=torch.float64)
            self.theta[t.name], self.latent[t.name] = theta, latent
        self.weights = {f: float(w) for f, w in zip(self.features, 0.5 + torch.rand(len(self.features), generator=g,
                                                                                    dtype=torch.float64))}
        self.pairs = [(a, b) for a, b in spec.pairs]
        self.dense_mu = 1.0 + 2.0 * torch.rand(NUM_DENSE, generator=g, dtype=torch.float64)  # log-count scale
        self.dense_sigma = 0.5 + torch.rand(NUM_DENSE, generator=g, dtype=torch.float64)
        self.dense_w = spec.dense * torch.randn(NUM_DENSE, generator=g, dtype=torch.float64)
        self.dense_pair = spec.dense
        self.bias = 0.0
        self.bias = self._calibrate(spec.ctr)

    # ------------------------------------------------------------------ sampling
    def _shuffle(self, table: str, ranks: torch.Tensor) -> torch.Tensor:
        """Zipf rank -> id: a fixed bijection of the table's rows that scatters popular ids."""
        n = self.rows[table]
        return (ranks * self._perm_mult[table] + n // 3) % n

    def _ids(self, table: str, count: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(count, generator=g, dtype=torch.float64)
        ranks = torch.searchsorted(self._cdf[table], u).clamp_(max=self.rows[table] - 1)
        return self._shuffle(table, ranks)

    def batch(self, index: int, size: int) -> ClickBatch:
        """Batch ``index`` (any non-negative int) of ``size`` samples."""
        g = torch.Generator().manual_seed((self.spec.seed * 0x9E3779B97F4A7C15 + index) % 2**63)
        z = torch.randn(size, NUM_DENSE, generator=g, dtype=torch.float64)
        counts = torch.floor(torch.exp(self.dense_mu + self.dense_sigma * z)) - 1
        dense = torch.log1p(counts.clamp_min(0))
        features = {}
        for t in self.tables:
            for f in t.features:
                lo, hi = (t.bag if f in t.bag_features else [1, 1])
                lengths = torch.randint(lo, hi + 1, (size,), generator=g)
                values = self._ids(t.name, int(lengths.sum()), g)
                features[f] = (values, torch.cumsum(lengths, 0) - lengths)
        logit = self.logit(dense, features)
        probability = torch.sigmoid(logit)
        labels = (torch.rand(size, generator=g, dtype=torch.float64) < probability).to(torch.float32)
        return ClickBatch(dense.to(torch.float32), features, labels, probability)

    def test_batch(self, k: int, size: int) -> ClickBatch:
        return self.batch(TEST_OFFSET + k, size)

    # ------------------------------------------------------------------ the planted model
    def logit(self, dense: torch.Tensor, features: dict) -> torch.Tensor:
        """The planted logit of samples (float64 ``[B]``), from what a model sees."""
        std = (dense.to(torch.float64) - self._dense_mean) / self._dense_std
        out = self.bias + std @ self.dense_w + self.dense_pair * std[:, 0] * std[:, 1]
        pooled = {}
        for f, (values, offsets) in features.items():
            t = self.table_of[f].name
            bags = offsets.numel()
            lengths = torch.diff(offsets, append=torch.tensor([values.numel()]))
            bag = torch.repeat_interleave(torch.arange(bags), lengths)
            mean = 1.0 / lengths.clamp_min(1).to(torch.float64)
            theta = torch.zeros(bags, dtype=torch.float64).index_add_(0, bag, self.theta[t][values]) * mean
            latent = torch.zeros(bags, 4, dtype=torch.float64).index_add_(0, bag, self.latent[t][values]) * mean[:, None]
            out = out + self.weights[f] * theta
            pooled[f] = latent
        for a, b in self.pairs:
            out = out + self.spec.interaction * (pooled[a] * pooled[b]).sum(1)
        return out

    @property
    def _dense_mean(self) -> torch.Tensor:
        return self._dense_moments()[0]

    @property
    def _dense_std(self) -> torch.Tensor:
        return self._dense_moments()[1]

    def _dense_moments(self):
        """Mean and std of log1p(count) per dense feature, from a fixed sample."""
        if not hasattr(self, "_moments"):
            g = torch.Generator().manual_seed(self.spec.seed * 31 + 5)
            z = torch.randn(200_000, NUM_DENSE, generator=g, dtype=torch.float64)
            d = torch.log1p((torch.floor(torch.exp(self.dense_mu + self.dense_sigma * z)) - 1).clamp_min(0))
            self._moments = (d.mean(0), d.std(0).clamp_min(1e-6))
        return self._moments

    def _calibrate(self, ctr: float) -> float:
        """The bias that makes the average click probability ``ctr`` (bisection on a sample)."""
        sample = [self.batch(TEST_OFFSET * 2 + k, 4096) for k in range(4)]
        logits = torch.cat([torch.logit(s.probability.clamp(1e-12, 1 - 1e-12)) for s in sample])
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if torch.sigmoid(logits + mid).mean().item() < ctr:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def bayes_auc(self, samples: int = 1_000_000, batch: int = 65_536) -> float:
        """The AUC of the planted probability over fresh samples, expected over the labels
        (each sample counts as a positive with weight p and a negative with weight 1 - p), so
        only the features are Monte Carlo."""
        from .metrics import auc

        probs = [self.batch(TEST_OFFSET * 3 + k, min(batch, samples - k * batch)).probability
                 for k in range(math.ceil(samples / batch))]
        p = torch.cat(probs)
        return auc(p, p)


def _coprime(n: int) -> int:
    """A multiplier coprime with ``n`` (a bijection of 0..n-1 by multiplication)."""
    m = 1_000_003
    while math.gcd(m, n) != 1:
        m += 2
    return m % n if n > 1 else 1
