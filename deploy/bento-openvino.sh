#!/bin/sh
# The Bento image's OpenVINO GenAI runtime (docker.setup_script in deploy/bentofile.yaml; BentoML runs it while it
# builds the image, before the Bento's files are copied in, so the pins are here: the same as
# deploy/requirements/openvino-runtime.txt, which tests/test_deploy_bento.py compares). A venv of its own for the
# worker of model.backend=openvino; the service finds it through LLMSTACK_OPENVINO_PYTHON (bentofile envs).
set -eu
python -m venv /opt/openvino
/opt/openvino/bin/pip install --no-cache-dir --no-deps \
    numpy==2.4.6 \
    openvino==2026.4.1 \
    openvino-genai==2026.4.1.0 \
    openvino-telemetry==2025.2.0 \
    openvino-tokenizers==2026.4.1.0
/opt/openvino/bin/python -c "import openvino_genai"
