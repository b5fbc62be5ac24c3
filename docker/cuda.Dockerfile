# syntax=docker/dockerfile:1
# symscale on NVIDIA GPUs: the README's install (`make setup`, which takes PyPI's CUDA build of
# torch) on NVIDIA's CUDA base image. torch 2.13.0 from PyPI brings its own CUDA 13.0 runtime,
# cuDNN and NCCL as pip packages; the base supplies the driver hook-up of the NVIDIA Container
# Toolkit (host driver >= 580 for CUDA 13). Build from the repository root:
#
#   docker build -f docker/cuda.Dockerfile -t symscale:cuda .
#   docker run --rm --gpus all --shm-size 16g symscale:cuda make train RANKS=8
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

# tests/docker/test_docker.py checks this lies in pyproject.toml's torch range
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# Python 3.12 and venv, make for the install and the main job; gcc and the Python headers are
# what Triton compiles its launchers with (`--compile`). Ubuntu's updates replace these versions,
# so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev make gcc \
 && rm -rf /var/lib/apt/lists/*

# A user of its own, uid 1000 as in the CPU image (the base's `ubuntu` user, which holds it, goes);
# /shared is the mount point of the run directory and shards that several nodes share.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --shell /bin/bash --uid 1000 symscale \
 && mkdir -p /opt/symscale /shared \
 && chown symscale:symscale /opt/symscale /shared
USER 1000:1000
WORKDIR /opt/symscale

RUN python3 -m venv .venv \
 && .venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"

# the repository, embedded sample data included (.dockerignore leaves out .venv, .cache, runs, .git)
COPY --chown=1000:1000 . .
RUN make setup

ENV PATH=/opt/symscale/.venv/bin:$PATH
CMD ["make", "train"]
