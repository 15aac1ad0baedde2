"""plansim: planner — plan-space enumeration, pruning, evaluation (local pool | Ray), ranking, Pareto."""
from plansim.planner.search import OBJECTIVES, PARETO_METRICS, explain, pareto_front, search
from plansim.planner.space import Constraint, SearchSpace

__all__ = ["search", "explain", "pareto_front", "SearchSpace", "Constraint", "OBJECTIVES", "PARETO_METRICS"]
