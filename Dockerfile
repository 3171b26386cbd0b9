# Lookalike: the Label Studio ML backend (`lookalike serve`) and its indexing workers
# (`lookalike worker`) in one image. docker-compose.yml runs both.
#
#   docker build -t lookalike .                                   # CPU torch (default)
#   docker build -t lookalike \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .   # CUDA torch
FROM python:3.11-slim

# Where torch and torchvision come from. The CPU wheels are far smaller than PyPI's default
# (CUDA) ones. Keep the versions in step with scripts/test.sh.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOOKALIKE_DATA_DIR=/data

# torch first, from TORCH_INDEX: the project install below then finds it satisfied and does not
# pull another build of it from PyPI.
RUN pip install --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY pyproject.toml README.md /tmp/src/
COPY backend /tmp/src/backend
# With the Milvus client, so the same image runs with or without LOOKALIKE_VECTOR_DB.
RUN pip install "/tmp/src[milvus]" && rm -rf /tmp/src

# Run as an unprivileged user. /data/models exists in the image owned by that user, so a fresh
# named volume mounted there (the model cache) starts out writable by it.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin lookalike \
    && mkdir -p /data/models \
    && chown -R lookalike:lookalike /data
USER lookalike
WORKDIR /data

EXPOSE 9090
# No ENTRYPOINT: a compose `command:` is the whole command line, exactly as the README shows it
# (`lookalike serve ...`, `lookalike worker`).
CMD ["lookalike", "serve", "--host", "0.0.0.0", "--port", "9090"]
