"""The DDP training loop of docs/training-loop.md, run on 2 ranks against a single-process oracle."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.harness import run_ranks
from tests.oracle import rank_world

DOC = Path(__file__).resolve().parents[1] / "docs" / "training-loop.md"


def _doc_code() -> dict:
    """Execute the tested code block of the doc; returns its namespace."""
    text = DOC.read_text()
    block = re.search(r"<!-- tested: training-loop -->\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {"__name__": "training_loop_doc"}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def _batch(rank, step, num_items=500):
    g = torch.Generator().manual_seed(1000 * rank + step)
    bags = torch.randint(0, num_items, (12, 5), generator=g)
    return bags, torch.randn(12, generator=g)


def _train_like_the_doc(steps):
    rank, world = rank_world()
    doc = _doc_code()
    torch.manual_seed(0)  # the same dense initialization on every rank and in the oracle
    model, table_opt, dense_opt = doc["build"]()
    assert model.parameters_to_ignore == {"items.weight"}  # DDP leaves the table alone
    # The oracle: one process, the whole table, both ranks' batches; loss = sum over ranks;
    # the dense gradient is averaged as DDP does.
    ref_head = copy.deepcopy(model.module.head)
    table = model.module.items.full_table().clone().requires_grad_()
    ref_table_opt = torch.optim.Adagrad([table], lr=0.05)
    ref_dense_opt = torch.optim.Adam(ref_head.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        batches = [_batch(r, step) for r in range(world)]
        losses.append(doc["train_step"](model, table_opt, dense_opt, *batches[rank]))
        total = sum(F.mse_loss(ref_head(table[b].mean(1)).squeeze(1), t) for b, t in batches)
        total.backward()
        for p in ref_head.parameters():
            p.grad /= world
        ref_table_opt.step()
        ref_dense_opt.step()
        ref_table_opt.zero_grad()
        ref_dense_opt.zero_grad()
        torch.testing.assert_close(model.module.items.full_table(), table.detach(), rtol=1e-5, atol=1e-6)
        for got, want in zip(model.module.head.parameters(), ref_head.parameters()):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert model.module.items.weight.grad is None  # zeroed by the loop
    return losses


def test_ddp_training_loop_from_the_docs_matches_the_oracle():
    losses = run_ranks(2, _train_like_the_doc, 5)
    assert len(losses[0]) == 5 and losses[0] != losses[1]  # each rank trained on its own batches


def _resume_like_the_doc(ckpt: str):
    """save_checkpoint after 2 steps, load_checkpoint into a freshly built model and optimizers,
    2 more steps: the table, the head and both optimizers' states equal the uninterrupted run's."""
    rank, world = rank_world()
    doc = _doc_code()
    torch.manual_seed(0)
    model, table_opt, dense_opt = doc["build"]()
    for step in range(2):
        doc["train_step"](model, table_opt, dense_opt, *_batch(rank, step))
    doc["save_checkpoint"](ckpt, model, table_opt, dense_opt)
    for step in range(2, 4):
        doc["train_step"](model, table_opt, dense_opt, *_batch(rank, step))
    torch.manual_seed(1 + rank)  # another dense initialization, different on every rank
    model2, table_opt2, dense_opt2 = doc["build"]()
    doc["load_checkpoint"](ckpt, model2, table_opt2, dense_opt2)
    for step in range(2, 4):
        doc["train_step"](model2, table_opt2, dense_opt2, *_batch(rank, step))
    table, table2 = model.module.items, model2.module.items
    assert torch.equal(table2.full_table(), table.full_table())
    assert torch.equal(table2._full(table_opt2.state[table2.weight]["sum"]),
                       table._full(table_opt.state[table.weight]["sum"]))
    for got, want in zip(model2.module.head.parameters(), model.module.head.parameters()):
        assert torch.equal(got, want)
        assert torch.equal(dense_opt2.state[got]["exp_avg_sq"], dense_opt.state[want]["exp_avg_sq"])


def test_the_docs_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    run_ranks(2, _resume_like_the_doc, str(tmp_path / "ckpt"))
