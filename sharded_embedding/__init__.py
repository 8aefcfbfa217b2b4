"""sharded-embedding: embedding tables larger than one device, paged over torch.distributed ranks."""

from .ddp import exclude_from_ddp, split_parameters
from .distributed import finish, init_distributed
from .embedding import ShardedEmbedding
from .initializers import initial_rows
from .legacy import LargeEmbedding
from .placement import PagePlan

__all__ = [
    "ShardedEmbedding",
    "LargeEmbedding",
    "PagePlan",
    "exclude_from_ddp",
    "split_parameters",
    "init_distributed",
    "finish",
    "initial_rows",
]

__version__ = "0.1.0"
