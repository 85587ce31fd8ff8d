# The model server image: Python 3.13, the model server's share of requirements.txt and JAX's GPU
# runtime at the exact versions of docker/constraints-<flavour>.txt, the code, and entrypoint.sh as
# the command. README.md ("Deploying on Vast.ai Serverless") describes the Vast.ai setup, the two
# launch modes and every environment variable.
FROM python:3.13-slim-bookworm

# Vast.ai's PyWorker bootstrap, which entrypoint.sh (or the template's on-start script) runs in this
# container, needs curl, git and openssl; the model server itself needs none of them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl git openssl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The flavour: cuda12 (the default) or cuda13 for Blackwell hosts, whose cards need cuBLAS >= 13.2
# (`docker build --build-arg JAX_CUDA=cuda13 .`; CI tags it `<tag>-cuda13`). It picks
# requirements-<flavour>.txt and docker/constraints-<flavour>.txt.
ARG JAX_CUDA=cuda12

# The PyWorker's section of requirements.txt (vastai and what it needs) is for the venv that Vast's
# bootstrap builds from the whole file; the image runs only the model server.
COPY requirements.txt requirements-${JAX_CUDA}.txt docker/constraints-${JAX_CUDA}.txt ./
RUN sed '/^# pyworker-only/,$d' requirements.txt > model-server-requirements.txt \
    && pip install --no-cache-dir -r model-server-requirements.txt -r requirements-${JAX_CUDA}.txt -c constraints-${JAX_CUDA}.txt \
    && pip check

COPY jaxbench/ jaxbench/
COPY service/ service/
COPY start_server.sh entrypoint.sh ./

# The model server has no authentication: it listens on loopback only, behind the PyWorker, and its
# port is not EXPOSEd (Vast publishes every EXPOSEd port). `docker run -e MODEL_SERVER_HOST=0.0.0.0`
# opens it for a local test. The PyWorker's port is: 3000, the WORKER_PORT Vast's bootstrap defaults
# to; the vastai SDK finds its public address in VAST_TCP_PORT_3000, which Vast sets for a published
# port only.
EXPOSE 3000
ENV PYTHONUNBUFFERED=1 \
    MODEL_SERVER_HOST=127.0.0.1 \
    MODEL_SERVER_PORT=18000 \
    MODEL_SERVER_PYTHON=/usr/local/bin/python3 \
    MODEL_LOG=/var/log/model/server.log \
    JAXBENCH_CACHE_DIR=/var/cache/jaxbench/xla \
    XLA_PYTHON_CLIENT_PREALLOCATE=true \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.90
RUN mkdir -p /var/log/model /var/cache/jaxbench/xla

HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MODEL_SERVER_PORT', '18000'), timeout=5)"]
CMD ["/app/entrypoint.sh"]
