"""plansim: a discrete-event performance simulator and planner for ML training and serving.

Public API (mirrors the CLI): :func:`simulate`, :func:`predict_op`, :func:`predict_collective`,
:func:`search` and the input types :class:`Plan`.
"""
from plansim.api import (Plan, PlanError, ProfileError, Result, complete_plan, load_plan, predict_collective,
                         predict_op, resolve_cluster, simulate)
from plansim.planner import search

__all__ = ["simulate", "search", "predict_op", "predict_collective", "resolve_cluster", "complete_plan", "load_plan",
           "Plan", "PlanError", "ProfileError", "Result"]
__version__ = "0.1.0"
