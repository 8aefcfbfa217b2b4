"""Fused optimizer steps wait for the end of the backward pass that computed them.

A lookup's backward computes its rows' gradient (exchanges and replica all-reduces included)
but does not write the rows: it hands the gradient to `defer`, and the steps of one backward
pass are applied together when autograd completes that pass (a callback queued with
``torch.autograd.Variable._execution_engine.queue_callback``, as DDP queues its own), one
optimizer step per table and pass. So, as with ``nn.Embedding`` and a torch optimizer:

- a table looked up several times in one loss takes one step with the sum of the lookups'
  gradients (Adagrad and Adam square the sum, not each part);
- a backward pass that raises anywhere (ranks out of step, inf/NaN without a GradScaler, an
  error in the user's own backward code) changes no row of any table: autograd runs a pass's
  callbacks only when the pass completes, and the pass's pending steps are then dropped with
  it (they are held by the callback alone, which autograd releases with the pass);
- a lookup recomputed inside the backward (activation checkpointing) reads the rows its
  forward read.

Gradient rows held for a pending step may be views of a lookup's reusable buffer; the buffer
is lent to the pass (`Workspace.lend`: a second backward of the same table in the pass gets a
fresh one) and handed back after the step. A nested backward pass (reentrant activation
checkpointing) is a pass of its own and steps when it completes.
"""

from __future__ import annotations

import functools
import weakref

import torch

__all__ = ["defer", "skip"]


class _Pass:
    """The pending steps of one backward pass (one autograd graph task)."""

    def __init__(self):
        self.steps: dict[int, tuple] = {}  # id(optimizer) -> (optimizer, weight, [(rows, grad), ...])
        self.skipped: set[int] = set()
        self.lent: list[tuple] = []  # (workspace, name, buffer)

    def finish(self) -> None:
        for optimizer, weight, parts in self.steps.values():
            optimizer.apply_pass(weight, parts)
        self.steps.clear()
        for workspace, name, buffer in self.lent:
            workspace.give_back(name, buffer)
        self.lent.clear()


# graph task id -> its pass; the only strong reference is the callback autograd holds
_passes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _current() -> _Pass | None:
    """This backward pass's record (None outside a backward pass)."""
    task = torch._C._current_graph_task_id()
    if task < 0:
        return None
    record = _passes.get(task)
    if record is None:
        record = _passes[task] = _Pass()
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_Pass.finish, record))
    return record


def defer(optimizer, weight: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]],
          lend: tuple | None = None) -> None:
    """Apply ``optimizer``'s step to ``weight`` with the gradient ``parts`` (``[(local rows
    int64 [n], gradient rows [n, dim]), ...]``, as `FusedOptimizer.apply_pass` takes them) when
    the running backward pass completes, with every other part of the same optimizer in that
    pass. ``lend``: ``(workspace, name)`` of the buffer the parts may be views of. Outside a
    backward pass, applies at once."""
    record = _current()
    if record is None:
        optimizer.apply_pass(weight, parts)
        return
    key = id(optimizer)
    if key in record.skipped:
        return
    if key in record.steps:
        record.steps[key][2].extend(parts)
    else:
        record.steps[key] = (optimizer, weight, list(parts))
    if lend is not None:
        workspace, name = lend
        buffer = workspace.lend(name)
        if buffer is not None:
            record.lent.append((workspace, name, buffer))


def skip(optimizer) -> None:
    """Skip ``optimizer``'s step in the running backward pass: drop what it has pending and
    whatever later lookups of the pass hand it (a GradScaler's overflow skips the whole step,
    as ``scaler.step`` skips a torch optimizer whose gradient holds inf)."""
    record = _current()
    if record is not None:
        record.skipped.add(id(optimizer))
        record.steps.pop(id(optimizer), None)
