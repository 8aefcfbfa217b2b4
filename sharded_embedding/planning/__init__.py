"""Placement planning: choose `page_size` and a per-page placement from the table's shape, the
world, the optimizer, a memory budget and the law of the ids, and say what it costs."""

from .laws import Counts, IdLaw, Uniform, Zipf, parse_law, uniform, zipf
from .model import CostModel
from .report import PlacementPlan, RankPrediction
from .search import PlanningError, plan_placement, predict_placement

__all__ = ["plan_placement", "predict_placement", "PlacementPlan", "RankPrediction", "PlanningError", "CostModel",
           "IdLaw", "Zipf", "Uniform", "Counts", "zipf", "uniform", "parse_law"]
