"""plansim: simulator."""
