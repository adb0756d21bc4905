"""Experiment tracking and the model registry (MLflow): every training, preference, tune and compress run is logged
once its artifact is complete (tracking/runs.py), and `llmstack serve` registers what it serves (tracking/registry.py).
A shared library below the stages: it reads artifact folders and imports only the spine."""
