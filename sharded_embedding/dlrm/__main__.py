"""``python -m sharded_embedding.dlrm [overrides]`` under torchrun (see `loop`, ``launch/dlrm.sh``)."""

from __future__ import annotations

import logging

from ..distributed import finish
from ..hydra_app import main as hydra_main
from .config import register
from .loop import run


def main(argv: list[str] | None = None) -> int:
    return hydra_main(argv, config_name="dlrm", register=register, run=run,
                      bind_cpus=lambda cfg: cfg.train.bind_cpus, log=logging.getLogger("sharded_embedding.dlrm"),
                      failed="training the click model failed")


if __name__ == "__main__":
    finish(main())
