"""The main job end to end: torchrun + Hydra, config errors, a short run, two nodes on loopback."""

from __future__ import annotations

import json
import os
import socket
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train(tmp_path, *overrides, nproc=2, timeout=300):
    """launch/train.sh with outputs and Hydra's run folder under tmp_path."""
    return subprocess.run(
        ["bash", "launch/train.sh", f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
        cwd=ROOT, env=_env(NPROC=nproc), capture_output=True, text=True, timeout=timeout,
    )


# One launch per place a configuration error is found (each ends every rank with one message,
# exit code 2): Hydra's composition, a '+key' the app lacks, `validate`, the corpus's path, the
# placement (needs the vocabulary), the planner, the tables' allocation (a model.dim no address space holds). The other messages of those places are checked
# in-process below (a launch costs ~7 s; the path to the exit code is the same).
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.dimm=50"], "Key 'dimm' not in 'ModelConfig'"),
        (["+train.epoch=1"], "+train.epoch=1: not a key of this app's configuration"),
        (["train.epochs=0"], "train.epochs must be >= 1, got 0"),
        (["data.path=/nonexistent/corpus.txt"], "corpus file /nonexistent/corpus.txt does not exist"),
        (["sharding=explicit", "sharding.pages=[0,1]"],
         "sharding.pages has 2 entries but the tables have 4 pages (7978 words in the vocabulary / page_size 2048"),
        (["sharding=auto", "sharding.memory_per_rank=1MB"],
         "sharding=auto: no placement fits: 2 tables of 7,978 x 100 float32 with rowwise_adagrad state needs"),
        (["model.dim=100000000000000"], "configuration error: the tables do not fit in this machine's memory"),
    ],
)
def test_config_errors_stop_every_rank_with_one_message(tmp_path, overrides, message):
    done = _train(tmp_path, *overrides)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert out.count(message) == 1, out[-3000:]
    assert message in done.stderr  # errors on stderr, whatever Hydra's console logging does with stdout
    assert done.returncode == 2  # the configuration-error code, through the launcher
    assert "Traceback" not in out and "ChildFailedError" not in out  # no launcher noise after the message
    assert "failed (exitcode" not in out  # (torchrun's log line: the launcher's own line says it)
    assert not (tmp_path / "out" / "vectors.txt").exists()  # nothing was trained


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sharding=explicit", "sharding.pages=[0,1,[0,2],1]"],
         "sharding.pages[2] names rank 2, but the world has ranks 0..1"),
        (["sharding.num_devices=3"], "sharding.num_devices=3 is out of range"),
        (["sharding=auto", "sharding.memory_per_rank=lots"], "sharding.memory_per_rank='lots' is not understood"),
        (["data=text"], "data=text needs the corpus: data.path=<a text file"),
        (["optimizer.lr=inf"], "optimizer.lr must be a finite number > 0, got inf"),
        (["optimizer.lr=nan"], "optimizer.lr must be a finite number > 0, got nan"),
        (["sharding=explicit", "sharding.pages=[[0,0],1,0,1]"], "sharding.pages[0] repeats a rank: [0, 0]"),
        (["sharding=explicit", "sharding.pages=[[],1,0,1]"], "sharding.pages[0] is an empty list"),
        (["data.cache_dir=/etc/hostname"], "data.cache_dir=/etc/hostname: exists and is not a folder"),
        (["train.checkpoint_dir=/etc/hostname/ckpt"], "train.checkpoint_dir=/etc/hostname/ckpt: cannot be created: "
                                                      "/etc/hostname is not a folder"),
        (["data.path=/dev/zero"], "data.path: /dev/zero is neither a regular file nor a folder"),
        (["train.checkpoint_dir=/proc/ckpt"], "train.checkpoint_dir=/proc/ckpt: cannot be created: /proc refuses "
                                              "new folders"),
        # (these escaped to the tables' construction: tracebacks from every rank, exit 1)
        (["optimizer.betas=[0.9]"], "optimizer: optimizer='rowwise_adagrad' does not take ['betas']"),
        (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer: optimizer='adam': betas must be two numbers"),
        (["optimizer=adam", "optimizer.betas=[2,3]"], "optimizer: optimizer='adam': betas must be two numbers"),
        (["optimizer=adam", "optimizer.lr_decay=0.1"], "optimizer: optimizer='adam' does not take ['lr_decay']"),
        (["optimizer=sgd", "optimizer.eps=1e-8"], "optimizer: optimizer='sgd' does not take ['eps']"),  # was dropped
        (["model.block=100000"], "model.block=100000 is more than train.batch_centers=4096"),  # allocated 80 GB
        (["model.transport=mpi"], "model.transport='mpi' is not one of ['auto', 'process_group', 'shared_memory']"),
        (["sharding=explicit", "sharding.pages=[true,1,0,1]"],  # was placed on rank 1
         "sharding.pages[0] holds True, which is not a rank: ranks are integers"),
        (["sharding=explicit", "sharding.pages=[1.0,1,0,1]"], "sharding.pages[0] holds 1.0, which is not a rank"),
        (["sharding.pages=[0,1]"], "sharding.pages=[0, 1] is not read by sharding=round_robin"),  # were ignored
        (["sharding.memory_per_rank=1MB"], "sharding.memory_per_rank=1MB is not read by sharding=round_robin"),
    ],
)
def test_config_errors_found_by_validate_name_the_key(overrides, message):
    """What `validate` finds on every rank before any work (the launched test above shows how
    one of its findings ends the run). In-process, for 2 ranks."""
    from sharded_embedding.hydra_app import compose
    from sharded_embedding.word2vec.config import register, validate

    problems = validate(compose("train", register, overrides), 2)
    assert sum(message in p for p in problems) == 1, problems


