# syntax=docker/dockerfile:1
# Images from one file:
#   docker build --target serving -t lsoftmax-serve .           # slim server, serving/ only, ONNX models, no PyTorch
#   docker build --target serving --build-arg REQUIREMENTS=requirements-serving-cuda.txt -t lsoftmax-serve:cuda .
#                                                               # + CUDA runtime and cuDNN: ONNX on an NVIDIA GPU
#   docker build --target serving --build-arg REQUIREMENTS=requirements-serving-torchscript.txt \
#       -t lsoftmax-serve:torchscript .                         # + PyTorch: TorchScript models too (CPU or CUDA)
#   docker build --target train-cuda -t lsoftmax-train .        # training + export, CUDA via PyPI's torch
# Run the server with a model repository mounted at /models:
#   docker run -p 50051:50051 -p 8000:8000 -p 8002:8002 -v "$PWD/model_repository:/models:ro" lsoftmax-serve

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- serving dependencies, built in a throw-away stage --------------------------------------
FROM ${PYTHON_IMAGE} AS serving-deps
ARG REQUIREMENTS=requirements-serving.txt
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements-serving.txt requirements-serving-cuda.txt requirements-serving-torchscript.txt /tmp/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r "/tmp/${REQUIREMENTS}"

# ---- serving image: runtime deps + serving/ only (server and client; dev tools stay in scripts/), non-root ----
FROM ${PYTHON_IMAGE} AS serving
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin serve
COPY --from=serving-deps /opt/venv /opt/venv
WORKDIR /app
COPY serving/ /app/serving/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001
# 50051: gRPC (lsoftmax.v1, KServe v2, health, reflection); 8000: HTTP (KServe v2 REST, the typed API, the page);
# 8002: Prometheus metrics.
EXPOSE 50051 8000 8002
# Healthy once grpc.health.v1 reports SERVING (model loaded and warmed up).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-m", "serving.client.probe", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--metrics-port", "8002", "--model-repository", "/models"]

# ---- training on CUDA: the whole project, torch's CUDA build from PyPI ---------------------
FROM ${PYTHON_IMAGE} AS train-cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin train
WORKDIR /app
COPY pyproject.toml README.md /app/
COPY training/ /app/training/
COPY export/ /app/export/
COPY serving/ /app/serving/
COPY bench/ /app/bench/
RUN pip install --no-cache-dir /app
USER 10001
ENV LSOFTMAX_CACHE=/home/train/.cache/lsoftmax-serve
ENTRYPOINT ["python", "-m", "training"]
CMD ["--model", "paper", "--margin", "4", "--device", "cuda", "--out", "/home/train/runs/paper_m4"]
