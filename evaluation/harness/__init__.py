"""lm-evaluation-harness on our models: running tasks on a model folder, an ONNX variant or an endpoint (run.py), the
`llmstack harness` and `llmstack report` commands (cli.py), and the shipped ticket tasks (tasks/, tasks_list.py)."""
