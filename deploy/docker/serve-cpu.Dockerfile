# llmstack/serve-cpu:0.1.0 - the OpenAI-compatible service (`llmstack serve`: BentoML, OpenVINO GenAI / ONNX Runtime /
# transformers on CPU, Prometheus metrics, drift) over the artifacts mounted at /app/artifacts (read-only).
#
#   docker build -f deploy/docker/serve-cpu.Dockerfile -t llmstack/serve-cpu:0.1.0 .     # from the repository root
#   docker run --rm -p 3000:3000 -v "$PWD/artifacts:/app/artifacts:ro" \
#       -e LLMSTACK_API_KEY_FILE=/run/secrets/key -v "$PWD/key:/run/secrets/key:ro" llmstack/serve-cpu:0.1.0 \
#       --config /app/configs/serve.yaml --host 0.0.0.0 --port 3000 limits.max_running=16
#
# Default model: configs/serve.yaml's model.path artifacts/compress/latest (relative to /app) = the compress run's
# recommended variant. Arguments after the image name replace CMD; keep the first six and append section.key=value
# overrides (`llmstack serve --help`). Checked by tests/test_deploy_docker.py (hadolint + the rules users rely on).

# ---- builder: a venv with the pinned serving closure and the project --------------------------------------------
FROM python:3.11.7-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/llmstack/bin:$PATH

# torch first: the CPU build from PyTorch's index (PyPI's Linux wheel is the CUDA build, gigabytes larger).
RUN python -m venv /opt/llmstack \
    && pip install --no-cache-dir --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu

# The serving closure, every package pinned (deploy/requirements/lock.py); --no-deps: the lock is the whole closure.
COPY deploy/requirements/serve-cpu.txt /tmp/requirements/serve-cpu.txt
RUN pip install --no-cache-dir --no-deps --requirement /tmp/requirements/serve-cpu.txt

# The project itself (console script `llmstack`); its dependencies are the lock above, so --no-deps again.
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
    && llmstack serve --help > /dev/null

# The OpenVINO GenAI runtime in its own venv: the worker of model.backend=openvino (the compress run's openvino
# variants, the default recommendation on CPU). Runtime only: an IR is served, never exported, in this image.
COPY deploy/requirements/openvino-runtime.txt /tmp/requirements/openvino-runtime.txt
RUN python -m venv /opt/openvino \
    && /opt/openvino/bin/pip install --no-cache-dir --no-deps --requirement /tmp/requirements/openvino-runtime.txt \
    && /opt/openvino/bin/python -c "import openvino_genai"

# ---- runtime: the venv, the config, a non-root user ----------------------------------------------------------------
FROM python:3.11.7-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="llmstack/serve-cpu" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="llmstack serve: OpenAI-compatible LLM service on CPU (OpenVINO GenAI, ONNX Runtime)"

# HOME=/tmp: every cache (Hugging Face, BentoML's home) lands on the one writable path of a read-only container.
ENV PATH=/opt/llmstack/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BENTOML_DO_NOT_TRACK=true \
    LLMSTACK_OPENVINO_PYTHON=/opt/openvino/bin/python

RUN groupadd --system --gid 10001 llmstack \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin llmstack

COPY --from=builder /opt/llmstack /opt/llmstack
COPY --from=builder /opt/openvino /opt/openvino

WORKDIR /app
COPY configs/serve.yaml /app/configs/serve.yaml
# The mount point of the artifacts volume (read-only; model.path is relative to /app).
RUN mkdir -p /app/artifacts

USER 10001:10001
EXPOSE 3000

# /livez: the process answers (the model may still be loading; /readyz says when it is ready). slim has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/livez', timeout=4)"]

ENTRYPOINT ["llmstack", "serve"]
CMD ["--config", "/app/configs/serve.yaml", "--host", "0.0.0.0", "--port", "3000"]
