"""Hyperparameter search over the SFT recipe (Optuna): the search space and study settings (config.py), the search
(search.py) and its trials table and plot (report.py)."""
