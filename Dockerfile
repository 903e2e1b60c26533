# memstore image: the `memstore` CLI, Ray and torch. docker-compose.yml uses the same image for
# the Ray head, the memory nodes (shard actors), `memstore up` and the trainer.
#
#   docker build -t memstore .                                  # CPU torch (default)
#   docker build -t memstore:cu128 \
#     --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
#
# TORCH_SPEC is handed to `pip install` word for word (as in .ci/setup). torch is installed
# before the project so pip never swaps it for the default (CUDA) wheel from PyPI.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    RAY_USAGE_STATS_ENABLED=0 \
    MEMSTORE_PORT_BASE=7700 \
    MEMSTORE_METRICS_PORT_BASE=9700 \
    MEMSTORE_DATA_DIR=/var/lib/memstore

# Non-root user; the data directory (shard write-ahead logs and checkpoints) is created and
# owned here so that a fresh named volume mounted on it inherits the ownership.
RUN groupadd --system --gid 1000 memstore \
 && useradd --system --uid 1000 --gid memstore --create-home --home-dir /home/memstore memstore \
 && mkdir -p /var/lib/memstore /etc/memstore \
 && chown memstore:memstore /var/lib/memstore

WORKDIR /opt/memstore

# 1) torch, then the project's dependencies read from pyproject.toml alone: these layers are
#    rebuilt only when TORCH_SPEC or pyproject.toml change, not on every source edit.
#    ray[default] adds the dashboard (port 8265) and Prometheus client to the plain `ray` dependency.
COPY pyproject.toml ./
RUN pip install ${TORCH_SPEC} \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "ray[default]" \
 && rm /tmp/requirements.txt

# 2) the project itself (its dependencies are already satisfied, so torch stays as installed).
COPY . .
RUN pip install . \
 && (cd / && python -c "import torch, memstore.cli.main; print('torch', torch.__version__)") \
 && rm -rf build *.egg-info \
 && cp cluster/store.example.toml /etc/memstore/store.toml

USER memstore
WORKDIR /home/memstore

# Ray: GCS (6379), dashboard (8265), Ray Client (10001).
# Shards: gRPC from MEMSTORE_PORT_BASE and Prometheus metrics from MEMSTORE_METRICS_PORT_BASE up
# (shard i of a store binds MEMSTORE_PORT_BASE + i; 16 ports of each are declared).
EXPOSE 6379 8265 10001 7700-7715 9700-9715

ENTRYPOINT ["memstore"]
CMD ["--help"]
