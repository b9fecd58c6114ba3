"""Many runs at once: sweep points and their budgets, the planner, grid sweeps, Optuna search, result tables, bench."""
