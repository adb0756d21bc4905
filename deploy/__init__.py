"""Deployment: the Bento builder (bento.py, `llmstack bento`) beside what it builds with (bentofile.yaml, docker/,
requirements/, kubernetes/, compose, prometheus/, grafana/). It packages the serving stage; no stage imports it."""
