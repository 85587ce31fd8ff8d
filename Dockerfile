# The model server image: Python 3.13, jax[cuda12] and the rest of the model server's share of
# requirements.txt at the exact versions of docker/constraints.txt, the code, and entrypoint.sh as
# the command. README.md ("Deploying on Vast.ai Serverless") describes the Vast.ai setup, the two
# launch modes and every environment variable.
FROM python:3.13-slim-bookworm

# Vast.ai's PyWorker bootstrap, which entrypoint.sh (or the template's on-start script) runs in this
# container, needs curl, git and openssl; the model server itself needs none of them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl git openssl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The PyWorker's section of requirements.txt (vastai and what it needs) is for the venv that Vast's
# bootstrap builds from the whole file; the image runs only the model server.
COPY requirements.txt docker/constraints.txt ./
RUN sed '/^# pyworker-only/,$d' requirements.txt > model-server-requirements.txt \
    && pip install --no-cache-dir -r model-server-requirements.txt -c constraints.txt \
    && pip check

COPY jaxbench/ jaxbench/
COPY service/ service/
COPY start_server.sh entrypoint.sh ./

# The model server has no authentication: it listens on loopback only, behind the PyWorker, and its
# port is not EXPOSEd (Vast publishes every EXPOSEd port). `docker run -e MODEL_SERVER_HOST=0.0.0.0`
# opens it for a local test.
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
