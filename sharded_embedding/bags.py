"""Bags of ids as a `ShardedEmbeddingBagCollection` takes them: checked on the rank that passed
them, then concatenated per table.

One feature's input is any of:

- ``(values, offsets)`` or ``(values, offsets, per_sample_weights)``, ``offsets`` as
  ``torch.nn.EmbeddingBag`` takes them: where each bag starts, and with the collection's
  ``include_last_offset=True`` the end of the last bag as well;
- a mapping ``{"values": ..., "offsets": ... or "lengths": ..., "weights": ...}`` (weights
  optional; ``lengths[i]`` ids in bag ``i``);
- a TorchRec ``JaggedTensor`` (duck-typed: ``values()``, ``lengths()``, ``weights_or_none()``).

All features together: a mapping ``{feature name: input}``, or a TorchRec ``KeyedJaggedTensor``
(duck-typed: ``keys()`` and ``to_dict()``), so torchrec stays optional.

Nothing here communicates. `parse` returns what it found wrong as an `InputError` (a kind and a
text); the collection carries the kind in its request exchange and every rank raises together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import native

__all__ = ["TableBags", "InputError", "parse", "NOT_TYPE", "NOT_IN_RANGE", "NOT_VALID", "REFUSED"]

# Error kinds, by the exception every rank raises (when ranks differ, the lowest kind wins).
REFUSED, NOT_TYPE, NOT_IN_RANGE, NOT_VALID = 1, 2, 3, 4
EXCEPTIONS = {REFUSED: RuntimeError, NOT_TYPE: TypeError, NOT_IN_RANGE: IndexError, NOT_VALID: ValueError}


class InputError(Exception):
    """What is wrong with one rank's input: ``kind`` (`EXCEPTIONS`) and a text naming it."""

    def __init__(self, kind: int, text: str):
        super().__init__(text)
        self.kind, self.text = kind, text


@dataclass
class TableBags:
    """The bags of every feature that reads one table, feature after feature.

    ``values``: int64 ``[n]`` ids. ``offsets``: int64 ``[bags + 1]``, bag ``i`` is
    ``values[offsets[i]:offsets[i + 1]]``. ``weights``: ``[n]`` per-id factors of the
    pooled sum in the table's dtype (the per_sample_weights, or ``1 / len(bag)`` for mean pooling), None for a
    plain sum or a sequence table. ``splits``: per feature, its bags (pooled tables) or its
    ids (sequence tables), to cut the table's output into features.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    splits: list[int]
    pooled: bool
    _bag_of: torch.Tensor | None = None

    @property
    def num_bags(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_outputs(self) -> int:
        """Rows of the table's output: bags, or ids for a sequence table."""
        return self.num_bags if self.pooled else self.values.numel()

    def bag_of(self) -> torch.Tensor:
        """The output row of each id: its bag (pooled), or its position (sequence). Cached."""
        if self._bag_of is None:
            device, n = self.values.device, self.values.numel()
            if not self.pooled:
                self._bag_of = torch.arange(n, device=device)
            else:
                lengths = self.offsets[1:] - self.offsets[:-1]
                self._bag_of = torch.repeat_interleave(torch.arange(self.num_bags, device=device), lengths,
                                                       output_size=n)
        return self._bag_of


def parse(features, tables, include_last_offset: bool, device: torch.device,
          dtypes: list[torch.dtype]) -> list[TableBags]:
    """Check one rank's ``features`` against ``tables`` (each with ``name``,
    ``num_embeddings``, ``pooling``, ``feature_names``; ``dtypes``: their rows' dtypes now, which
    per_sample_weights must have, as in torch.nn.EmbeddingBag) and concatenate them per table.
    Raises `InputError` (never anything else) for what is wrong: an exception of the input's
    own (a malformed KeyedJaggedTensor, a tensor that cannot move to ``device``) becomes a
    ValueError-kind `InputError` naming it, so that it travels to every rank too."""
    try:
        return _parse(features, tables, include_last_offset, device, dtypes)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the input raises must reach every rank alike
        raise InputError(NOT_VALID, f"the input could not be read: {type(e).__name__}: {e}") from e


def _parse(features, tables, include_last_offset: bool, device: torch.device, dtypes) -> list[TableBags]:
    given = _as_dict(features)
    known = [f for t in tables for f in t.feature_names]
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        raise InputError(NOT_VALID, f"features {unknown} are not read by any table (known: {known})")
    missing = [f for f in known if f not in given]
    if missing:
        raise InputError(NOT_VALID, f"features {missing} are missing: every call passes every feature "
                                    "(an empty bag, or no bags at all, is fine)")
    out, batch = [], {}
    for t, dtype in zip(tables, dtypes):
        parts = [(f, *_feature(f, given[f], include_last_offset, device, dtype)) for f in t.feature_names]
        for f, values, offsets, weights in parts:
            if weights is not None and t.pooling != "sum":
                raise InputError(NOT_VALID, f"feature {f!r} comes with per_sample_weights, but table {t.name!r} "
                                            f"has pooling={t.pooling!r}: weights need pooling='sum' (as in "
                                            "torch.nn.EmbeddingBag)")
            if t.pooling is not None:
                batch[f] = offsets.numel() - 1
        out.append(_concatenate(t, parts, dtype))
    if len(set(batch.values())) > 1:
        raise InputError(NOT_VALID, f"pooled features have different numbers of bags (batch sizes) {batch}: "
                                    "every pooled feature of a call has one bag per sample, as in a KeyedJaggedTensor")
    _check_ranges(tables, out)
    return out


