"""plansim: validation/runner."""
