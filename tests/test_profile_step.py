"""The step profiler (benchmarks/profile_step.py) still finds every function it times.

Its timers wrap library functions from outside; when the library's internals move, a wrapper
silently times nothing. These tests run a few tiny steps on 2 ranks, on both transports and
both optimizers it profiles, and check that every phase ran the expected number of times per
step, that the phases add up to the step, and that the originals are back afterwards."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from tests.harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Calls per step of each phase (an exchange: its send and its receive; the request exchange
# twice that when a request outgrew the capacity; request build/parse: Router._exchange and the
# RequestExchange it calls; the owner duplicate sum: row-wise Adagrad only; the mirror all-reduce:
# row-wise Adagrad only, as SGD without mirrored pages updates in parts).
EXPECTED_CALLS = {"validate ids": 1, "route": 1, "sort / dedup": 1, "request build/parse": 2,
                  "request exchange": 2, "forward": 1, "gather for peers": 1, "vector exchange": 2,
                  "gather own rows": 1, "expand to ids": 1, "backward": 1, "gradient sum": 1, "non-finite check": 1,
                  "gradient exchange": 2, "optimizer update": 1, "mirror all-reduce": 1}


def _profile_both_transports():
    import sharded_embedding.lookup as L
    import sharded_embedding.routing as R

    before = (R.Router.route, R.Router.dedup, R.Router._route_compiled, R.RequestExchange.exchange, R.validate_ids,
              L.torch, L.F, L.native, L.ShardedLookup.__dict__["forward"])
    ps = _load("profile_step")
    results = ps.profile_ours(rows=3000, dim=8, batch=96, page_size=16, dists=["zipf", "uniform"],
                              optimizers=["sgd", "rowwise_adagrad"], transports=["shared_memory", "process_group"],
                              steps=4, warmup=1, repeat=1)
    after = (R.Router.route, R.Router.dedup, R.Router._route_compiled, R.RequestExchange.exchange, R.validate_ids,
             L.torch, L.F, L.native, L.ShardedLookup.__dict__["forward"])
    assert all(x is y for x, y in zip(before, after)), "the profiler left a wrapper installed"
    return results


def test_profiler_times_every_phase_on_both_transports():
    ranks = run_ranks(2, _profile_both_transports)
    ps = _load("profile_step")
    for results in ranks:
        assert {(r["transport"], r["optimizer"], r["dist"]) for r in results} == {
            (t, o, d) for t in ("shared_memory", "process_group") for o in ("sgd", "rowwise_adagrad")
            for d in ("zipf", "uniform")}
        for r in results:
            expected = dict(EXPECTED_CALLS)
            if r["compiled_routing"]:  # one compiled call checks, keys and sorts (timed as "sort / dedup")
                del expected["validate ids"]
                del expected["non-finite check"]  # and the gradient sum tests its rows as it writes them
            if r["optimizer"] == "rowwise_adagrad":
                expected["owner duplicate sum"] = 1
            else:  # SGD applies own and peers' rows as they lie (no mirrored pages: no all-reduce)
                del expected["mirror all-reduce"]
            calls = dict(r["calls_per_step"])
            assert (calls.pop("wait for peer", 0) >= 3) == (r["transport"] == "shared_memory"), r
            assert calls.pop("request exchange") in (2, 4), r
            del expected["request exchange"]
            assert calls == expected, r
            phases = r["phases"]
            assert set(phases) == {*ps.PHASES, "step"}
            assert math.isclose(sum(v for k, v in phases.items() if k != "step"), phases["step"], rel_tol=1e-9)
            assert all(v >= 0 for k, v in phases.items() if k != "outside the table")


def test_single_process_profile_adds_up():
    ps = _load("profile_step")
    results = ps.profile_single(rows=500, dim=4, batch=32, world=2, dists=["zipf"],
                                optimizers=["sgd", "rowwise_adagrad"], steps=3, warmup=1, repeat=1)
    assert [r["optimizer"] for r in results] == ["sgd", "rowwise_adagrad"]
    for r in results:
        phases = r["phases"]
        assert set(phases) == {*ps.SINGLE_PHASES, "step"}
        assert math.isclose(sum(v for k, v in phases.items() if k != "step"), phases["step"], rel_tol=1e-9)


def test_limit_table_ratios():
    lk = _load("lookup")
    transports = ["shared_memory", "process_group"]

    def run(system, ms, transport=None, allocator="default"):
        return dict(system=lk._label(system, transport, transports, allocator, ("default", "tuned")),
                    base_system=system, transport=transport, allocator=allocator, dist="zipf", median_step_ms=ms)

    results = [run("single_sparse", 4.0), run("single_sparse_rowwise_adagrad", 6.0),
               run("ours_fused_sgd", 2.0, "shared_memory"), run("ours_fused_sgd", 8.0, "process_group"),
               run("ours_fused_rowwise_adagrad", 3.0, "shared_memory"),
               # one-process ShardedEmbedding: slower than single_sparse for SGD, faster for Adagrad
               run("single_fused_sgd", 5.0), run("single_fused_rowwise_adagrad", 4.5),
               # under the tuned allocator, each against the limit under the same allocator
               run("single_sparse", 3.0, allocator="tuned"), run("ours_fused_sgd", 2.5, "shared_memory", "tuned"),
               # the no-exchange bound: limit / bound is the ceiling of ours
               run("bound_no_exchange_sgd", 1.6)]
    table = lk._limit_table(results, "S", ["zipf"], transports, 3, ["default", "tuned"])
    rows = [line for line in table.splitlines() if line.startswith("| S ")]
    assert rows == ["| S | zipf | sgd | default | single_sparse | 4.00 | 2.00 | 2.00x | 8.00 | 0.50x | 1.60 | 2.50x |",
                    "| S | zipf | sgd | tuned | single_sparse | 3.00 | 2.50 | 1.20x | - | - | - | - |",
                    "| S | zipf | rowwise_adagrad | default | single_fused_rowwise_adagrad | 4.50 | 3.00 | 1.50x | - | - "
                    "| - | - |"]
    assert lk._label("ours_fused_sgd", "process_group", transports) == "ours_fused_sgd/gloo"
    assert lk._label("ours_fused_sgd", "process_group", transports, "tuned", ("default", "tuned")) \
        == "ours_fused_sgd/gloo@tuned"
    assert lk._label("ours_fused_sgd", "auto", ["auto"]) == "ours_fused_sgd"


def test_the_no_exchange_bound_runs_beside_ours_and_sets_the_ceiling(tmp_path):
    """benchmarks/lookup.py's bound (each rank a group of one with its share of the rows) runs
    under torchrun beside our system and the single process, and the limit table reports it."""
    import json
    import subprocess
    import sys

    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lookup.py"), "--rows=4096", "--dim=8", "--batch=64",
           "--steps=3", "--warmup=1", "--dists=zipf", "--no-bind-cpus", f"--json={out}",
           "--systems=ours_fused_sgd,single_fused_sgd,bound_no_exchange_sgd"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["system"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert not any(r.get("failed") for r in results.values()), results
    bound = results["bound_no_exchange_sgd"]
    assert bound["world"] == 2 and len(bound["peak_rss_mib_per_rank"]) == 2
    assert bound["bytes_sent_per_step"] == 0  # a group of one: nothing travels
    assert results["ours_fused_sgd"]["bytes_sent_per_step"] > 0
    row = next(line for line in done.stdout.splitlines() if line.startswith("| S resized | zipf | sgd "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-2] == f"{bound['median_step_ms']:.2f}"
    limit = results["single_fused_sgd"]["median_step_ms"]
    assert cells[-1] == f"{limit / bound['median_step_ms']:.2f}x"


def test_lookup_benchmark_refuses_bad_arguments_and_names_a_workers_error():
    """Arguments no run could use stop the driver before any run (not a hang in make_ids, not a
    torchrun summary); a worker that raises is reported with its own exception line."""
    import argparse

    import pytest

    lk = _load("lookup")
    good = dict(rows=None, dim=None, batch=None, world=2, page_size=512, steps=5, warmup=1, slow_steps=1, repeat=1,
                timeout=60, lr=0.05, seed=0, json=None, markdown=None, chart=None)
    lk._check_args(argparse.Namespace(**good), ["S"], ["zipf"], ["ours_fused_sgd"])
    for change, message in [(dict(rows=0), "--rows must be at least 1"), (dict(page_size=0), "--page-size"),
                            (dict(steps=0), "--steps"), (dict(repeat=0), "--repeat"), (dict(world=0), "--world"),
                            (dict(batch=-1), "--batch"), (dict(lr=float("nan")), "--lr"), (dict(seed=-1), "--seed"),
                            (dict(json="/no/such/folder/r.jsonl"), "no folder"), (dict(chart="out.txt"), "--chart")]:
        with pytest.raises(SystemExit, match=message):
            lk._check_args(argparse.Namespace(**{**good, **change}), ["S"], ["zipf"], ["ours_fused_sgd"])
    with pytest.raises(SystemExit, match="unknown workloads"):
        lk._check_args(argparse.Namespace(**good), ["s"], ["zipf"], ["ours_fused_sgd"])
    with pytest.raises(SystemExit, match="unknown id distributions"):
        lk._check_args(argparse.Namespace(**good), ["S"], ["zipf", "normal"], ["ours_fused_sgd"])
    with pytest.raises(SystemExit, match="names an entry twice"):
        lk._check_args(argparse.Namespace(**good), ["S"], ["zipf", "zipf"], ["ours_fused_sgd"])
    with pytest.raises(SystemExit, match="leaves none"):
        lk._check_args(argparse.Namespace(**{**good, "rows": 1}), ["S"], ["zipf"], ["bound_no_exchange_sgd"])
    text = "\n".join(["Traceback (most recent call last):", '  File "lookup.py", line 3, in <module>',
                      "[rank0]: ValueError: ShardedEmbedding construction: page_size must be a positive int, got 0",
                      "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "  time : 2026"])
    assert lk._worker_error(text) == "ValueError: ShardedEmbedding construction: page_size must be a positive int, got 0"
    assert lk._worker_error("killed\nno exception here") == "killed\nno exception here"


def test_step_quantiles_stay_within_the_times_measured():
    """p10/p90 of a few steps lie between the fastest and the slowest step (the default
    quantile method extrapolated below zero on three steps)."""
    wl = _load("workload")
    r = wl.summary([0.00183, 0.00468, 0.00625], 10)
    assert r["p10_step_ms"] >= 1.83 and r["p90_step_ms"] <= 6.25
    assert r["p10_step_ms"] <= r["median_step_ms"] <= r["p90_step_ms"]


def test_two_versions_run_side_by_side_in_one_job():
    """benchmarks/ab_trees.py builds the base version (here: the last commit) beside this
    checkout, runs both in one torchrun job and prints the paired ratio; arguments no run could
    use stop it before any run."""
    import subprocess
    import sys

    import pytest

    ab = _load("ab_trees")
    for argv, message in [(["--base", "HEAD", "--blocks", "0"], "--blocks must be at least 1"),
                          (["--base", "HEAD", "--rows", "0"], "--rows must be at least 1")]:
        with pytest.raises(SystemExit):
            ab._args(argv)
    with pytest.raises(SystemExit, match="neither a checkout nor a revision"):
        ab.main(["--base", "no-such-revision-here", "--dists", "zipf", "--optimizers", "sgd"])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ab_trees.py"), "--base", "HEAD", "--rows=4096", "--dim=8",
           "--batch=64", "--blocks=2", "--block-steps=2", "--dists=zipf", "--optimizers=sgd"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| zipf | sgd |"))
    base_ms, ours_ms, ratio = (c.strip() for c in row.strip("|").split("|")[2:])
    assert float(base_ms) > 0 and float(ours_ms) > 0 and float(ratio.rstrip("x")) > 0


def test_ours_the_limit_and_the_bound_run_paired_in_one_job():
    """benchmarks/limit_paired.py runs our table, the single process (rank 0 alone, every
    rank's ids) and the no-exchange bound in one torchrun job and prints the paired ratios;
    arguments no run could use stop it before any run."""
    import subprocess
    import sys

    import pytest

    lp = _load("limit_paired")
    for argv in (["--world", "0"], ["--rows", "1", "--world", "2"], ["--dists", "normal"], ["--limits", "gpu"],
                 ["--limits", "sparse", "--optimizers", "adam"], ["--limit-threads", "0"], ["--limit-threads", "1,1"],
                 ["--limit-threads", "two"], ["--limit-threads", "4096"]):
        with pytest.raises(SystemExit):
            lp._args(argv)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "limit_paired.py"), "--rows=4096", "--dim=8", "--batch=64",
           "--blocks=3", "--block-steps=2", "--dists=uniform", "--optimizers=rowwise_adagrad", "--limit-threads=1,2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| uniform | rowwise_adagrad |"))
    form, *ratios, every = [c.strip().rstrip("x") for c in row.strip("|").split("|")[2:]]
    assert form in ("fused", "sparse", "fused_2threads", "sparse_2threads") and len(ratios) == 5 \
        and all(float(c) > 0 for c in ratios), (form, ratios)
    # both single-process forms ran, each with one thread and with two
    assert [x.split("=")[0] for x in every.split(",")] == ["fused", "fused_2threads", "sparse", "sparse_2threads"]
    jobs = []  # the workers get the driver's --limits (without a second job: each costs a torchrun start)
    lp.run_paired = lambda a, script, extra: jobs.append(extra) or []
    lp.main(["--limits", "sparse", "--rows", "4096"])
    assert jobs == [["--limits", "sparse", "--limit-threads", "1"]], jobs


def test_the_exchange_alone_runs_on_both_transports_in_one_job():
    """benchmarks/transport.py times one all-to-all on shared memory and on gloo in one torchrun
    job (every peer's rows checked on arrival) and prints one row per size; sizes no exchange
    could use, and a group of one, stop it before the job starts."""
    import subprocess
    import sys

    import pytest

    tp = _load("transport")
    for argv in (["--sizes", "100"], ["--sizes", "0"], ["--sizes", "1k"], ["--world", "1"], ["--blocks", "0"]):
        with pytest.raises(SystemExit):
            tp._args(argv)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "transport.py"), "--sizes=256,4096", "--blocks=2",
           "--block-steps=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 256 |") or line.startswith("| 4,096 |")]
    assert len(rows) == 2, done.stdout
    for row in rows:
        shm, gloo, ratio = (float(c.strip().rstrip("x")) for c in row.strip("|").split("|")[1:])
        assert shm > 0 and gloo > 0 and ratio > 0, row


def test_row_kernels_benchmark_runs_and_refuses_bad_cases():
    """benchmarks/row_kernels.py: a tiny run of every kernel prints a row each with both
    times and the ratio; malformed cases are refused before anything runs."""
    import subprocess
    import sys

    import pytest

    rk = _load("row_kernels")
    for argv in (["--cases", "1x2"], ["--cases", "0x4x4"], ["--expand", "ax4x4"], ["--sums", "poissonx4x8"],
                 ["--sums", "zipfx4"], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            rk._args(argv)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "row_kernels.py"), "--cases=1000x8x50", "--expand=50x8x60",
           "--sums=uniformx8x64,zipfx16x64", "--reps=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "µs" not in line and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["gather from a shard", "expand to ids (hot buffer)",
                                                       "gradient sum", "gradient sum"], done.stdout
    for row in rows:
        torch_us, compiled_us, ratio = (float(c.strip().rstrip("x")) for c in row.strip("|").split("|")[2:])
        assert torch_us > 0 and compiled_us > 0 and ratio > 0, row


def test_a_timed_out_job_is_stopped_with_the_workers_it_started_in_their_own_sessions(tmp_path):
    """`workload.run_in_session` on timeout: torchrun starts its workers in sessions of their own,
    which a kill of torchrun's process group missed; they kept the output pipes open and the
    driver waited forever. A stand-in job starts such a worker; the driver stops both, at once."""
    import signal
    import sys
    import threading
    import time

    wl = _load("workload")
    pid_file = tmp_path / "worker.pid"
    worker = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    job = ("import subprocess, sys, time; "
           f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); time.sleep(120)")
    raised = []

    def drive():
        try:
            wl.run_in_session([sys.executable, "-c", job], dict(os.environ), 3, "the stand-in job")
        except SystemExit as e:
            raised.append(str(e))

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    driver.join(60)
    worker_pid = int(pid_file.read_text())
    try:
        assert not driver.is_alive(), "the driver still waits on the job's output a minute after its timeout"
        assert raised and "no result within --timeout 3 s" in raised[0], raised
        for _ in range(50):  # (SIGKILL is delivered at once; its exit may take a moment to be seen)
            if not os.path.exists(f"/proc/{worker_pid}") or open(f"/proc/{worker_pid}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the worker {worker_pid} outlived the timeout")
    finally:
        try:
            os.kill(worker_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_each_allocator_setting_gives_the_workers_its_environment_whatever_the_driver_inherited():
    """`workload.allocator_env`: 'default' clears an inherited tune_malloc request and huge-page
    tunable, 'huge' adds the tunable beside the caller's other glibc tunables instead of
    replacing them."""
    wl = _load("workload")
    inherited = {"PATH": "/bin", "SHARDED_EMBEDDING_BENCH_TUNE_MALLOC": "1",
                 "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2"}
    assert wl.allocator_env("default", inherited) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert wl.allocator_env("tuned", {"PATH": "/bin"}) == {"PATH": "/bin", "SHARDED_EMBEDDING_BENCH_TUNE_MALLOC": "1"}
    assert wl.allocator_env("huge", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == \
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert wl.allocator_env("tuned_huge", {}) == {"SHARDED_EMBEDDING_BENCH_TUNE_MALLOC": "1",
                                                  "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert inherited["SHARDED_EMBEDDING_BENCH_TUNE_MALLOC"] == "1"  # the caller's dict is left as it was


def test_job_comparison_refuses_what_no_run_could_use_before_any_job_starts():
    """`job_compare.py` checks its arguments and composes and validates every value's job
    configuration before the first run (a bad last value used to fail only after the runs
    before it, a repeated value on its second run's output folder)."""
    import argparse

    import pytest

    jc = _load("job_compare")
    good = dict(vary=None, shardings="auto,round_robin", data=["data=gensim_sample"], override=[], nproc=2, epochs=1,
                reps=1)
    assert jc.check_args(argparse.Namespace(**good)) == ("sharding", ["auto", "round_robin"])
    assert jc.check_args(argparse.Namespace(**{**good, "vary": "nproc=2,1"})) == ("nproc", ["2", "1"])
    assert jc.check_args(argparse.Namespace(**{**good, "vary": "nproc=2,1x2"})) == ("nproc", ["2", "1x2"])
    assert [jc.ranks_and_threads(v) for v in ("2", "1x2", "3x1")] == [(2, 1), (1, 2), (3, 1)]
    for change, message in [
        (dict(vary="model.transport"), "two or more values"), (dict(vary="=a,b"), "two or more values"),
        (dict(vary="model.transport=auto,"), "two or more values"),
        (dict(vary="model.transport=auto,auto"), "a value is given twice"),
        (dict(vary="nproc=abc,1"), "a number of ranks >= 1"), (dict(vary="nproc=0,1"), "a number of ranks >= 1"),
        (dict(vary="nproc=1x0,1"), "RxT"), (dict(vary="nproc=1x2x2,1"), "RxT"), (dict(vary="nproc=x2,1"), "RxT"),
        (dict(vary="nproc=2,\u00b2"), "RxT"), (dict(vary="nproc=2,1x\u00b2"), "RxT"),  # (isdigit, but not int())
        (dict(vary="nproc=2,2x1"), "mean the same"), (dict(vary="nproc=1,01"), "mean the same"),
        (dict(vary=f"nproc=2,1x{len(os.sched_getaffinity(0)) + 1}"), "more threads than"),
        (dict(reps=0), "--reps"),
        (dict(vary="model.transport=auto,mpi"), "model.transport=mpi: the job would refuse it: model.transport='mpi'"),
        (dict(vary="model.bogus=1,2"), "model.bogus=1: the job would refuse it"),
    ]:
        with pytest.raises(SystemExit, match=message):
            jc.check_args(argparse.Namespace(**{**good, **change}))
