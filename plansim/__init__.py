"""plansim: plansim."""
