"""The single-process oracle: the whole table in one ``nn.Embedding``, fed every rank's batch.

Batches are pure functions of (seed, rank, step), so every rank can rebuild every other
rank's batch and run the oracle locally, then compare what it holds with the oracle's rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sharded_embedding import initial_rows


def make_ids(num_embeddings: int, rank: int, step: int, size: int, *, seed: int = 0, skew: str = "uniform",
             shape=None) -> torch.Tensor:
    """Rank ``rank``'s ids for ``step``. ``skew``: uniform, zipf (frequency-sorted, many
    duplicates) or hot (a handful of ids repeated over and over)."""
    g = torch.Generator().manual_seed(10_007 * seed + 101 * rank + step)
    if skew == "uniform":
        ids = torch.randint(0, num_embeddings, (size,), generator=g)
    elif skew == "zipf":
        u = torch.rand(size, generator=g, dtype=torch.float64)
        ids = (num_embeddings ** u - 1).floor().long().clamp_(0, num_embeddings - 1)  # ~ 1/x density
    elif skew == "hot":
        ids = torch.randint(0, min(4, num_embeddings), (size,), generator=g)
    else:
        raise ValueError(skew)
    return ids.view(shape) if shape is not None else ids


def make_loss_weight(ids: torch.Tensor, dim: int, rank: int, step: int, seed: int = 0) -> torch.Tensor:
    """The fixed weight ``w`` of rank ``rank``'s loss ``(out * w).sum()``."""
    g = torch.Generator().manual_seed(7919 * seed + 31 * rank + step + 1)
    return torch.randn(*ids.shape, dim, generator=g)


class RowwiseAdagradReference(torch.optim.Optimizer):
    """Row-wise Adagrad written plainly on sparse gradients (FBGEMM's EXACT_ROWWISE_ADAGRAD):
    one accumulator per row, the mean of the squared gradient row."""

    def __init__(self, params, lr=0.01, eps=1e-10, initial_accumulator_value=0.0):
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator_value"])
                grad = p.grad.coalesce()
                rows, g = grad.indices()[0], grad.values()
                state["sum"][rows] += (g * g).mean(1)
                p[rows] -= group["lr"] * g / (state["sum"][rows].sqrt() + group["eps"]).unsqueeze(1)


def counterpart(fused: dict, params):
    """The torch.optim optimizer a fused optimizer spec must match."""
    spec = dict(fused)
    name = spec.pop("name")
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.SparseAdam,
           "rowwise_adagrad": RowwiseAdagradReference}[name]
    if "betas" in spec:
        spec["betas"] = tuple(spec["betas"])
    return cls(params, **spec)


def make_optimizer(name: str, params, lr: float = 0.1):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(name)


class Oracle:
    """One ``nn.Embedding`` with the same initial table, trained on all ranks' batches."""

    def __init__(self, num_embeddings: int, dim: int, *, seed: int = 0, optimizer: str | None = "sgd",
                 sparse: bool = True, lr: float = 0.1, fused: dict | None = None):
        self.emb = nn.Embedding(num_embeddings, dim, sparse=sparse or fused is not None)
        with torch.no_grad():
            self.emb.weight.copy_(initial_rows(seed, dim, 0, num_embeddings))
        if fused is not None:
            self.opt = counterpart(fused, self.emb.parameters())
        else:
            self.opt = make_optimizer(optimizer, self.emb.parameters(), lr) if optimizer else None

    def state(self, key: str) -> torch.Tensor:
        """The oracle optimizer's state ``key`` for the table (e.g. Adagrad's ``sum``)."""
        return self.opt.state[self.emb.weight][key]

    @property
    def table(self) -> torch.Tensor:
        return self.emb.weight.detach()

    def step(self, ids_by_rank, weights_by_rank):
        """Forward all ranks' ids, backprop the summed loss, step. Returns (outputs, dense grad)."""
        outs = [self.emb(ids) for ids in ids_by_rank]
        loss = sum((o * w).sum() for o, w in zip(outs, weights_by_rank))
        loss.backward()
        grad = self.emb.weight.grad
        grad = (grad.to_dense() if grad.is_sparse else grad).clone()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.emb.weight.grad = None
        return [o.detach() for o in outs], grad


def rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def assert_replicas_identical(emb, storage=None) -> None:
    """Every mirrored page is bitwise identical on all the ranks holding it (collective).
    ``storage``: a tensor laid out like the local rows (e.g. optimizer state) to check instead."""
    world = dist.get_world_size(emb.process_group)
    storage = emb.weight.detach() if storage is None else storage.reshape(emb.weight.shape[0], -1)
    mine = torch.zeros(emb.num_pages, emb.page_size, storage.shape[1], dtype=storage.dtype)
    for slot, p in enumerate(sorted(emb.local_pages)):
        n = emb.plan.page_rows(p)
        mine[p, :n] = storage[slot * emb.page_size : slot * emb.page_size + n]
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=emb.process_group)
    for p in range(emb.num_pages):
        owners = emb.page_owners(p)
        for r in owners[1:]:
            assert torch.equal(every[r][p], every[owners[0]][p]), (
                f"page {p}: replica on rank {r} differs from rank {owners[0]}")


def local_rows_of(emb, table: torch.Tensor) -> torch.Tensor:
    """The rows of ``table`` (global) that ``emb`` stores on this rank, in storage order."""
    parts = [table[emb.plan.page_start(p) : emb.plan.page_start(p) + v.shape[0]] for p, v in emb.local_pages.items()]
    return torch.cat(parts) if parts else table.new_empty(0, table.shape[1])


def recording_backend():
    """(a torch.compile backend that runs graphs as they are, the set it fills with the file
    names of the package's code that dynamo put into a graph): to check what is a graph break."""
    traced: set[str] = set()

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            for line in (node.meta.get("stack_trace") or "").splitlines():
                if "sharded_embedding" in line and line.strip().startswith("File"):
                    traced.add(line.split('"')[1].rsplit("/", 1)[-1])
        return gm.forward

    return backend, traced
