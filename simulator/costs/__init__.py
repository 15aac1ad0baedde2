"""plansim: simulator/costs."""
