"""plansim: workloads."""
