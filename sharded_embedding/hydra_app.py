"""Running an app of this package under torchrun with a Hydra config, alike on every rank.

Every rank composes the same config, but only rank 0 keeps Hydra's output folder
(``.hydra/``), its log file and console logging; the other ranks get ``hydra.output_subdir=
null`` and disabled logging, and all ranks share one run folder that rank 0 names and the
others receive, so no per-rank folders appear. Configuration errors are found before any
work, on every rank alike, and reported once (exit code 2). A multirun (``-m``) runs its jobs
one after another in the same processes (Hydra's basic launcher).

Used by the word2vec job (`sharded_embedding.train`) and the click model
(`sharded_embedding.dlrm`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from .distributed import all_gather_strings, bind_local_cpus, init_distributed

__all__ = ["CONFIG_DIR", "lock_folder", "main", "stop"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("sharded_embedding")


def rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def stop(message: str, code: int = 2) -> int:
    """Report an error every rank found alike once (rank 0) and return its exit code (2: a
    configuration or data error) on every rank.

    The message goes to stderr (Hydra's console logging writes to stdout) and, inside a job,
    into the job's log file too. All ranks found the same error; they wait for rank 0's
    message to be out before any of them exits, because torchrun stops the other workers as
    soon as one has exited.
    """
    if rank0():
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():  # inside the job: its log file as well
            record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.handle(record)
        print(message, file=sys.stderr, flush=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return code


_LOCKS: list[int] = []  # open lock files: held until the process ends


def lock_folder(directory: Path) -> str | None:
    """Take ``directory/.lock`` (an exclusive flock, held until this process ends; call on rank
    0), so that two runs never write one checkpoint folder at once: workers outlive a launcher
    killed with SIGKILL (torchrun starts them in a session of their own), and a resume started
    beside them wrote the same checkpoints. What stops this run, or None."""
    import fcntl

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return f"{directory}: cannot create its lock file: {e}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        return (f"{directory} is in use by another run (its rank 0 is process {holder}, still running): wait for it "
                "or stop it first (workers can outlive a launcher killed with SIGKILL)")
    except OSError as e:  # a filesystem without locks (some network or FUSE mounts): run unguarded
        os.close(fd)
        log.warning("%s cannot be locked (%s): nothing keeps a second run from writing into it", directory, e)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKS.append(fd)
    return None


def compose(config_name: str, register, overrides: list[str]):
    """Compose the config the way hydra.main will, to reject bad keys/types before any work."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def folder_problem(folder) -> str | None:
    """Why ``folder`` cannot be a folder an app writes into (None: it can, or it is unset).
    Probes the nearest existing folder by making and removing a temporary folder in it, so
    places that look writable but refuse folders (``/proc``, read-only mounts) are caught."""
    import tempfile

    if not folder:
        return None
    path = os.path.abspath(os.path.expanduser(str(folder)))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing == path and not os.path.isdir(path):
        return "exists and is not a folder"
    if existing != path and not os.path.isdir(existing):
        return f"cannot be created: {existing} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=existing))
    except OSError as e:
        return f"cannot be {'written' if existing == path else 'created'}: {existing} refuses new folders ({e.strerror})"
    return None


def unknown_added_keys(config_name: str, register, overrides: list[str]) -> list[str]:
    """The ``+key=value`` overrides whose key is not in the app's configuration: Hydra adds
    them, and the app would silently ignore them (a typo like ``+train.epoch=1``)."""
    from omegaconf import OmegaConf

    added = [o for o in overrides if o.startswith("+") and "=" in o]
    if not added:
        return []
    base = compose(config_name, register, [o for o in overrides if not o.startswith("+")])
    missing = object()
    return [o for o in added if OmegaConf.select(base, o.lstrip("+").split("=", 1)[0], default=missing) is missing]


def sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a Hydra multirun (``-m``): one override list per combination."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def shared_out_dir(configs) -> str | None:
    """The out_dir several jobs of a sweep would share (their outputs would overwrite each
    other), if any; an out_dir with an interpolation (``${hydra:job.num}``) differs per job."""
    from omegaconf import OmegaConf

    raw = [OmegaConf.to_container(c, resolve=False).get("out_dir") for c in configs]
    fixed = [r for r in raw if r and "${" not in str(r)]
    return next((r for r in fixed if fixed.count(r) > 1), None)


def _claim(folder: str) -> str:
    """``folder``, made here, or ``folder-1``, ``folder-2``, ... if another run made it first
    (two launches in the same second shared Hydra's default folder: mixed logs and configs)."""
    for n in range(1000):
        name = folder if n == 0 else f"{folder}-{n}"
        try:
            os.makedirs(name, exist_ok=False)
            return name
        except FileExistsError:
            continue
        except OSError:
            return folder  # cannot make it here: Hydra reports the folder problem itself
    return folder


def agreed_run_dir(overrides: list[str], multirun: bool) -> list[str]:
    """Hydra overrides that put every rank in one run (or sweep) folder, Hydra's files and
    logs on rank 0 only."""
    key, pattern = ("hydra.sweep.dir", "multirun/%Y-%m-%d/%H-%M-%S") if multirun else \
        ("hydra.run.dir", "outputs/%Y-%m-%d/%H-%M-%S")
    extra = []
    if not any(o.startswith(key + "=") for o in overrides):
        stamp = _claim(time.strftime(pattern)) if dist.get_rank() == 0 else ""
        if dist.get_world_size() > 1:
            stamp = all_gather_strings(stamp)[0]  # rank 0's
        extra.append(f"{key}={stamp}")
    if dist.get_rank() != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra


def main(argv: list[str] | None, *, config_name: str, register, run, bind_cpus, log: logging.Logger,
         failed: str = "the run failed") -> int:
    """The entry point of an app: ``run(cfg) -> exit code`` once per job, under Hydra, with
    ``configs/<config_name>.yaml`` (``register()`` stores its schema). ``bind_cpus(cfg)``:
    whether to pin each local rank to its own cores first. Returns the worst exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    exit_code = {"code": 0}

    def entry():
        import hydra

        register()

        @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
        def task(cfg) -> None:  # once per job: the worst exit code of a sweep is the process's
            try:
                code = run(cfg)
            except BaseException as e:  # noqa: BLE001 - every failing rank reports (other ranks log nothing)
                if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                    raise
                # (torch's DCP raises CheckpointException, a BaseException: it must not skip finish())
                if dist.get_rank() == 0:
                    log.exception(failed)
                else:
                    print(f"[rank {dist.get_rank()}] {failed}:\n{traceback.format_exc()}", file=sys.stderr,
                          flush=True)
                code = 1
            exit_code["code"] = max(exit_code["code"], code)

        task()

    if any(a.startswith("-") for a in overrides):  # --help, --cfg job, ...: Hydra's own, printed once
        if not rank0():
            return 0
        sys.argv = [sys.argv[0], *argv]
        entry()
        return 0
    try:  # every job's config, checked before any work
        configs = [compose(config_name, register, job) for job in (sweep(overrides) if multirun else [overrides])]
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for bad configs
        cause = f"\n  {e.__cause__}" if e.__cause__ is not None else ""
        init_distributed()
        text = str(e).split("\nTo append")[0]  # Hydra's '+key' hint: added keys are refused (see below)
        return stop(f"configuration error: {text}{cause}")
    added = unknown_added_keys(config_name, register, overrides)
    if added:
        init_distributed()
        return stop(f"configuration error: {', '.join(added)}: not a key of this app's configuration (Hydra's "
                    "'+' adds a key, which the app would ignore); see docs/configuration.md for the keys")
    shared = shared_out_dir(configs) if multirun else None
    if shared:
        init_distributed()
        return stop(f"configuration error: the jobs of this sweep would all write into out_dir={shared}: leave "
                    "out_dir unset (each job writes under hydra.sweep.dir) or make it differ per job, e.g. "
                    "out_dir=/data/sweep/${hydra:job.num}")
    if bind_cpus(configs[0]):
        bind_local_cpus()
    init_distributed()
    # A multirun's jobs run one after another in these same processes (Hydra's basic
    # launcher), each in its own folder under the sweep folder. Hydra names the job (and its
    # log file) after the module of the task: name it after the app.
    name = [] if any(o.startswith("hydra.job.name=") for o in overrides) else [f"hydra.job.name={config_name}"]
    sys.argv = [sys.argv[0], *(["-m"] if multirun else []), *overrides, *name, *agreed_run_dir(overrides, multirun)]
    try:
        entry()
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: one line, not a traceback per rank
        if dist.get_rank() == 0:
            print("interrupted (SIGINT): rerun with train.resume=true and the same out_dir to continue from its last "
                  "checkpoint, if it wrote one (train.checkpoint_every)", file=sys.stderr, flush=True)
        return 130
    return exit_code["code"]
