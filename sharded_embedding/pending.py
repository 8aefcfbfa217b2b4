"""Fused optimizer steps wait for the end of the backward pass that computed them.

A lookup's backward computes its rows' gradient (exchanges and replica all-reduces included)
but does not write the rows: it hands the gradient to `defer`, and the steps of one backward
pass are applied together when autograd completes that pass (a callback queued with
``torch.autograd.Variable._execution_engine.queue_callback``, as DDP queues its own), one
optimizer step per table and pass. So, as with ``nn.Embedding`` and a torch optimizer:

- a table looked up several times in one loss takes one step with the sum of the lookups'
  gradients (Adagrad and Adam square the sum, not each part);
- a backward pass that raises anywhere (ranks out of step, an error in the user's own backward
  code) changes no row of any table: autograd runs a pass's callbacks only when the pass
  completes, and the pass's pending steps are then dropped with it (they are held by the
  callback alone, which autograd releases with the pass);
- an inf/NaN gradient without a GradScaler (`fail`) drops the pass's steps and raises at the
  very end of the pass, after every other callback queued in it: DDP's reducer finishes its
  reduction first (raised inside the pass, the error left DDP expecting that reduction, and
  every later forward failed), so the next step works;
- a lookup recomputed inside the backward (activation checkpointing) reads the rows its
  forward read;
- the step uses the hyperparameters every rank agreed on at the lookup (`routing` checks a
  digest of them): a learning rate set between a lookup and its backward applies from the next
  lookup, on every rank alike.

Gradient rows held for a pending step may be views of a lookup's reusable buffer; the buffer
is lent to the pass (`Workspace.lend`: a second backward of the same table in the pass gets a
fresh one) and handed back after the step. A backward pass nested in another on the same thread
(reentrant activation checkpointing: ``checkpoint(..., use_reentrant=True)`` runs one for its
part of the graph) steps with the outer pass: a lookup recomputed there records the outer pass
first (`note_lookup`), and the nested pass's steps join it.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref

import torch

__all__ = ["defer", "skip", "fail"]


class _Pass:
    """The pending steps of one backward pass (one autograd graph task)."""

    def __init__(self):
        self.steps: dict[int, tuple] = {}  # id(optimizer) -> (optimizer, weight, [(rows, grad), ...], hyperparameters)
        self.skipped: set[int] = set()
        self.lent: list[tuple] = []  # (workspace, name, buffer)
        self.thread = threading.get_ident()
        self.done = False
        self.error: BaseException | None = None

    def finish(self) -> None:
        self.done = True
        if self.error is not None:  # no step; raise after the callbacks queued so far (DDP's)
            self.steps.clear()
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_raise, self.error))
        for optimizer, weight, parts, hyperparameters in self.steps.values():
            with optimizer.hyperparameters_set(hyperparameters):
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
        thread = threading.get_ident()
        outer = next((r for r in list(_passes.values()) if r.thread == thread and not r.done), None)
        if outer is not None and _nested():  # in a running pass (reentrant checkpointing): step with it
            _passes[task] = outer
            return outer
        if outer is not None:  # a pass that raised, not yet freed: its steps are never applied
            outer.done = True
        record = _passes[task] = _Pass()
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_Pass.finish, record))
    return record


def _nested() -> bool:
    """Whether this backward pass runs inside another one on this thread: autograd's Python
    entry point is twice on the stack (torch 2.3 and later; else assumed)."""
    entry = getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None)
    if entry is None:
        return True
    code, depth, frame = entry.__code__, 0, sys._getframe()
    while frame is not None:
        depth += frame.f_code is code
        frame = frame.f_back
    return depth >= 2


def note_lookup() -> None:
    """A lookup that will take a fused step was made: if a backward pass is running (activation
    checkpointing recomputes the lookup there), record that pass now, so that the nested pass
    that reentrant checkpointing runs for the lookup's backward steps with it."""
    if torch._C._current_graph_task_id() >= 0:
        _current()


def defer(optimizer, weight: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]],
          lend: tuple | None = None, hyperparameters: dict | None = None) -> None:
    """Apply ``optimizer``'s step to ``weight`` with the gradient ``parts`` (``[(local rows
    int64 [n], gradient rows [n, dim]), ...]``, as `FusedOptimizer.apply_pass` takes them) when
    the running backward pass completes, with every other part of the same optimizer in that
    pass. ``lend``: ``(workspace, name)`` of the buffer the parts may be views of.
    ``hyperparameters``: the step's (the first lookup's of the pass; None: the optimizer's
    current ones). Outside a backward pass, applies at once."""
    record = _current()
    if record is None:
        with optimizer.hyperparameters_set(hyperparameters):
            optimizer.apply_pass(weight, parts)
        return
    key = id(optimizer)
    if key in record.skipped or record.error is not None:
        return
    if key in record.steps:
        record.steps[key][2].extend(parts)
    else:
        record.steps[key] = (optimizer, weight, list(parts), hyperparameters)
    if lend is not None:
        workspace, name = lend
        buffer = workspace.lend(name)
        if buffer is not None:
            record.lent.append((workspace, name, buffer))


def _raise(error: BaseException) -> None:
    raise error


def fail(error: BaseException) -> None:
    """End the running backward pass with ``error`` instead of any fused step: no table of the
    pass steps, and ``error`` is raised when autograd completes the pass, after the callbacks
    queued in it (DDP's reduction), so the backward raises it and the next step works. Outside a
    backward pass, raises at once."""
    record = _current()
    if record is None:
        raise error
    if record.error is None:
        record.error = error
    record.steps.clear()


def skip(optimizer) -> None:
    """Skip ``optimizer``'s step in the running backward pass: drop what it has pending and
    whatever later lookups of the pass hand it (a GradScaler's overflow skips the whole step,
    as ``scaler.step`` skips a torch optimizer whose gradient holds inf)."""
    record = _current()
    if record is not None:
        record.skipped.add(id(optimizer))
        record.steps.pop(id(optimizer), None)
