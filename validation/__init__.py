"""plansim: validation."""
