"""The compiled per-id loops (`_scatter`, from csrc/scatter.c), and when they are used.

The package builds one small C extension at install (setup.py; C compiler and Python's
headers only, no PyTorch headers). The library uses it (`available`) where it was built, is
not turned off (``SHARDED_EMBEDDING_NATIVE=0``) and the process runs one intra-op thread
(``torch.get_num_threads() == 1``, which torchrun sets for several processes per node): its
loops are single-threaded, and with more threads PyTorch's parallel kernels are the faster
choice. Otherwise PyTorch's and numpy's kernels do the same work: the same values, except
that the owner's SGD step of bags pooled there adds a row's gradients in another order, and
with fused multiply-adds where the CPU has them (AVX2, AVX-512), and the lookup's gradient
sums (`bag_sum`) add their scaled terms with them too: the last bits of either can differ.
"""

from __future__ import annotations

import os

import torch
from torch.autograd.graph import increment_version

try:
    from . import _scatter
except ImportError:  # no C compiler at install: PyTorch's kernels do the same work
    _scatter = None

__all__ = ["built", "available", "supports", "plain_memory", "index_add_", "index_select", "bag_sum", "bag_scatter_add",
           "PooledGradient", "destinations", "partition_bags", "dedup", "holds_data"]


def built() -> bool:
    """Whether the extension is built and not turned off (``SHARDED_EMBEDDING_NATIVE=0``): the
    functions below can be called."""
    return _scatter is not None and os.environ.get("SHARDED_EMBEDDING_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the library uses the compiled loops now: `built`, and one intra-op thread."""
    return built() and torch.get_num_threads() == 1


def _takes(weight: torch.Tensor, checked: bool = False) -> bool:
    """A table the compiled loops write: CPU float32, contiguous, 2-D (``checked``: its
    storage is known to hold its elements, `holds_data`)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.is_contiguous() and not weight.is_neg() and (checked or holds_data(weight)))


def supports(weight: torch.Tensor) -> bool:
    """Whether the library updates ``weight`` with the compiled loops now (`available`, and a
    CPU float32, contiguous, 2-D tensor)."""
    return available() and _takes(weight)


def _require_built(what: str) -> None:
    if not built():
        raise RuntimeError(f"{what}: sharded_embedding._scatter is not built (or SHARDED_EMBEDDING_NATIVE=0)")


def holds_data(t: torch.Tensor) -> bool:
    """Whether a CPU tensor's storage holds its elements where ``data_ptr()`` says (not freed or
    never allocated: the C loops, and some of PyTorch's CPU kernels, read raw memory and
    crash); False for a tensor without storage (a torch.func transform's wrapper). Other
    devices: True (not read here)."""
    numel = t.numel()
    if t.device.type != "cpu" or not numel or t._is_zerotensor():  # zeros without memory read as zeros
        return True
    try:
        if t.data_ptr() == 0:
            return False
        extent = numel if t.is_contiguous() else 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
        return t.untyped_storage().nbytes() >= (t.storage_offset() + extent) * t.element_size()
    except RuntimeError:  # "Cannot access data pointer of Tensor that doesn't have storage" (vmap's)
        return False


def _require_data(what: str, *tensors) -> None:
    """TypeError when a tensor's storage does not hold its elements (freed, or not allocated):
    checked before any conversion, as a copy would read the memory too."""
    if not all(t is None or holds_data(t) for t in tensors):
        raise TypeError(f"{what}: a tensor's storage does not hold its elements (freed, or not allocated)")


def _raw(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` as plain contiguous memory for the C loops: a negative-bit view's values and an
    efficient zero tensor's zeros made real. TypeError when its storage does not hold its
    elements (freed, or not allocated)."""
    _require_data(what, t)
    if t._is_zerotensor():
        t = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return t.resolve_neg().contiguous()


@torch.no_grad()
def bag_scatter_add(weight: torch.Tensor, ids: torch.Tensor, first: torch.Tensor, weights: torch.Tensor | None,
                    scale: float, grads: torch.Tensor) -> None:
    """``weight[ids[i]] += scale * weights[i] * grads[pair(i)]`` for every id in order, in
    place, where ``pair(i)`` counts the bag starts up to ``i`` (``first``) minus one: the SGD
    update of bags pooled on their owner, one pass over the ids, no sort and no per-row sums.

    ``weight``: float32 [rows, dim], contiguous, CPU. ``ids``: int32 [n] rows of
    ``weight``. ``first``: bool [n], True where a bag starts (``first[0]`` True when n > 0).
    ``weights``: float32 [n] or None (ones). ``grads``: [pairs, dim] one row per bag, pairs =
    the number of starts. Raises ValueError (nothing written) when an id is outside
    ``weight`` or the starts do not match ``grads``; TypeError for a dtype, device or layout
    it does not take (grads sharing ``weight``'s memory included); RuntimeError when the
    extension is not `built`."""
    _require_built("bag_scatter_add")
    if not _takes(weight):
        raise TypeError(f"bag_scatter_add: weight must be a contiguous 2-D float32 CPU tensor, got "
                        f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    if ids.dtype != torch.int32 or first.dtype != torch.bool:
        raise TypeError(f"bag_scatter_add: ids must be int32 and first bool, got {ids.dtype} and {first.dtype}")
    n, dim = ids.numel(), weight.shape[1]
    _require_data("bag_scatter_add", ids, first, weights, grads)
    grads = _raw(grads.to(torch.float32), "bag_scatter_add")
    ids, first = _raw(ids, "bag_scatter_add"), _raw(first, "bag_scatter_add")
    if weights is not None:
        weights = _raw(weights.to(torch.float32), "bag_scatter_add")
    if (any(t.device.type != "cpu" for t in (ids, first, grads)) or ids.dim() != 1 or first.shape != (n,)
            or grads.dim() != 2 or grads.shape[1] != dim or (weights is not None and weights.shape != (n,))):
        raise TypeError(f"bag_scatter_add: expected ids [n], first [n], weights [n] or None and grads [pairs, {dim}] "
                        f"on the CPU; got {tuple(ids.shape)}, {tuple(first.shape)}, "
                        f"{None if weights is None else tuple(weights.shape)}, {tuple(grads.shape)}")
    if grads.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
        raise TypeError("bag_scatter_add: grads share memory with weight (rows would read updates made before them)")
    _scatter.bag_scatter_add(weight.data_ptr(), weight.shape[0], dim, ids.data_ptr(), first.data_ptr(),
                             0 if weights is None else weights.data_ptr(), float(scale), grads.data_ptr(),
                             grads.shape[0], n)
    increment_version(weight)  # as an in-place torch op: autograd sees that saved copies are stale


class PooledGradient:
    """The gradient of one requester's bags pooled on this owner, kept in pooled form: each
    id's gradient row is its bag's (``grads``, one row per bag) times its weight and
    ``scale``. A fused SGD step adds it to the table in one pass (`bag_scatter_add`) instead
    of summing it per row first; `FusedOptimizer.apply_parts` takes it beside ``(rows,
    grad)`` parts."""

    __slots__ = ("ids", "first", "weights", "scale", "grads", "on_step")

    def __init__(self, ids: torch.Tensor, first: torch.Tensor, weights: torch.Tensor | None, scale: float,
                 grads: torch.Tensor, on_step=None):
        self.ids, self.first, self.weights, self.scale, self.grads = ids, first, weights, scale, grads
        self.on_step = on_step  # called with the number of ids once they are applied (stats)

    def add_to(self, weight: torch.Tensor) -> None:
        bag_scatter_add(weight, self.ids, self.first, self.weights, self.scale, self.grads)
        if self.on_step is not None:
            self.on_step(self.ids.numel())


def partition_bags(offsets: torch.Tensor, dest: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None,
                   counts: list[int], world: int):
    """The requester's packing of one table's bags pooled on their owners, in one counting
    sort: each id to its serving rank's bucket (``dest``: 0..world-1 a peer, ``world`` this
    rank), bags kept in order, and the first id of each bag in each bucket flagged (it starts a
    pair: one partial sum comes back for it).

    ``offsets``: int64 [bags + 1] (the last one = n). ``dest``: uint8 or int32 [n]. ``rows``:
    int64 [n], each id's local row at its server (< 2^31). ``weights``: float [n] or None.
    ``counts``: ids per bucket (world + 1 ints). Returns (payload int64 [peers' ids] in bucket
    order: low word the row with bit 31 on a pair's first id, high word the float32 weight's
    bits or 0; own (rows int32, first bool, weights float32 or None) of this rank's ids; pairs
    per bucket, list of world + 1 ints; pair_bag int64 [pairs]: each pair's bag). The same
    values as `bag_routing.BagRouter._pooled_on_owner`'s torch passes. Raises ValueError when a
    destination or row is out of range or ``counts`` is wrong."""
    n, num_bags = rows.numel(), offsets.numel() - 1
    _require_built("partition_bags")
    integral = all(not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool
                   for t in (offsets, rows))
    if (dest.dtype not in (torch.uint8, torch.int32) or dest.shape != (n,) or num_bags < 0 or len(counts) != world + 1
            or not integral or rows.dim() != 1 or (weights is not None and weights.shape != (n,))):
        raise TypeError(f"partition_bags: integer offsets [bags + 1] and rows [n], dest uint8/int32 [n] and weights "
                        f"[n] or None expected, got offsets {offsets.dtype} {tuple(offsets.shape)}, rows {rows.dtype} "
                        f"{tuple(rows.shape)}, dest {dest.dtype} {tuple(dest.shape)}, weights "
                        f"{None if weights is None else tuple(weights.shape)}")
    _require_data("partition_bags", offsets, dest, rows, weights)
    offsets, dest, rows = (_raw(t, "partition_bags") for t in (offsets.to(torch.int64), dest, rows.to(torch.int64)))
    if weights is not None:
        weights = _raw(weights.to(torch.float32), "partition_bags")
    if any(c < 0 for c in counts) or sum(counts) != n:
        raise ValueError(f"partition_bags: the counts per rank {counts} do not add up to the {n} ids")
    own_n = counts[world]
    payload = torch.empty(n - own_n, dtype=torch.int64)
    own_rows = torch.empty(own_n, dtype=torch.int32)
    own_first = torch.empty(own_n, dtype=torch.bool)
    own_weights = torch.empty(own_n, dtype=torch.float32) if weights is not None else None
    pairs = torch.empty(world + 1, dtype=torch.int64)
    pair_bag = torch.empty(n, dtype=torch.int64)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    work = torch.empty(4 * (world + 1), dtype=torch.int64)
    _scatter.partition_bags(n, num_bags, offsets.data_ptr(), dest.data_ptr(), dest.element_size(), rows.data_ptr(),
                            0 if weights is None else weights.data_ptr(), world, counts_t.data_ptr(),
                            payload.data_ptr(), own_rows.data_ptr(), own_first.data_ptr(),
                            0 if own_weights is None else own_weights.data_ptr(), pairs.data_ptr(),
                            pair_bag.data_ptr(), work.data_ptr())
    pairs = pairs.tolist()
    return payload, (own_rows, own_first, own_weights), pairs, pair_bag[: sum(pairs)].clone()  # (frees n)


def index_add_(weight: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weight.index_add_(0, rows, values)``: compiled where `supports` (``weight``) and
    ``values`` is float32 (the same additions in the same order as PyTorch's CPU kernel, so
    the same bits, at 1.2-2x its one-thread speed for rows of 16-128 floats), else PyTorch's.
    ``rows``: int64 or int32 [n]; ``values``: [n, dim]. Anything else (other dtypes, values
    that share ``weight``'s memory, rows outside ``weight``, tensors autograd records with
    grad mode on) goes to PyTorch's kernel, which takes, refuses or raises as it does; CPU
    tensors whose storage does not hold their elements raise RuntimeError whatever runs
    (PyTorch's kernel reads them raw, and crashes)."""
    if not (holds_data(weight) and holds_data(rows) and holds_data(values)):  # PyTorch's kernel reads them raw too
        raise RuntimeError("index_add_: a tensor's storage does not hold its elements (freed, or not allocated)")
    tracked = torch.is_grad_enabled() and (weight.requires_grad or values.requires_grad)  # autograd's to record
    if not (not tracked and available() and _takes(weight, checked=True) and weight.shape[1] > 0
            and values.dtype == torch.float32
            and values.device.type == "cpu" and values.dim() == 2 and values.shape[1] == weight.shape[1]
            and rows.dim() == 1 and rows.shape == values.shape[:1] and rows.dtype in (torch.int32, torch.int64)
            and values.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()):
        return weight.index_add_(0, rows, values)  # what PyTorch takes, refuses or raises, as it does
    rows = rows.to(torch.int64)
    if rows.is_neg() or rows._is_zerotensor() or values.is_neg() or values._is_zerotensor():
        return weight.index_add_(0, rows, values)  # PyTorch reads their values as it does
    rows, values = rows.contiguous(), values.contiguous()
    try:
        _scatter.index_add(weight.data_ptr(), weight.shape[0], weight.shape[1], rows.data_ptr(), values.data_ptr(),
                           rows.numel())
    except IndexError:  # nothing written: let PyTorch raise its own error for it
        return weight.index_add_(0, rows, values)
    increment_version(weight)
    return weight


_GATHERED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def plain_memory(t: torch.Tensor) -> bool:
    """Whether the C loops may read ``t`` as raw memory: a CPU, strided, contiguous tensor
    whose storage holds its elements (a few attribute reads: `index_select` runs per lookup;
    False for a tensor without storage, a torch.func wrapper's or a fake one)."""
    try:
        return (t.is_cpu and t.layout == torch.strided and t.is_contiguous() and not t.is_neg()
                and not t._is_zerotensor()
                and t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size())
    except RuntimeError:
        return False


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous CPU tensors share a byte (empty ones share none)."""
    if not a.numel() or not b.numel():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def index_select(table: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.index_select(table, 0, rows, out=out)``: compiled where `available` and the
    tensors are plain CPU memory (``table``: 2-D contiguous float32/float16/bfloat16/float64,
    ``rows``: 1-D int64 or int32, ``out``: None or contiguous ``[n, dim]`` of ``table``'s
    dtype, apart from both), else PyTorch's. The same rows, bit for bit (a copy); the compiled
    loop asks for each row 16 rows ahead, so that rows at random places of a table far larger
    than the caches arrive together (`benchmarks/row_kernels.py`). Returns ``out`` (a new tensor
    when None). Anything else (rows outside the table, a table autograd records with grad mode
    on, other dtypes or layouts) goes to PyTorch's kernel, which takes, refuses or raises as
    it does; CPU tensors whose storage does not hold their elements raise RuntimeError
    whatever runs (PyTorch's kernel reads a partly freed storage raw, and crashes)."""
    try:
        compiled = (rows.dim() == 1 and rows.dtype in (torch.int32, torch.int64) and table.dim() == 2
                    and table.dtype in _GATHERED and table.shape[1] > 0 and plain_memory(table) and plain_memory(rows)
                    and not (table.requires_grad and torch.is_grad_enabled()) and available()
                    and (out is None or (out.dtype == table.dtype and out.shape == (rows.shape[0], table.shape[1])
                                         and not out.requires_grad and plain_memory(out)
                                         and not _overlap(out, table) and not _overlap(out, rows))))
    except RuntimeError:  # a tensor without storage (a torch.func wrapper's, a fake one)
        compiled = False
    if compiled:
        result = torch.empty(rows.shape[0], table.shape[1], dtype=table.dtype) if out is None else out
        try:
            _scatter.gather(result.data_ptr(), table.data_ptr(), table.shape[0], table.shape[1] * table.element_size(),
                            rows.data_ptr(), rows.element_size(), rows.shape[0])
        except IndexError:  # nothing written: PyTorch raises its own error for it below
            compiled = False
    if not compiled:
        if not (holds_data(table) and holds_data(rows) and (out is None or holds_data(out))):
            raise RuntimeError("index_select: a tensor's storage does not hold its elements (freed, or not allocated)")
        return torch.index_select(table, 0, rows) if out is None else torch.index_select(table, 0, rows, out=out)
    if out is not None:
        increment_version(out)
    return result


def bag_sum(grad: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, scale: float, first: torch.Tensor,
            rest: torch.Tensor) -> bool:
    """Each unique id's gradient, written where it goes next, in one pass: ``row u = sum(scale
    * grad[perm[offsets[u] : offsets[u + 1]]])`` (the last bag runs to the end of ``perm``)
    into ``first[u]`` for ``u < len(first)``, else into ``rest[u - len(first)]``. What
    ``F.embedding_bag(perm, grad, offsets, mode="sum")``, a copy of its first rows into the
    exchange's outbox and a sum for the non-finite flag take three passes for (the backward's
    gradient sum, `lookup.ShardedLookup.backward`). Returns whether every value written is
    finite (no inf, no NaN).

    ``grad``: float32 [n, dim]; ``perm``: int64 [n], each position once per bag;
    ``offsets``: int64 [bags], the bag starts, strictly increasing from 0 (bags >= 1 when
    n >= 1); ``first``: float32 [split, dim], ``rest``: float32 [bags - split, dim]; all CPU
    and contiguous, ``first`` and ``rest`` overlapping no other argument. A bag's terms are
    scaled, then added in ``perm``'s order, as embedding_bag's per-sample weights do (the last
    bits can differ: fused multiply-adds where the CPU has them). Raises ValueError (nothing
    written) for a position or a bag start out of range, TypeError for dtypes, devices,
    layouts, shapes or overlaps it does not take, RuntimeError when the extension is not
    `built`."""
    _require_built("bag_sum")
    n = perm.shape[0] if perm.dim() == 1 else -1
    dim = grad.shape[1] if grad.dim() == 2 else -1
    bags = offsets.shape[0] if offsets.dim() == 1 else -1
    if not (grad.dtype == first.dtype == rest.dtype == torch.float32 and perm.dtype == offsets.dtype == torch.int64
            and grad.shape == (n, dim) and dim > 0 and bags >= 0 and first.dim() == 2 and rest.dim() == 2
            and first.shape[1] == rest.shape[1] == dim and first.shape[0] + rest.shape[0] == bags
            and all(map(plain_memory, (grad, perm, offsets, first, rest)))
            and not any(_overlap(args[i], args[j]) for args in [(first, rest, grad, perm, offsets)]
                        for i in (0, 1) for j in range(5) if j != i)):  # (by position: a tensor passed twice too)
        raise TypeError("bag_sum: expected contiguous CPU tensors holding their elements: float32 grad [n, dim], int64 "
                        "perm [n] and offsets [bags], float32 first [split, dim] and rest [bags - split, dim] "
                        "overlapping no other argument (nor each other); got grad "
                        f"{grad.dtype} {tuple(grad.shape)}, perm {perm.dtype} {tuple(perm.shape)}, "
                        f"offsets {offsets.dtype} {tuple(offsets.shape)}, first {first.dtype} {tuple(first.shape)}, "
                        f"rest {rest.dtype} {tuple(rest.shape)}")
    finite = _scatter.bag_sum(first.data_ptr(), rest.data_ptr(), first.shape[0], grad.data_ptr(), dim,
                              perm.data_ptr(), n, offsets.data_ptr(), bags, float(scale))
    increment_version(first)
    increment_version(rest)
    return finite


def destinations(ids: torch.Tensor, dest_of_page: torch.Tensor, shift: torch.Tensor, page_size: int,
                 buckets: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each id's serving rank and local row there, and the ids per serving rank, in one pass:
    ``dest_of_page[page]``, ``shift[page] + id`` and their bincount, with ``page = id //
    page_size`` (what `routing.Router.destinations` and a bincount compute in five passes).

    ``ids``: integer [n] (TypeError otherwise), each ``>= 0`` and on a page of ``dest_of_page``. ``dest_of_page``:
    uint8 or int32 [pages], values in ``[0, buckets)``. ``shift``: int64 [pages]. Returns
    (dest [n], ``dest_of_page``'s dtype; rows int64 [n]; counts, a list of ``buckets`` ints).
    Raises ValueError when an id or a destination is out of range."""
    _require_built("destinations")
    if dest_of_page.dtype not in (torch.uint8, torch.int32) or shift.shape != dest_of_page.shape:
        raise TypeError(f"destinations: dest_of_page uint8/int32 and shift int64 of one length expected, got "
                        f"{dest_of_page.dtype} {tuple(dest_of_page.shape)} and {tuple(shift.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"destinations: ids must be integers, got {ids.dtype}")
    _require_data("destinations", ids, dest_of_page, shift)
    ids = _raw(ids.reshape(-1).to(torch.int64), "destinations")
    dest_of_page, shift = _raw(dest_of_page, "destinations"), _raw(shift.to(torch.int64), "destinations")
    n = ids.numel()
    dest = torch.empty(n, dtype=dest_of_page.dtype)
    rows = torch.empty(n, dtype=torch.int64)
    counts = torch.empty(buckets, dtype=torch.int64)
    bits = page_size.bit_length() - 1 if page_size & (page_size - 1) == 0 else -1
    _scatter.destinations(n, ids.data_ptr(), page_size, bits, dest_of_page.data_ptr(), dest_of_page.element_size(),
                          shift.data_ptr(), shift.numel(), dest.data_ptr(), rows.data_ptr(), counts.data_ptr(),
                          buckets)
    return dest, rows, counts.tolist()


def dedup(ids: torch.Tensor, bound: int, *, limit: int | None = None, page_offset: torch.Tensor | None = None,
          page_size: int = 1, stride: int = 0, buckets: int = 0):
    """The requester's routing of one lookup in one compiled sort: each id's key, then the
    values of a stable sort and ``unique_consecutive`` (what `routing.Router` computes in
    PyTorch and numpy passes). An LSD radix sort over the key's bits (Knuth, TAOCP vol. 3,
    5.2.5), stable, so each unique key's positions come in order.

    ``ids``: int32 or int64 [n] on the CPU, each in ``[0, limit)`` (``limit`` defaults to
    ``bound``). The key of an id is ``id + page_offset[id // page_size]`` with a page table
    (``page_offset``: int32 [pages]), else the id; each key must lie in ``[0, bound)``, ``bound
    <= 2**31``. With ``stride > 0``, the unique keys come back split: ``key % stride``, and the
    unique keys per ``key // stride`` (``buckets`` of them).

    Returns (unique keys in ascending order, int64 [u] -- ``key % stride`` with a stride; perm,
    int64 [n]: the stable sort's permutation, each unique key's positions in order; offsets,
    int64 [u]: where each unique key's positions start in perm; gather_index, int64 [n]: the
    unique number of each position; counts, a list of ``buckets`` ints, or None without a
    stride). Raises IndexError when an id is outside ``[0, limit)`` (`routing` then finds
    which), ValueError when a key is outside ``[0, bound)`` or ``// stride`` past ``buckets``
    or a size is out of range, TypeError for other types, dtypes, shapes or devices (or a
    storage that does not hold the tensor's elements), RuntimeError when the extension is not
    `built`."""
    _require_built("dedup")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1 \
            or ids.device.type != "cpu":
        raise TypeError(f"dedup: ids must be a 1-D int32 or int64 CPU tensor, got {ids!r:.80}")
    if page_offset is not None and (not isinstance(page_offset, torch.Tensor) or page_offset.dtype != torch.int32
                                    or page_offset.dim() != 1 or page_offset.device.type != "cpu"):
        raise TypeError(f"dedup: page_offset must be a 1-D int32 CPU tensor, got {page_offset!r:.80}")
    limit = bound if limit is None else limit
    if (not 1 <= bound <= 2**31 or not 1 <= page_size < 2**62 or not 0 <= stride <= 2**31 or limit < 0
            or (stride and not 1 <= buckets <= 2**31)):
        raise ValueError(f"dedup: bound must be in [1, 2**31], page_size >= 1, limit >= 0 and buckets >= 1 with a "
                         f"stride; got bound {bound}, page_size {page_size}, limit {limit}, stride {stride}, "
                         f"buckets {buckets}")
    limit = min(limit, 2**62)
    if page_offset is not None:
        page_offset = _raw(page_offset, "dedup")
        limit = min(limit, page_offset.numel() * page_size)  # an id past the table's pages is out of range
    ids = _raw(ids, "dedup")
    n = ids.numel()
    perm, gather_index = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    unique, offsets = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    counts = torch.empty(buckets, dtype=torch.int64) if stride else None
    bits = page_size.bit_length() - 1 if page_size & (page_size - 1) == 0 else -1
    u = _scatter.dedup(n, ids.data_ptr(), ids.element_size(), limit,
                       0 if page_offset is None else page_offset.data_ptr(), bits, page_size, bound, stride, buckets,
                       perm.data_ptr(), gather_index.data_ptr(), unique.data_ptr(), offsets.data_ptr(),
                       0 if counts is None else counts.data_ptr())
    return unique[:u], perm, offsets[:u], gather_index, None if counts is None else counts.tolist()
