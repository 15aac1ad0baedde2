"""plansim: planner."""