def _as_dict(features) -> dict:
    if isinstance(features, Mapping):
        return dict(features)
    if callable(getattr(features, "to_dict", None)) and callable(getattr(features, "keys", None)):
        keys = list(features.keys())
        if len(set(keys)) != len(keys):  # to_dict would keep the last of each, silently
            repeated = sorted({k for k in keys if keys.count(k) > 1})
            raise InputError(NOT_VALID, f"the KeyedJaggedTensor repeats the keys {repeated}: each feature once")
        lengths = features.lengths() if callable(getattr(features, "lengths", None)) else None
        if lengths is not None and lengths.numel() == 0 and features.values().numel() == 0:
            # an empty batch: torchrec's to_dict fails on it (IndexError)
            values, none = features.values(), torch.zeros(0, dtype=lengths.dtype, device=lengths.device)
            weights = features.weights_or_none() if callable(getattr(features, "weights_or_none", None)) else None
            return {k: {"values": values[:0], "lengths": none, **({"weights": weights[:0]} if weights is not None
                                                                    else {})} for k in features.keys()}
        return dict(features.to_dict())  # a KeyedJaggedTensor: {key: JaggedTensor}
    raise InputError(NOT_TYPE, "features must be a mapping {feature name: (values, offsets[, weights])} or a "
                               f"torchrec KeyedJaggedTensor, got {type(features).__name__}")


def _feature(name: str, x, include_last_offset: bool, device: torch.device, dtype: torch.dtype):
    """(values int64 [n], offsets int64 [bags + 1], weights ``dtype`` [n] or None) of one feature."""
    offsets = lengths = weights = None
    if isinstance(x, Mapping):
        extra = sorted(set(x) - {"values", "offsets", "lengths", "weights"}, key=str)
        if extra or "values" not in x or ("offsets" in x) == ("lengths" in x):
            raise InputError(NOT_VALID, f"feature {name!r}: a mapping takes 'values', then 'offsets' or 'lengths' "
                                        f"(one of them), and optionally 'weights'; got keys {sorted(x, key=str)}")
        values, offsets, lengths, weights = x["values"], x.get("offsets"), x.get("lengths"), x.get("weights")
    elif callable(getattr(x, "values", None)) and callable(getattr(x, "lengths", None)):
        values, lengths = x.values(), x.lengths()  # a JaggedTensor
        weights = x.weights_or_none() if callable(getattr(x, "weights_or_none", None)) else None
    elif isinstance(x, (tuple, list)) and len(x) in (2, 3):
        values, offsets = x[0], x[1]
        weights = x[2] if len(x) == 3 else None
    else:
        raise InputError(NOT_TYPE, f"feature {name!r}: expected (values, offsets), (values, offsets, weights), a "
                                   f"mapping or a JaggedTensor, got {type(x).__name__}")
    values = _integers(name, "values", values, device)
    n = values.numel()
    if lengths is not None:
        lengths = _integers(name, "lengths", lengths, device)
        if lengths.numel() and int(lengths.min()) < 0:
            raise InputError(NOT_VALID, f"feature {name!r}: negative lengths")
        if int(lengths.sum()) != n:
            raise InputError(NOT_VALID, f"feature {name!r}: lengths add up to {int(lengths.sum())}, but there are "
                                        f"{n} values")
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    else:
        offsets = _offsets(name, _integers(name, "offsets", offsets, device), n, include_last_offset)
    if weights is not None:
        weights = _weights(name, weights, n, device, dtype)
    return values, offsets, weights