def test_config_errors_found_at_composition_or_placement_name_the_key():
    """Hydra's type check and the placement's page count (after the vocabulary), in-process."""
    from sharded_embedding.hydra_app import compose
    from sharded_embedding.word2vec.config import ConfigError, placement, register

    with pytest.raises(Exception, match="Error merging override model.dim=wide") as raised:
        compose("train", register, ["model.dim=wide"])
    # (the app's message adds the cause: hydra_app.main)
    assert "Value 'wide' of type 'str' could not be converted to Integer" in str(raised.value.__cause__)
    cfg = compose("train", register, ["sharding=hot_mirrored", "sharding.hot_pages=100"])
    with pytest.raises(ConfigError, match=r"sharding.hot_pages=100, but the tables have 16 pages"):
        placement(cfg, 7978, 2)


def test_round_robin_takes_num_devices():
    """sharding.num_devices was validated and then ignored (every rank got pages)."""
    from sharded_embedding.hydra_app import compose
    from sharded_embedding.word2vec.config import placement, register

    cfg = compose("train", register, ["sharding.num_devices=2", "sharding.page_size=1000"])
    assert placement(cfg, 7978, 3) == [0, 1, 0, 1, 0, 1, 0, 1]
    assert placement(compose("train", register, []), 7978, 3) == "round_robin"
    assert placement(compose("train", register, ["sharding.num_devices=3"]), 7978, 3) == "round_robin"


def test_short_training_run_on_two_ranks(tmp_path):
    from gensim.models import KeyedVectors

    done = _train(tmp_path, "train.epochs=2", "train.log_every=5")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["vocabulary"] == 7978 and metrics["words_per_second"] > 0
    assert metrics["transport"] == "shared_memory"  # model.transport=auto, every rank on this machine
    assert metrics["resumed_at_step"] == 0  # a fresh run
    curve = [loss for _, loss in metrics["loss_curve"]]
    assert len(curve) >= 4 and curve[-1] < curve[0] - 0.3  # the loss falls
    kv = KeyedVectors.load_word2vec_format(str(tmp_path / "out" / "vectors.txt"))
    assert kv.vectors.shape == (7978, 100) and kv.index_to_key[:3] == ["state", "time", "american"]  # by frequency
    assert set(metrics["evaluation"]) >= {"wordsim353_spearman", "simlex999_spearman", "analogy_accuracy"}
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000
    # Hydra on several ranks: one run folder with rank 0's files, logs written once.
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "train.log"]
    assert out.count("trained 2 epochs") == 1 and out.count("WordSim-353 Spearman") == 1
    assert "trained 2 epochs" in (tmp_path / "run" / "train.log").read_text()


