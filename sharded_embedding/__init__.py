"""sharded-embedding: embedding tables larger than one device, paged over torch.distributed ranks."""

from .amp import NonFiniteGradientError, use_grad_scaler
from .clipping import clip_grad_norm_
from .collection import ShardedEmbeddingBagCollection, TableConfig
from .ddp import exclude_from_ddp, split_parameters, table_parameters
from .distributed import finish, init_distributed, tune_malloc
from .embedding import ShardedEmbedding, TableAllocationError
from .fused_schedule import FusedOptimizers, fused_optimizer
from .initializers import initial_rows
from .legacy import LargeEmbedding
from .optim_state import shard_optimizer_state
from .placement import PagePlan
from .planning import PlacementPlan, PlanningError, plan_placement

__all__ = [
    "ShardedEmbedding",
    "ShardedEmbeddingBagCollection",
    "TableConfig",
    "LargeEmbedding",
    "PagePlan",
    "plan_placement",
    "PlacementPlan",
    "PlanningError",
    "exclude_from_ddp",
    "split_parameters",
    "table_parameters",
    "use_grad_scaler",
    "NonFiniteGradientError",
    "TableAllocationError",
    "clip_grad_norm_",
    "fused_optimizer",
    "FusedOptimizers",
    "shard_optimizer_state",
    "init_distributed",
    "tune_malloc",
    "finish",
    "initial_rows",
]

__version__ = "0.1.0"
