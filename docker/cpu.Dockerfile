# syntax=docker/dockerfile:1
# symscale on CPU: the README's install on the official Python image. PyTorch's CPU build (the
# README's line for machines without a GPU) goes into .venv first, so that `make setup` keeps it
# instead of taking PyPI's CUDA build. Build from the repository root:
#
#   docker build -f docker/cpu.Dockerfile -t symscale:cpu .
#   docker run --rm symscale:cpu                    # `make train`: the main job on the embedded sample
#   docker compose -f docker/compose.yaml up ...    # two nodes of one rank (docs/docker.md)
FROM python:3.11.13-slim-bookworm

# tests/docker/test_docker.py checks this lies in pyproject.toml's torch range
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# make runs the install and the main job; g++ is Inductor's CPU compiler (`--compile`).
# Debian's point releases replace these versions, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make g++ \
 && rm -rf /var/lib/apt/lists/*

# A user of its own; /shared is the mount point of the run directory and shards that several nodes
# share (an empty named volume mounted there takes this owner).
RUN useradd --create-home --shell /bin/bash --uid 1000 symscale \
 && mkdir -p /opt/symscale /shared \
 && chown symscale:symscale /opt/symscale /shared
USER 1000:1000
WORKDIR /opt/symscale

RUN python3 -m venv .venv \
 && .venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# the repository, embedded sample data included (.dockerignore leaves out .venv, .cache, runs, .git)
COPY --chown=1000:1000 . .
RUN make setup

ENV PATH=/opt/symscale/.venv/bin:$PATH
CMD ["make", "train"]
