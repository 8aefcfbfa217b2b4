"""Id laws: how often each row of a table is looked up, and what that means per page.

The planner needs, for every page, the expected number of *distinct* rows a rank asks for in
one lookup of ``draws`` ids: the router deduplicates each rank's ids before the exchange, so a
hot row costs one request per rank and step however often it repeats. With ids drawn
independently from a law ``p`` (row ``i`` with probability ``p_i``), row ``i`` is in a batch of
``B`` ids with probability ``1 - (1 - p_i)^B``, and a page's expectation is the sum over its
rows. Everything here is numpy and works per page: a law over a billion rows is never
materialised per row.

- `Zipf` (``law="zipf:1.05"``): ``p_i ~ (i + 1)^-s`` over ``[0, rows)``, row 0 the hottest (a
  frequency-sorted vocabulary). The head, where ``B p_i`` is not small, is summed row by row;
  the tail uses ``1 - (1 - p)^B ~ 1 - exp(-B p)`` expanded as a power series in ``B p``, whose
  terms are power sums ``sum (i + 1)^-(j s)`` over each page, computed with the Euler-Maclaurin
  formula (Abramowitz & Stegun 23.1.30) in closed form. Planning 1B rows takes milliseconds.
- `Uniform` (``law="uniform"``): ``p_i = 1 / rows``.
- `Counts`: ``p_i = counts_i / sum(counts)`` (a word2vec vocabulary's counts; or the
  frequencies of a sample of id batches, `Counts.from_sample`), summed row by row in chunks.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

import numpy as np

__all__ = ["IdLaw", "Zipf", "Uniform", "Counts", "parse_law", "zipf", "uniform"]

_HEAD_MIN = 16_384  # rows summed exactly before the series takes over (keeps Euler-Maclaurin at x >= 1.6e4)
_HEAD_MAX = 50_000_000  # at most this many rows summed one by one (a few seconds)
_SERIES_BP = 1.0  # the tail series is used where B * p_i <= this
_SERIES_TERMS = 18  # error of the truncated series < 1 / 19! relative
_CHUNK = 1 << 22


class IdLaw(ABC):
    """The probability of each row of a table in one draw of an id."""

    @abstractmethod
    def distinct_per_page(self, num_rows: int, page_size: int, draws: float) -> np.ndarray:
        """Expected distinct rows per page (float64 ``[num_pages]``) among ``draws`` independent
        ids. Raises ValueError if the law does not fit a table of ``num_rows`` rows."""

    def check(self, num_rows: int) -> None:
        """Raise ValueError if the law cannot describe a table of ``num_rows`` rows."""

    def describe(self) -> str:
        return repr(self)


def _distinct_rows(p: np.ndarray, draws: float) -> np.ndarray:
    """``1 - (1 - p)^draws`` per row, accurate for tiny ``p``; a row of ``p = 1`` (a one-row
    law) gives 1 (log1p(-1) = -inf, silenced)."""
    with np.errstate(divide="ignore"):
        return -np.expm1(draws * np.log1p(-np.minimum(p, 1.0)))


def _page_sums(values: np.ndarray, first_row: int, page_size: int, num_pages: int) -> np.ndarray:
    """Per-page sums of ``values`` (rows ``first_row ...``, ``first_row`` a page boundary)."""
    out = np.zeros(num_pages)
    n = values.shape[0]
    full = n // page_size
    p0 = first_row // page_size
    if full:
        out[p0 : p0 + full] = values[: full * page_size].reshape(full, page_size).sum(1)
    if n % page_size:
        out[p0 + full] += values[full * page_size :].sum()
    return out


class Zipf(IdLaw):
    """``P(row i) = (i + 1)^-s / H`` on ``[0, rows)``, ``H = sum_{k=1}^{rows} k^-s``; ``s > 0``."""

    def __init__(self, s: float):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"the Zipf exponent must be a finite number > 0, got {s!r}")
        self.s = float(s)

    def __repr__(self) -> str:
        return f"zipf:{self.s:g}"

    def _normaliser(self, num_rows: int) -> float:
        head = min(num_rows, _HEAD_MIN)
        h = float(np.sum(np.arange(1, head + 1, dtype=np.float64) ** -self.s))
        if num_rows > head:
            h += float(_power_sum(self.s, np.array([head + 1.0]), np.array([float(num_rows)]))[0])
        return h

    def probabilities(self, num_rows: int, first: int, stop: int) -> np.ndarray:
        """``p_i`` for rows ``[first, stop)`` (for tests and small tables)."""
        return np.arange(first + 1, stop + 1, dtype=np.float64) ** -self.s / self._normaliser(num_rows)

    def distinct_per_page(self, num_rows, page_size, draws):
        num_pages = -(-num_rows // page_size)
        h = self._normaliser(num_rows)
        # Rows with draws * p_i > _SERIES_BP are summed one by one, the rest by the series.
        hot = (draws / (_SERIES_BP * h)) ** (1.0 / self.s) if draws > 0 else 0.0
        head = int(min(num_rows, max(_HEAD_MIN, min(hot + 1, _HEAD_MAX))))
        out = np.zeros(num_pages)
        step = max(_CHUNK - _CHUNK % page_size, page_size)
        for a in range(0, head, step):
            b = min(head, a + step)
            p = np.arange(a + 1, b + 1, dtype=np.float64) ** -self.s / h
            out += _page_sums(_distinct_rows(p, draws), a, page_size, num_pages)
        if head < num_rows:
            first_page = head // page_size
            starts = np.arange(first_page, num_pages, dtype=np.float64) * page_size
            lo = np.maximum(starts, head) + 1.0  # 1-based k of the page's rows past the head
            hi = np.minimum(starts + page_size, float(num_rows))
            tail = np.zeros(lo.shape[0])
            coef = 1.0
            for j in range(1, _SERIES_TERMS + 1):  # 1 - e^-x = sum_j (-1)^(j+1) x^j / j!
                coef *= draws / h / j
                tail += (-1) ** (j + 1) * coef * _power_sum(j * self.s, lo, hi)
            out[first_page:] += tail
        return out


class Uniform(IdLaw):
    """``P(row i) = 1 / rows``."""

    def __repr__(self) -> str:
        return "uniform"

    def distinct_per_page(self, num_rows, page_size, draws):
        num_pages = -(-num_rows // page_size)
        rows = np.full(num_pages, float(page_size))
        rows[-1] = num_rows - (num_pages - 1) * page_size
        return rows * -math.expm1(draws * math.log1p(-1.0 / num_rows))


class Counts(IdLaw):
    """``P(row i) = counts[i] / sum(counts)``: per-row counts (int or float, >= 0, one per row)."""

    def __init__(self, counts, name: str = "counts"):
        c = np.asarray(counts)
        if c.ndim != 1 or c.size == 0 or not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)):
            raise ValueError(f"counts must be a non-empty 1-D array of numbers, one per row; got shape {c.shape} "
                             f"and dtype {c.dtype}")
        c = c.astype(np.float64, copy=False)
        if not np.all(np.isfinite(c)) or (c < 0).any():
            raise ValueError("counts must be finite and >= 0")
        total = float(c.sum())
        if total <= 0:
            raise ValueError("counts are all zero: no row is ever looked up")
        self.counts, self.total, self.name = c, total, name

    @classmethod
    def from_sample(cls, sample, num_rows: int) -> Counts:
        """The frequencies of the ids in ``sample`` (a tensor or array of ids, or a sequence of
        id batches). Raises ValueError for ids outside ``[0, num_rows)`` or an empty sample."""
        parts = [sample] if hasattr(sample, "shape") else list(sample)
        ids = [np.asarray(_numpy(x)).reshape(-1) for x in parts]
        ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        if ids.size == 0:
            raise ValueError("sample holds no ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"sample must hold integer ids, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(f"sample holds id {lo if lo < 0 else hi}, outside [0, {num_rows})")
        return cls(np.bincount(ids, minlength=num_rows), name=f"sample of {ids.size:,} ids")

    def __repr__(self) -> str:
        return f"{self.name} ({self.counts.size:,} rows)"

    def check(self, num_rows):
        if self.counts.size != num_rows:
            raise ValueError(f"counts has {self.counts.size} entries but the table has {num_rows} rows: give one "
                             "count per row")

    def distinct_per_page(self, num_rows, page_size, draws):
        self.check(num_rows)
        num_pages = -(-num_rows // page_size)
        out = np.zeros(num_pages)
        step = max(_CHUNK - _CHUNK % page_size, page_size)
        for a in range(0, num_rows, step):
            p = self.counts[a : a + step] / self.total
            out += _page_sums(_distinct_rows(p, draws), a, page_size, num_pages)
        return out


def _numpy(x):
    if hasattr(x, "detach"):  # a torch tensor
        return x.detach().cpu().numpy()
    return x


def _power_sum(t: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``sum_{k=lo}^{hi} k^-t`` (inclusive, ``lo >= ~1e4``) by Euler-Maclaurin with three
    Bernoulli corrections; ``lo``, ``hi`` float arrays, empty ranges (``hi < lo``) give 0."""
    n = hi - lo
    ell = np.log1p(n / lo)  # log(hi / lo), accurate for short ranges
    u = (1.0 - t) * ell
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(np.abs(u) > 1e-12, np.expm1(u) / np.where(u == 0, 1.0, u), 1.0 + u / 2)
    integral = lo ** (1.0 - t) * ell * ratio  # int_lo^hi x^-t dx
    f = lambda x: x**-t  # noqa: E731
    d1 = lambda x: -t * x ** (-t - 1)  # noqa: E731
    d3 = lambda x: -t * (t + 1) * (t + 2) * x ** (-t - 3)  # noqa: E731
    d5 = lambda x: -t * (t + 1) * (t + 2) * (t + 3) * (t + 4) * x ** (-t - 5)  # noqa: E731
    total = (integral + (f(lo) + f(hi)) / 2 + (d1(hi) - d1(lo)) / 12 - (d3(hi) - d3(lo)) / 720
             + (d5(hi) - d5(lo)) / 30240)
    return np.where(n >= 0, total, 0.0)


def zipf(s: float) -> Zipf:
    """The Zipf law of exponent ``s`` over the table's rows, row 0 the hottest."""
    return Zipf(s)


def uniform() -> Uniform:
    return Uniform()


def parse_law(law) -> IdLaw:
    """An `IdLaw` from a law object or a string: ``"zipf:1.05"``, ``"zipf"`` (s = 1.05) or
    ``"uniform"``. Raises ValueError naming what is accepted."""
    if isinstance(law, IdLaw):
        return law
    if isinstance(law, str):
        name, _, arg = law.strip().partition(":")
        name = name.strip().lower()
        if name == "uniform" and not arg:
            return Uniform()
        if name == "zipf":
            try:
                return Zipf(float(arg) if arg else 1.05)
            except ValueError as e:
                raise ValueError(f"law {law!r}: {e}" if "exponent" in str(e) else
                                 f"law {law!r}: the Zipf exponent must be a number, e.g. 'zipf:1.05'") from None
    raise ValueError(f"law {law!r} is not understood: use 'zipf:<s>' (e.g. 'zipf:1.05'), 'uniform', "
                     "or an IdLaw (sharded_embedding.planning.zipf(s), uniform(), Counts(counts))")
