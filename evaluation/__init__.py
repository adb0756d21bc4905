"""Measuring a model, shared by the stages: greedy generation, loss / perplexity and the task metrics (quality.py,
metrics.py), speed and memory of a model folder in its own process (measure.py, measure_openvino.py), and the `eval:`
config section (config.py)."""
