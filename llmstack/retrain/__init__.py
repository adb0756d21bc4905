"""Retraining from served traffic (`llmstack retrain`): a pipeline over the stages, on the CLI's layer."""