def test_sharding_auto_plans_the_tables_and_prints_the_report_once(tmp_path):
    done = _train(tmp_path, "sharding=auto", "train.epochs=1", "evaluate=false")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert out.count("Placement plan: 2 tables of 7,978 x 100 float32, optimizer rowwise_adagrad, 2 ranks") == 1
    assert out.count("imbalance of rows served max/mean") == 1 and "placement (sharding=auto)" in out
    log = (tmp_path / "run" / "train.log").read_text()
    page_size = int(log.split("page_size ")[1].split(":")[0].replace(",", ""))
    assert f"pages of {page_size} rows per table, auto" in log  # the tables were built with the plan's pages
    lines = (tmp_path / "out" / "vectors.txt").read_text().splitlines()
    assert lines[0] == "7978 100" and len(lines) == 7979


def test_every_sharding_kind_prints_what_its_placement_costs(tmp_path):
    done = _train(tmp_path, "sharding=hot_mirrored", "train.epochs=1", "evaluate=false")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert out.count("Placement sharding=hot_mirrored: 2 tables of 7,978 x 100") == 1
    assert "* pages 0 on every rank" in out or "0:*0,1" in out  # the mirrored hot page is marked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(tmp_path):
    """launch/multinode.sh twice on 127.0.0.1: node 0 with two ranks, node 1 with one."""
    port = _free_port()
    common = ["train.epochs=1", "train.bind_cpus=false", "evaluate=false", f"out_dir={tmp_path / 'out'}"]
    nodes = []
    for node, nproc in ((0, 2), (1, 1)):
        env = _env(NNODES=2, NODE_RANK=node, NPROC=nproc, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   RDZV_ID=f"test-{port}")
        nodes.append(subprocess.Popen(
            ["bash", "launch/multinode.sh", *common, f"hydra.run.dir={tmp_path / f'run{node}'}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-4000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 3
    lines = (tmp_path / "out" / "vectors.txt").read_text().splitlines()
    assert lines[0] == "7978 100" and len(lines) == 7979  # every rank wrote its pages in place


def test_a_vocabulary_that_min_count_empties_is_a_data_error(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("a b a\nc a b\n")
    done = _train(tmp_path, f"data.path={corpus}")
    out = done.stdout + done.stderr
    message = ("data error: the vocabulary is empty: no word of the corpus's 6 tokens occurs data.min_count=5 "
               "times or more (the most frequent occurs 3 times). Lower data.min_count")
    assert out.count(message) == 1, out[-3000:]  # one message, no traceback
    assert "training failed" not in out and done.returncode == 2  # the data-error path, not a crash


def test_hydra_multirun_runs_each_job_in_its_own_folder(tmp_path):
    """`-m` sweeps run one job after another on the same ranks, each in its own folder."""
    done = subprocess.run(
        ["bash", "launch/train.sh", "-m", "optimizer=sgd,adagrad", "train.epochs=1", "evaluate=false",
         "model.transport=process_group",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, env=_env(NPROC=2), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    names = [json.loads((job / "metrics.json").read_text())["optimizer"]["name"] for job in jobs]
    assert names == ["sgd", "adagrad"]
    assert {json.loads((job / "metrics.json").read_text())["transport"] for job in jobs} == {"process_group"}
    for job in jobs:
        assert (job / "vectors.txt").exists() and (job / "train.log").exists() and (job / ".hydra").is_dir()
    assert (done.stdout + done.stderr).count("outputs in") == 2  # rank 0 alone logs


def _resume_refusals(out: str) -> list[list[str]]:
    """`train._resume_refusal` of the checkpoints in ``out`` (from a 2-rank run with
    train.batch_centers=500): resumed as it was, on 1 rank, with another optimizer."""
    from sharded_embedding.hydra_app import compose
    from sharded_embedding.train import _resume_refusal
    from sharded_embedding.word2vec.config import register

    def refusal(*overrides, world=2):
        cfg = compose("train", register, ["train.epochs=1", "train.batch_centers=500", "train.resume=true",
                                          f"out_dir={out}", *overrides])
        return _resume_refusal(cfg, Path(out) / "checkpoints", world)

    return [refusal(), refusal(world=1), refusal("optimizer=sgd")]


def test_a_resume_that_changes_the_data_order_is_refused_naming_the_key(tmp_path):
    first = _train(tmp_path, "train.epochs=1", "train.batch_centers=500", "train.checkpoint_every=2",
                   "evaluate=false")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    before = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())

    def corpus_cache():  # a refused resume rewrote the manifest and vocabulary, and encoded for its world size
        return sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out" / "corpus").rglob("*"))

    cache = corpus_cache()
    done = _train(tmp_path, "train.epochs=1", "train.batch_centers=200", "train.resume=true", "evaluate=false")
    out = done.stdout + done.stderr
    assert done.returncode == 2
    assert out.count("settings that decide the data order: train.batch_centers=500 (now 200)") == 1, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == before  # nothing changed
    assert corpus_cache() == cache
    # Another world size, another optimizer (its state does not fit: sgd resumed silently,
    # dropping it): refused by the same check, before anything is written (in-process: a launch
    # takes the path to exit code 2 shown above)
    as_it_was, other_world, other_optimizer = run_ranks(1, _resume_refusals, str(tmp_path / "out"))[0]
    assert as_it_was == []  # the run as it was resumes
    assert ["world_size=2 (now 1)" in e for e in other_world] == [True], other_world
    assert ["was trained with optimizer=rowwise_adagrad (now optimizer=sgd)" in e for e in other_optimizer] == [True]
    assert corpus_cache() == cache
    # A fresh run (no resume) into that out_dir would prune its own checkpoints (the earlier
    # run's steps are higher) and a later resume would export the earlier run: refused.
    done = _train(tmp_path, "train.epochs=1", "evaluate=false")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert out.count("holds checkpoints of an earlier run (newest: step_") == 1 and "train.resume=true" in out, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == before


def test_a_diverged_run_stops_with_one_message_and_keeps_the_last_good_checkpoint(tmp_path):
    import numpy as np

    done = _train(tmp_path, "optimizer=sgd", "optimizer.lr=0.1", "train.epochs=2", "train.checkpoint_every=4",
                  "train.log_every=4")
    out = done.stdout + done.stderr
    assert done.returncode == 3
    assert out.count("training diverged at step") == 1, out[-3000:]
    assert "Lower optimizer.lr (now 0.1 with optimizer=sgd)" in out
    assert not (tmp_path / "out" / "vectors.txt").exists()  # nothing reported as a result
    # The reading at step 4 was still fine (a checkpoint is only written after a fine reading);
    # at step 8 the loss had exploded: the run stops there and step 4 stays the last checkpoint.
    assert "training diverged at step 8 " in out
    kept = sorted((tmp_path / "out" / "checkpoints").glob("step_*[0-9]"))
    assert [p.name for p in kept] == ["step_000000004"] and f"The last good checkpoint is {kept[-1]}" in out
    assert all(np.isfinite(np.load(kept[-1] / f"{t}.weight.npy")).all() for t in ("inputs", "outputs"))


def test_corpus_bytes_that_are_not_utf8_stop_the_run_naming_file_line_and_option(tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(("the cat sat\n" * 30 + "café cafè résumé rèsumé\n" * 10).encode("latin-1"))
    done = _train(tmp_path, f"data.path={corpus}", "data.min_count=1")
    out = done.stdout + done.stderr
    assert done.returncode == 2
    assert out.count(f"{corpus}, line 31: bytes ") == 1, out[-3000:]
    assert "Set data.encoding to the file's encoding" in out and not (tmp_path / "out" / "vectors.txt").exists()
    done = _train(tmp_path, f"data.path={corpus}", "data.min_count=1", "data.encoding=latin-1", "train.epochs=1",
                  "evaluate=false", "out_dir=" + str(tmp_path / "ok"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    words = [line.split(" ", 1)[0] for line in (tmp_path / "ok" / "vectors.txt").read_text().splitlines()[1:]]
    assert sorted(words) == sorted(["the", "cat", "sat", "café", "cafè", "résumé", "rèsumé"])


def test_a_gzip_corpus_is_read_as_text(tmp_path):
    import gzip

    corpus = tmp_path / "corpus.txt.gz"
    with gzip.open(corpus, "wt") as f:
        f.write("alpha beta gamma delta\n" * 50)
    done = _train(tmp_path, f"data.path={corpus}", "data.min_count=1", "train.epochs=1", "evaluate=false")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = (tmp_path / "out" / "vectors.txt").read_text().splitlines()
    assert lines[0] == "4 100" and sorted(x.split(" ", 1)[0] for x in lines[1:]) == ["alpha", "beta", "delta", "gamma"]


def test_metrics_hold_null_where_a_number_is_not_finite():
    """metrics.json stays valid JSON: a NaN or infinite reading is written as null, never as a
    number (nor as JSON's invalid NaN)."""
    from sharded_embedding.train import _finite

    metrics = {"loss": float("nan"), "curve": [[1, float("inf")], [2, 0.5]], "spearman": -float("inf"), "n": 3}
    assert json.loads(json.dumps(_finite(metrics), allow_nan=False)) == {
        "loss": None, "curve": [[1, None], [2, 0.5]], "spearman": None, "n": 3}


def test_a_resume_after_the_corpus_changed_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 40 + "a dog ran in the park\n" * 40)
    run = ["data=text", f"data.path={corpus}", "data.min_count=1", "train.epochs=1", "evaluate=false"]
    assert _train(tmp_path, *run).returncode == 0
    stat = corpus.stat()
    cache = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out" / "corpus").rglob("*"))
    with corpus.open("a") as f:
        f.write("park\n" * 30)  # the same words: only their counts, so their order, change
    done = _train(tmp_path, *run, "train.resume=true")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert out.count("cannot resume:") == 1 and "corpus files (path, bytes, mtime)" in out
    # refused from the checkpoint's marker, before the corpus was read: its cache is untouched
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out" / "corpus").rglob("*")) == cache
    # Other counts in a file of the same size and time, and no corpus cache (whose key is the
    # files' size and time): only the vocabulary tells, once read.
    shutil.rmtree(tmp_path / "out" / "corpus")
    corpus.write_text("the cat sat on the mat\n" * 30 + "the dog sat on the mat\n" * 10 + "a dog ran in the park\n" * 40)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert corpus.stat().st_size == stat.st_size
    done = _train(tmp_path, *run, "train.resume=true")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert out.count("cannot resume:") == 1 and "vocabulary (digest)" in out, out[-3000:]
    assert "corpus files (path, bytes, mtime)" not in out


def test_a_sweep_whose_jobs_share_out_dir_is_refused(tmp_path):
    done = subprocess.run(["bash", "launch/train.sh", "-m", "optimizer=sgd,adagrad", f"out_dir={tmp_path / 'same'}"],
                          cwd=ROOT, env=_env(NPROC=2), capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 2 and out.count("the jobs of this sweep would all write into out_dir=") == 1, out[-3000:]
    assert not (tmp_path / "same").exists()


def test_relative_paths_are_relative_to_where_the_job_is_launched(tmp_path):
    (tmp_path / "corpus.txt").write_text("alpha beta gamma\n" * 30)
    done = subprocess.run(["bash", str(ROOT / "launch" / "train.sh"), "data=text", "data.path=corpus.txt",
                           "data.min_count=1", "train.epochs=1", "evaluate=false", "out_dir=out",
                           "hydra.run.dir=run"], cwd=tmp_path, env=_env(NPROC=2), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (tmp_path / "out" / "vectors.txt").exists() and (tmp_path / "run" / "train.log").exists()


def test_sharding_auto_takes_a_page_size_given_and_chooses_one_otherwise():
    """`sharding=auto sharding.page_size=64` plans the placement of 64-row pages (the key is
    not ignored); left null, the planner picks the page size. In-process, no launch."""
    import numpy as np

    from sharded_embedding.hydra_app import compose
    from sharded_embedding.word2vec.config import register, sharding, validate

    counts = np.sort(np.random.default_rng(0).zipf(1.3, 5000).astype(np.int64))[::-1].copy()
    fixed = compose("train", register, ["sharding=auto", "sharding.page_size=64"])
    chosen = compose("train", register, ["sharding=auto"])
    assert validate(fixed, 2) == [] and validate(chosen, 2) == []
    got = sharding(fixed, counts, 2)
    assert got.page_size == 64 and len(got.placement) == -(-5000 // 64)
    assert chosen.sharding.page_size is None and sharding(chosen, counts, 2).page_size >= 1
    assert any("sharding.page_size must be >= 1" in e
               for e in validate(compose("train", register, ["sharding.page_size=null"]), 2))


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """Hydra's default run folder is the second the run started: two launches in the same
    second wrote into one folder (mixed logs, one's config beside the other's metrics). The
    second now gets the folder with -1 after it."""
    from sharded_embedding.hydra_app import _claim

    stamp = str(tmp_path / "outputs" / "2026-11-30" / "13-04-38")
    assert _claim(stamp) == stamp and _claim(stamp) == stamp + "-1" and _claim(stamp) == stamp + "-2"


def test_a_correlation_over_too_few_pairs_is_not_reported():
    """With 2-3 WordSim pairs in vocabulary the job printed 'Spearman 1.000'; below MIN_PAIRS
    the score is n/a (None), with the pairs counted; over enough pairs it is gensim's."""
    import numpy as np
    from gensim.models import KeyedVectors

    from sharded_embedding.word2vec.evaluation import MIN_PAIRS, evaluate_vectors, format_table

    few = KeyedVectors(4)
    few.add_vectors(["tiger", "cat", "king", "queen"], np.random.default_rng(0).random((4, 4), dtype=np.float32))
    got = evaluate_vectors(few)
    assert got["wordsim353_spearman"] is None and 0 < got["wordsim353_pairs"] < MIN_PAIRS, got
    assert "n/a" in format_table(got)
    words = sorted({w for line in open(__import__("gensim.test.utils", fromlist=["datapath"]).datapath("wordsim353.tsv"))
                    if line[0] != "#" for w in line.split("\t")[:2]})
    many = KeyedVectors(4)
    many.add_vectors(words, np.random.default_rng(0).random((len(words), 4), dtype=np.float32))
    got = evaluate_vectors(many)
    assert got["wordsim353_pairs"] >= MIN_PAIRS and got["wordsim353_spearman"] is not None


def test_a_checkpoint_folder_in_use_by_a_running_job_is_refused(tmp_path):
    """Workers outlive a launcher killed with SIGKILL; a resume started beside them wrote the same
    checkpoint folder (a fresh user saw it crash, or finish by chance). Rank 0 holds a lock on
    the folder while it runs: another run is refused, naming the holder."""
    from tests.app_helpers import held_lock

    with held_lock(tmp_path / "out" / "checkpoints", "12345"):
        done = _train(tmp_path, "train.epochs=1", "evaluate=false", "train.resume=true")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert out.count("is in use by another run (its rank 0 is process 12345, still running)") == 1, out[-3000:]
