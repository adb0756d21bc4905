"""Bias and fairness checks: counterfactual probes and group metrics (check.py), reading probes and terms
(probes.py), the report and plot (report.py), the `fairness:` section (config.py) and `llmstack fairness` (cli.py)."""
