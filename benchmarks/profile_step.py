"""Where a training step's time goes, per rank and phase: ShardedEmbedding and the single-process limit.

    python benchmarks/profile_step.py                       # S and M, zipf and uniform, SGD and row-wise Adagrad
    python benchmarks/profile_step.py --workload S --dists zipf --optimizers sgd --transports shared_memory
    python benchmarks/profile_step.py --workload S,M --repeat 3 --markdown out.md

The step is the one `lookup.py` times (forward lookup of each rank's ids, ``loss = (out * w).sum()``,
backward, fused update in the backward). Timers are wrapped around the library's functions from
outside, in this process only (nothing in the package changes); each phase's time is its own,
without the phases it calls:

    validate ids          routing.validate_ids: dtype check, flatten, aminmax range check
    keys -> peers         Router.route's own work: peer and row of each unique key, bincount
    sort / dedup          Router.dedup: page -> (rank, row) keys, sort, unique_consecutive, inverse;
                          with the compiled loops (`native.available()`, one thread per rank),
                          Router._route_compiled instead: the range check, keys, sort, dedup,
                          split and counts per peer in one C function (so no "validate ids",
                          and "keys -> peers" is only route's own glue)
    request build/parse   Router._exchange's and RequestExchange.exchange's own work: pack the
                          request rows, read the headers, owner rows
    request exchange      the transport's all-to-all of the requests (send, then wait + receive)
    gather for peers      ShardedLookup.forward: index_select of the rows peers asked for
    vector exchange       the transport's all-to-all of the vectors
    gather own rows       ShardedLookup.forward: index_select of own rows (while the vectors travel)
    expand to ids         ShardedLookup.forward's own work and gathered[gather_index] (one row per id)
    gradient sum          the backward's sum of each unique id's duplicate gradients: native.bag_sum
                          with the compiled loops (the non-finite test included), else embedding_bag
    non-finite check      amp.nonfinite_flag over the summed gradient rows (not with native.bag_sum)
    gradient exchange     the transport's all-to-all of the gradient rows (+ the flags)
    wait for peer         (shared memory only) of the three exchanges, the time spent waiting for a
                          peer to publish its rows or to finish reading ours; the rest is copying
    owner duplicate sum   rows.sum_duplicate_rows inside the optimizer (row-wise Adagrad only)
    optimizer update      FusedOptimizer.apply's / apply_parts' own work (SGD: index_add_; Adagrad: state,
                          index_add_)
    backward rest         ShardedLookup.backward's own work (buffers, copy of own rows' sums, stats)
    outside the table     the rest of the step: (out * w).sum(), its backward, autograd's own cost

An exchange's time includes waiting for the slower rank. A barrier starts each step on all ranks
together; per rank, the phases are averaged over the middle half of its steps (by step time),
pooled over --repeat rounds, so that the phases add up to that rank's step time. The plain step
(no timers) is timed too, in the same rounds, to show what the timers cost.

The single-process limit (`lookup.py`'s single_sparse, single_sparse_rowwise_adagrad: one
``nn.Embedding(sparse=True)`` over both ranks' ids) is broken down as: embedding forward
(gather), loss forward, backward (loss and sparse embedding gradient), optimizer step (SGD's
sparse add; row-wise Adagrad: coalesce, then the update), zero_grad.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from lookup import WORKLOADS, RowwiseAdagrad  # noqa: E402

PHASES = [
    "validate ids", "keys -> peers", "sort / dedup", "request build/parse", "request exchange",
    "gather for peers", "vector exchange", "gather own rows", "expand to ids",
    "gradient sum", "non-finite check", "gradient exchange", "wait for peer", "owner duplicate sum",
    "optimizer update",
    "mirror all-reduce", "backward rest", "outside the table",
]
SINGLE_PHASES = ["embedding forward", "loss forward", "backward", "coalesce", "optimizer update", "zero_grad"]
EXCHANGE_OF = {"request build/parse": "request exchange", "forward": "vector exchange",
               "backward": "gradient exchange"}  # the exchange a transport call makes, by the phase calling it
TRANSPORT_LABELS = {"shared_memory": "shm", "process_group": "gloo", "auto": "auto"}


# ---------------------------------------------------------------------------------- timers
class PhaseTimer:
    """Exclusive wall time per phase name, from wrappers installed around library functions.

    ``install()`` replaces the functions (module globals, class attributes) and ``uninstall()``
    puts the originals back. ``times`` maps phase -> seconds since the last ``reset()``.
    """

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [phase, seconds spent in children]
        self._patched: list[tuple[object, str, object]] = []
        self._gathers = 0

    def reset(self) -> None:
        self.times, self.calls = defaultdict(float), defaultdict(int)

    def _enter(self, name: str) -> None:
        self.calls[name] += 1
        self._stack.append([name, 0.0])

    def _leave(self, start: float) -> None:
        name, children = self._stack.pop()
        spent = time.perf_counter() - start
        self.times[name] += spent - children
        if self._stack:
            self._stack[-1][1] += spent

    def wrap(self, name, fn):
        """``fn`` timed as phase ``name`` (a string, or a function of the enclosing phase)."""

        def timed(*args, **kwargs):
            self._enter(name if isinstance(name, str) else name(self._stack[-1][0] if self._stack else ""))
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._leave(start)

        return timed

    def _exchange(self, send):
        """A transport's ``all_to_all``: the send and the returned receive both count as the
        exchange of the enclosing phase (requests in route, vectors in forward, gradients in
        backward)."""

        def all_to_all(*args, **kwargs):
            name = EXCHANGE_OF.get(self._stack[-1][0] if self._stack else "", "other exchange")
            receive = self.wrap(name, send)(*args, **kwargs)
            return self.wrap(name, receive)

        return all_to_all

    def _patch(self, owner, attr: str, new) -> None:
        self._patched.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)))
        setattr(owner, attr, new)

    def install(self) -> None:
        import torch
        import torch.nn.functional as F

        import sharded_embedding.lookup as L
        import sharded_embedding.optimizers as O
        import sharded_embedding.routing as R
        import sharded_embedding.transport as T
        from sharded_embedding.mirrors import MirrorSync

        self._patch(R, "validate_ids", self.wrap("validate ids", R.validate_ids))
        self._patch(R.Router, "route", self.wrap("route", R.Router.route))
        self._patch(R.Router, "dedup", self.wrap("sort / dedup", R.Router.dedup))
        self._patch(R.Router, "_route_compiled", self.wrap("sort / dedup", R.Router._route_compiled))
        self._patch(R.Router, "_exchange", self.wrap("request build/parse", R.Router._exchange))
        self._patch(R.RequestExchange, "exchange", self.wrap("request build/parse", R.RequestExchange.exchange))
        for cls in (T.SharedMemoryTransport, T.ProcessGroupTransport):
            self._patch(cls, "all_to_all", self._exchange(cls.all_to_all))
        self._patch(T.SharedMemoryTransport, "_wait", self.wrap("wait for peer", T.SharedMemoryTransport._wait))
        forward, backward = L.ShardedLookup.forward, L.ShardedLookup.backward

        def counted_forward(*args):
            self._gathers = 0
            return forward(*args)

        self._patch(L.ShardedLookup, "forward", staticmethod(self.wrap("forward", counted_forward)))
        self._patch(L.ShardedLookup, "backward", staticmethod(self.wrap("backward", backward)))

        def gather_name(_):
            self._gathers += 1
            return ("gather for peers", "gather own rows", "expand to ids")[min(self._gathers, 3) - 1]

        if hasattr(getattr(L, "native", None), "index_select"):  # the gathers and the sum, compiled where they can be
            self._patch(L, "native", _Proxy(L.native, index_select=self.wrap(gather_name, L.native.index_select),
                                            bag_sum=self.wrap("gradient sum", L.native.bag_sum)))
        else:  # (a tree before them: to profile older trees)
            self._patch(L, "torch", _Proxy(torch, index_select=self.wrap(gather_name, torch.index_select)))
        self._patch(L, "F", _Proxy(F, embedding_bag=self.wrap("gradient sum", F.embedding_bag)))
        self._patch(L, "nonfinite_flag", self.wrap("non-finite check", L.nonfinite_flag))
        self._patch(O.FusedOptimizer, "apply", self.wrap("optimizer update", O.FusedOptimizer.apply))
        if "apply_parts" in O.FusedOptimizer.__dict__:  # (absent before the leaner step: to profile older trees)
            self._patch(O.FusedOptimizer, "apply_parts", self.wrap("optimizer update", O.FusedOptimizer.apply_parts))
        self._patch(O, "sum_duplicate_rows", self.wrap("owner duplicate sum", O.sum_duplicate_rows))
        self._patch(MirrorSync, "all_reduce", self.wrap("mirror all-reduce", MirrorSync.all_reduce))

    def uninstall(self) -> None:
        while self._patched:
            owner, attr, old = self._patched.pop()
            setattr(owner, attr, old)

    def phases(self, step_seconds: float) -> dict[str, float]:
        """This step's seconds per `PHASES` entry; 'forward', 'backward' and 'route' (their own
        work) fold into expand to ids, backward rest and keys -> peers."""
        t = dict(self.times)
        out = {p: t.pop(p, 0.0) for p in PHASES}
        out["keys -> peers"] += t.pop("route", 0.0)
        out["expand to ids"] += t.pop("forward", 0.0)
        out["backward rest"] += t.pop("backward", 0.0)
        if t:
            raise RuntimeError(f"unexpected phases {sorted(t)}")
        out["outside the table"] = step_seconds - sum(out.values())
        return out


class _Proxy:
    """A module with some functions replaced (for a module that calls ``torch.x(...)``)."""

    def __init__(self, module, **overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._module, name)


def middle_mean(steps: list[dict[str, float]], key: str = "step") -> dict[str, float]:
    """Per field, the mean over the steps whose ``key`` lies in the middle half (robust to the
    odd preempted step, and still additive: the fields' means add up to the step's)."""
    order = sorted(steps, key=lambda s: s[key])
    n = len(order)
    mid = order[n // 4 : n - n // 4] or order
    return {k: statistics.fmean(s[k] for s in mid) for k in mid[0]}


# ---------------------------------------------------------------------------------- workers
def profile_ours(rows: int, dim: int, batch: int, page_size: int, dists: list[str], optimizers: list[str],
                 transports: list[str], steps: int, warmup: int, repeat: int, lr: float = 0.05, seed: int = 0):
    """On every rank of the default group: per (transport, optimizer, dist), this rank's mean
    seconds per phase (`PHASES`) and per step, with timers and without. Collective."""
    import torch.distributed as dist

    from sharded_embedding import ShardedEmbedding
    from workload import make_ids, make_loss_weight

    from sharded_embedding import native

    rank = dist.get_rank()
    ids = {d: make_ids(rows, batch, warmup + steps, rank, d, seed=seed) for d in dists}
    w = make_loss_weight(batch, dim, rank, seed)
    timer = PhaseTimer()
    results = []
    for transport in transports:
        for opt in optimizers:
            emb = ShardedEmbedding(rows, dim, page_size=page_size, fused_optimizer={"name": opt, "lr": lr},
                                   transport=transport)
            profiled = {d: [] for d in dists}
            plain = {d: [] for d in dists}
            calls = {}  # per dist: how often each phase ran in its last step
            for _ in range(repeat):
                for d in dists:
                    for i in range(warmup + steps):
                        dist.barrier()
                        start = time.perf_counter()
                        (emb(ids[d][i]) * w).sum().backward()
                        if i >= warmup:
                            plain[d].append(time.perf_counter() - start)
                    timer.install()
                    try:
                        for i in range(warmup + steps):
                            timer.reset()
                            dist.barrier()
                            start = time.perf_counter()
                            (emb(ids[d][i]) * w).sum().backward()
                            spent = time.perf_counter() - start
                            if i >= warmup:
                                profiled[d].append({**timer.phases(spent), "step": spent})
                    finally:
                        timer.uninstall()
                    calls[d] = dict(timer.calls)
            for d in dists:
                results.append(dict(transport=emb.transport.name, optimizer=opt, dist=d,
                                    phases=middle_mean(profiled[d]), plain_step=statistics.median(plain[d]),
                                    calls_per_step=calls[d], compiled_routing=native.available()))
            del emb
    return results


def profile_single(rows: int, dim: int, batch: int, world: int, dists: list[str], optimizers: list[str],
                   steps: int, warmup: int, repeat: int, lr: float = 0.05, seed: int = 0):
    """The single-process limit, phase by phase (`SINGLE_PHASES`), per (optimizer, dist)."""
    import torch

    from workload import make_ids, make_loss_weight

    n = warmup + steps
    ids = {}
    for d in dists:
        per_rank = [make_ids(rows, batch, n, r, d, seed=seed) for r in range(world)]
        ids[d] = [torch.cat([per_rank[r][i] for r in range(world)]) for i in range(n)]
    w = torch.cat([make_loss_weight(batch, dim, r, seed) for r in range(world)])
    results = []
    for opt_name in optimizers:
        emb = torch.nn.Embedding(rows, dim, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=lr) if opt_name == "sgd" else RowwiseAdagrad(emb.weight, lr=lr)
        got = {d: [] for d in dists}
        for _ in range(repeat):
            for d in dists:
                for i in range(n):
                    marks = [time.perf_counter()]
                    out = emb(ids[d][i])
                    marks.append(time.perf_counter())
                    loss = (out * w).sum()
                    marks.append(time.perf_counter())
                    loss.backward()
                    marks.append(time.perf_counter())
                    if opt_name == "sgd":
                        marks.append(marks[-1])  # SGD adds the uncoalesced sparse gradient
                        opt.step()
                    else:
                        with torch.no_grad():
                            emb.weight.grad = emb.weight.grad.coalesce()
                        marks.append(time.perf_counter())
                        opt.step()
                    marks.append(time.perf_counter())
                    opt.zero_grad(set_to_none=True)
                    marks.append(time.perf_counter())
                    if i >= warmup:
                        row = {p: b - a for p, a, b in zip(SINGLE_PHASES, marks, marks[1:])}
                        got[d].append({**row, "step": marks[-1] - marks[0]})
        for d in dists:
            results.append(dict(optimizer=opt_name, dist=d, phases=middle_mean(got[d]),
                                plain_step=statistics.median(s["step"] for s in got[d])))
        del emb, opt
    return results


def _worker(a) -> None:
    dists, opts = a.dists.split(","), a.optimizers.split(",")
    if a.worker == "single":
        for r in profile_single(a.rows, a.dim, a.batch, a.world, dists, opts, a.steps, a.warmup, a.repeat):
            print("RESULT " + json.dumps(r), flush=True)
        return
    import torch.distributed as dist

    from sharded_embedding import finish, init_distributed

    init_distributed("gloo", bind_cpus=a.bind_cpus)
    mine = profile_ours(a.rows, a.dim, a.batch, a.page_size, dists, opts, a.transports.split(","), a.steps,
                        a.warmup, a.repeat)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        for i, r in enumerate(mine):
            r["phases"] = [ranks[i]["phases"] for ranks in every]
            r["plain_step"] = [ranks[i]["plain_step"] for ranks in every]
            r["calls_per_step"] = [ranks[i]["calls_per_step"] for ranks in every]
            print("RESULT " + json.dumps(r), flush=True)
    finish()


# ---------------------------------------------------------------------------------- driver
def _launch(a, sizes: dict, worker: str) -> list[dict]:
    args = [f"--rows={sizes['rows']}", f"--dim={sizes['dim']}", f"--batch={sizes['batch']}", f"--world={a.world}",
            f"--page-size={a.page_size}", f"--steps={a.steps}", f"--warmup={a.warmup}", f"--repeat={a.repeat}",
            f"--dists={a.dists}", f"--optimizers={a.optimizers}", f"--transports={a.transports}",
            f"--worker={worker}"]
    if not a.bind_cpus:
        args.append("--no-bind-cpus")
    script = os.path.abspath(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if worker == "single":
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.world}",
               script, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    found = [json.loads(ln[len("RESULT "):]) for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not found:
        raise SystemExit(f"{worker} failed ({done.returncode}):\n" + (done.stderr or done.stdout)[-3000:])
    return found


def _cell(ms: list[float], step: list[float]) -> str:
    """'r0 / r1 ms (share of the mean step)'."""
    share = 100 * sum(ms) / sum(step) if sum(step) else 0.0
    return " / ".join(f"{m:.2f}" for m in ms) + f" ({share:.0f}%)"


def ours_table(results: list[dict]) -> str:
    cols = [f"{r['dist']} {r['optimizer']} {TRANSPORT_LABELS.get(r['transport'], r['transport'])}" for r in results]
    head = "| phase (ms per step, rank 0 / rank 1, % of step) | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    steps = [[p["step"] * 1e3 for p in r["phases"]] for r in results]
    for phase in PHASES:
        vals = [[p[phase] * 1e3 for p in r["phases"]] for r in results]
        if all(max(v) < 0.005 for v in vals):
            continue
        lines.append(f"| {phase} | " + " | ".join(_cell(v, s) for v, s in zip(vals, steps)) + " |")
    lines.append("| **step (profiled)** | " + " | ".join(" / ".join(f"{x:.2f}" for x in s) for s in steps) + " |")
    plain = [[x * 1e3 for x in r["plain_step"]] for r in results]
    lines.append("| step without timers (median) | " + " | ".join(" / ".join(f"{x:.2f}" for x in s) for s in plain)
                 + " |")
    return "\n".join(lines)


def single_table(results: list[dict]) -> str:
    cols = [f"{r['dist']} {r['optimizer']}" for r in results]
    head = "| phase (ms per step, % of step) | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for phase in SINGLE_PHASES:
        vals = [r["phases"][phase] * 1e3 for r in results]
        if all(v < 0.005 for v in vals):
            continue
        lines.append(f"| {phase} | " + " | ".join(
            f"{v:.2f} ({100 * v / (r['phases']['step'] * 1e3):.0f}%)" for v, r in zip(vals, results)) + " |")
    lines.append("| **step** | " + " | ".join(f"{r['phases']['step'] * 1e3:.2f}" for r in results) + " |")
    return "\n".join(lines)


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="S,M", help="S, M or both (S,M)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="ids per rank per step")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--page-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per round (with timers, and as many without)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the id laws, pooled")
    ap.add_argument("--dists", default="zipf,uniform")
    ap.add_argument("--optimizers", default="sgd,rowwise_adagrad")
    ap.add_argument("--transports", default="shared_memory,process_group")
    ap.add_argument("--no-single", dest="single", action="store_false", help="skip the single-process limit")
    ap.add_argument("--no-bind-cpus", dest="bind_cpus", action="store_false")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument("--json", default=None, help="append every result as a JSON line to this file")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    a = _args(argv)
    if a.worker:
        _worker(a)
        return
    import torch

    out = []
    for wl in a.workload.split(","):
        sizes = dict(WORKLOADS[wl])
        for key in ("rows", "dim", "batch"):
            if getattr(a, key) is not None:
                sizes[key] = getattr(a, key)
        title = (f"### {wl}: {sizes['rows']:,} x {sizes['dim']} fp32, {sizes['batch']} ids per rank, {a.world} ranks "
                 f"({'pinned, ' if a.bind_cpus else ''}1 thread each), page_size {a.page_size}; {a.repeat} rounds of "
                 f"{a.steps} steps after {a.warmup}; {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}")
        print(f"profiling {wl} ...", file=sys.stderr, flush=True)
        ours = _launch(a, sizes, "ours")
        compiled = {r.get("compiled_routing") for r in ours}
        title += "; routing " + ("compiled (native.dedup)" if compiled == {True} else
                                 "in torch/numpy passes" if compiled == {False} else "mixed")
        parts = [title, "", ours_table(ours)]
        found = [dict(r, workload=wl, **sizes) for r in ours]
        if a.single:
            single = _launch(a, sizes, "single")
            parts += ["", f"Single-process limit ({wl}, both ranks' ids in one process):", "", single_table(single)]
            found += [dict(r, workload=wl, system="single", **sizes) for r in single]
        text = "\n".join(parts) + "\n"
        print(text, flush=True)
        out.append(text)
        if a.json:
            with open(a.json, "a") as f:
                for r in found:
                    f.write(json.dumps(r) + "\n")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n".join(out))


if __name__ == "__main__":
    main()
