# llmstack/serve-gpu:0.1.0 - the same service (`llmstack serve`) on vLLM and an NVIDIA GPU, over the artifacts mounted
# at /app/artifacts (read-only). Needs the NVIDIA Container Toolkit on the host (docker run --gpus all).
#
#   docker build -f deploy/docker/serve-gpu.Dockerfile -t llmstack/serve-gpu:0.1.0 .     # from the repository root
#   docker run --rm --gpus all --shm-size 8g -p 3000:3000 -v "$PWD/artifacts:/app/artifacts:ro" \
#       llmstack/serve-gpu:0.1.0 --config /app/configs/serve.yaml --host 0.0.0.0 --port 3000 vllm.tensor_parallel_size=1
#
# Two environments, because vLLM pins another transformers than the stack's: /opt/llmstack (the service: BentoML,
# the OpenAI API, metrics, drift; the pinned serving lock, torch CPU build) supervises vLLM's OpenAI server started
# from /opt/vllm (vllm pinned; vLLM's own CUDA torch). The image's /app/configs/serve.yaml is configs/serve.yaml with
# model.path=artifacts/train/latest (vLLM serves HF folders: the training run's merged model), model.backend=vllm
# and vllm.python=/opt/vllm/bin/python, so `--config /app/configs/serve.yaml` alone serves on vLLM.

# ---- builder: both venvs ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS builder

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Ubuntu 24.04's Python 3.12 (the locks are resolved for 3.11 and 3.12); apt versions follow the pinned base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

# vLLM in its own venv; vllm==0.32.0 pins torch==2.13.0 (CUDA 13, hence the CUDA 13.0 base) and its kernels.
RUN python3.12 -m venv /opt/vllm \
    && /opt/vllm/bin/pip install --no-cache-dir vllm==0.32.0

# The stack: torch's CPU build (the service never runs a model itself here), the pinned serving closure, the project.
RUN python3.12 -m venv /opt/llmstack \
    && /opt/llmstack/bin/pip install --no-cache-dir --no-deps --index-url https://download.pytorch.org/whl/cpu \
       torch==2.13.0+cpu
COPY deploy/requirements/serve-cpu.txt /tmp/requirements/serve-cpu.txt
RUN /opt/llmstack/bin/pip install --no-cache-dir --no-deps --requirement /tmp/requirements/serve-cpu.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY llmstack ./llmstack
COPY chatdata ./chatdata
COPY modeling ./modeling
COPY evaluation ./evaluation
COPY serving ./serving
COPY monitoring ./monitoring
COPY runtimes ./runtimes
COPY tracking ./tracking
COPY training ./training
COPY compression ./compression
COPY deploy/__init__.py deploy/bento.py ./deploy/
RUN /opt/llmstack/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

# The GPU defaults, written and validated by the stack's own config loader (a typo fails the build).
COPY configs/serve.yaml /src/configs/serve.yaml
RUN /opt/llmstack/bin/python -c "import yaml; from core.config import load; \
from serving.config import ServeConfig; \
cfg = load(ServeConfig, '/src/configs/serve.yaml', \
['model.path=artifacts/train/latest', 'model.backend=vllm', 'vllm.python=/opt/vllm/bin/python']); \
head = '# configs/serve.yaml with the GPU defaults of deploy/docker/serve-gpu.Dockerfile\n'; \
open('/src/serve-gpu.yaml', 'w').write(head + yaml.safe_dump(cfg.model_dump(mode='json'), sort_keys=False))"

# ---- runtime ---------------------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS runtime

LABEL org.opencontainers.image.title="llmstack/serve-gpu" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="llmstack serve on vLLM (NVIDIA GPU)"

# gcc + python3.12-dev: Triton (vLLM's kernels) compiles its small C launcher at first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 gcc libc6-dev python3.12-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llmstack \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin llmstack

# HOME=/tmp and the cache variables: vLLM, Triton, torch.compile and Hugging Face write their caches to /tmp, the one
# writable path of a read-only container (size it: compose tmpfs / Kubernetes emptyDir).
ENV PATH=/opt/llmstack/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    VLLM_CACHE_ROOT=/tmp/.cache/vllm \
    VLLM_CONFIG_ROOT=/tmp/.config/vllm \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BENTOML_DO_NOT_TRACK=true \
    VLLM_NO_USAGE_STATS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY --from=builder /opt/vllm /opt/vllm
COPY --from=builder /opt/llmstack /opt/llmstack

WORKDIR /app
COPY --from=builder /src/serve-gpu.yaml /app/configs/serve.yaml
RUN mkdir -p /app/artifacts

USER 10001:10001
EXPOSE 3000

# /livez answers while vLLM is still loading (/readyz turns 200 once it serves); vLLM's start can take minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/livez', timeout=4)"]

ENTRYPOINT ["llmstack", "serve"]
CMD ["--config", "/app/configs/serve.yaml", "--host", "0.0.0.0", "--port", "3000"]
