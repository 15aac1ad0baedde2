"""plansim: hardware_profiles."""