def _integers(name: str, what: str, x, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):  # as torch.nn.EmbeddingBag: no lists, no numpy arrays
        raise InputError(NOT_TYPE, f"feature {name!r}: {what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):  # what torch.nn.EmbeddingBag takes
        raise InputError(NOT_TYPE, f"feature {name!r}: {what} of dtype {x.dtype}; they must be torch.int64 or "
                                   "torch.int32 (what torch.nn.EmbeddingBag takes)")
    if x.dim() != 1:
        raise InputError(NOT_VALID, f"feature {name!r}: {what} must be 1-D, got shape {tuple(x.shape)}")
    _readable(name, what, x)
    return x.to(device=device, dtype=torch.int64)


def _readable(name: str, what: str, x: torch.Tensor) -> None:
    """A tensor whose storage does not hold its values (freed, or never allocated): PyTorch's
    CPU kernels would read it raw (and crash on this rank alone); or one without storage."""
    if not native.holds_data(x):
        raise InputError(NOT_VALID, f"feature {name!r}: the {what} tensor's storage does not hold its values (freed, "
                                    "or not allocated, or a torch.func transform's wrapper)")


def _offsets(name: str, offsets: torch.Tensor, n: int, include_last_offset: bool) -> torch.Tensor:
    """Check ``offsets`` as torch.nn.EmbeddingBag does; returns them with the final end."""
    where = f"feature {name!r}: offsets"
    if include_last_offset and offsets.numel() == 0:
        raise InputError(NOT_VALID, f"{where} are empty, but with include_last_offset=True they end with the "
                                    f"end of the last bag ({n})")
    if offsets.numel() == 0:
        if n:
            raise InputError(NOT_VALID, f"{where} are empty (no bags) but there are {n} values")
        return offsets.new_zeros(1)
    first, last = offsets[0].item(), offsets[-1].item()
    if first != 0:
        raise InputError(NOT_VALID, f"{where} must start at 0 (the first bag starts at the first value), got {first}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise InputError(NOT_VALID, f"{where} must not decrease")
    if include_last_offset:
        if last != n:
            raise InputError(NOT_VALID, f"{where} must end with the number of values ({n}) under "
                                        f"include_last_offset=True, got {last}")
        return offsets
    if last > n:
        raise InputError(NOT_VALID, f"{where} go up to {last}, past the {n} values")
    return torch.cat([offsets, offsets.new_full((1,), n)])


def _weights(name: str, weights, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    where = f"feature {name!r}: per_sample_weights"
    if not isinstance(weights, torch.Tensor):
        raise InputError(NOT_TYPE, f"{where} must be a tensor, got {type(weights).__name__}")
    if weights.dtype != dtype:  # torch.nn.EmbeddingBag: the dtype of the table's rows
        raise InputError(NOT_TYPE, f"{where} of dtype {weights.dtype}; they must be {dtype}, the dtype of "
                                   "the table's rows (as torch.nn.EmbeddingBag requires)")
    if weights.requires_grad:
        raise InputError(NOT_VALID, f"{where} require grad, and gradients with respect to per_sample_weights "
                                    "are not supported: pass weights.detach()")
    if tuple(weights.shape) != (n,):
        raise InputError(NOT_VALID, f"{where} have shape {tuple(weights.shape)}; one weight per value is ({n},)")
    _readable(name, "per_sample_weights", weights)
    weights = weights.to(device=device)
    if n and not bool(torch.isfinite(weights).all()):
        raise InputError(NOT_VALID, f"{where} hold inf or NaN")
    return weights


def _concatenate(table, parts, dtype: torch.dtype) -> TableBags:
    """One table's features, one after the other."""
    values = [v for _, v, _, _ in parts]
    offsets, at = [], 0
    for _, v, o, _ in parts:
        offsets.append(o[:-1] + at)
        at += v.numel()
    device = values[0].device
    offsets.append(torch.tensor([at], dtype=torch.int64, device=device))
    offsets = torch.cat(offsets)
    pooled = table.pooling is not None
    splits = [o.numel() - 1 if pooled else v.numel() for _, v, o, _ in parts]
    weights = None
    if table.pooling == "sum" and any(w is not None for _, _, _, w in parts):
        weights = torch.cat([w if w is not None else torch.ones(v.numel(), dtype=dtype, device=device)
                             for _, v, _, w in parts])
    elif table.pooling == "mean":
        lengths = offsets[1:] - offsets[:-1]
        weights = torch.repeat_interleave(1.0 / lengths.clamp_min(1).to(dtype), lengths, output_size=at)
    return TableBags(torch.cat(values), offsets, weights, splits, pooled)


def _check_ranges(tables, bags: list[TableBags]) -> None:
    """Every id inside its table (one device sync for all tables)."""
    ends = []
    for b in bags:
        v = b.values
        ends.append(torch.stack(torch.aminmax(v)) if v.numel() else torch.tensor([0, 0], device=v.device))
    if not ends:
        return
    lo_hi = torch.stack(ends).tolist()
    for t, b, (lo, hi) in zip(tables, bags, lo_hi):
        if lo >= 0 and hi < t.num_embeddings:
            continue
        for f in t.feature_names:  # only on the error path: find the feature and the id
            bad = None
            for value in _feature_values(t, b, f):
                bad = value
                break
            if bad is not None:
                raise InputError(NOT_IN_RANGE, f"feature {f!r}: index {bad} is out of range for table {t.name!r} of "
                                               f"{t.num_embeddings} rows (valid: 0..{t.num_embeddings - 1})")


def _feature_values(table, bags: TableBags, feature: str):
    """The out-of-range ids of ``feature`` in ``bags`` (error path only)."""
    at = 0
    for f, n in zip(table.feature_names, _values_per_feature(table, bags)):
        if f == feature:
            v = bags.values[at : at + n]
            yield from v[(v < 0) | (v >= table.num_embeddings)][:1].tolist()
            return
        at += n


def _values_per_feature(table, bags: TableBags) -> list[int]:
    if not bags.pooled:
        return bags.splits
    ends, at, out = bags.offsets.tolist(), 0, []
    for n in bags.splits:
        out.append(ends[at + n] - ends[at])
        at += n
    return out
