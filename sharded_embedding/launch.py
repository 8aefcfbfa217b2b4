"""torchrun for this package's jobs, keeping their exit codes and their messages.

    python -m sharded_embedding.launch [torchrun options] -m sharded_embedding.train [overrides]

The arguments are exactly torchrun's (``torch.distributed.run``), and so is everything it does
(rendezvous, restarts, signals). The one difference: when workers fail, torchrun raises
``ChildFailedError``, which prints a Python traceback and a report block after the job's own
message and exits 1 whatever the workers' codes. The jobs here report their errors themselves,
once, on rank 0, and exit with a code that means something (2: configuration or data, 3:
training diverged, 1: anything else). This prints one line instead of the traceback and exits
with the largest code a worker exited with (or 128 + the signal that killed one; not the
SIGTERM with which torchrun stops the other workers once one has failed); a launcher
stopped by a signal (Ctrl-C, SIGTERM) says so in one line and exits 128 + the signal.
torchrun's own log lines of the first failure ("failed (exitcode: ...) local_rank: ...") and
of its stopping the other workers ("Sending process ... closing signal SIGTERM") are left out:
that one line says it, for every rank (a code, or the signal that ended it).
"""

from __future__ import annotations

import logging
import signal
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_FirstFailureLine())
    try:
        run(args)
    except SignalException as e:  # torchrun stops the workers, then raises this with a traceback
        print(f"{args.training_script}: interrupted by {e.sigval.name}: the workers were stopped (rerun with "
              "train.resume=true and the same out_dir to continue from the last checkpoint, if it wrote one)",
              file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        exited = [c for c in codes.values() if c > 0]
        killed = [128 - c for c in codes.values() if c < 0 and -c != signal.SIGTERM]
        # Once a worker has failed, torchrun stops the others with SIGTERM: that is not their
        # failure; it is only when every failure is a SIGTERM (one from outside)
        worst = max([*exited, *killed], default=128 + signal.SIGTERM if codes else 1)
        detail = ", ".join(
            f"rank {r}: {'code ' + str(c) if c > 0 else 'signal ' + str(-c)}" for r, c in sorted(codes.items())
        )
        why = "its message is above" if any(c > 0 for c in codes.values()) else \
            "a worker was killed (by a signal: out of memory, a kill): there is no message of its own"
        print(f"{e.name}: stopped ({detail}); {why}", file=sys.stderr, flush=True)
        return worst
    return 0


class _FirstFailureLine(logging.Filter):
    """Drops torchrun's "failed (exitcode: ...)" and "Sending process ... closing signal ..."
    records: the launcher's line reports every rank's code or signal. (Whether the second
    appears is a race: whether the other workers had exited by the time torchrun looked.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("failed (exitcode:") or msg.startswith("Sending process %s closing signal"))


if __name__ == "__main__":
    sys.exit(main())
