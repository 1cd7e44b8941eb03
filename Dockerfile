# The project in an image, for a Prefect Docker work pool (README, "Deploy to a GPU work pool"). No entry point:
# the Docker worker runs each flow run's own command in the container. Build from the repository root:
#   docker build -t pets-pipeline:latest .
# CUDA comes with the PyPI torch wheels for Linux x86_64 (they depend on the nvidia-* runtime wheels); the GPU
# driver is the host's, handed to the container by the NVIDIA Container Toolkit when the job asks for GPUs.
FROM python:3.11-slim

# git: prefect.yaml's pull steps clone the deployed commit inside the container (flock, from util-linux, is in the
# base image already).
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pets-pipeline
# What `pip install .` reads: the build configuration, its readme, and the packages it lists (pyproject.toml,
# [tool.setuptools] packages).
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY tasks ./tasks
COPY lib ./lib
# setuptools as pyproject.toml's build-system requires (the base image's may be older), kept for the installs below.
RUN pip install --no-cache-dir "setuptools>=68" && pip install --no-cache-dir .

# The pull steps' `pip install .` of each run's clone then builds with the setuptools installed above instead of
# fetching it, and finds every dependency already satisfied: no index needed. (pip reads PIP_NO_BUILD_ISOLATION=0
# as --no-build-isolation.)
ENV PIP_NO_BUILD_ISOLATION=0 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# Downloads and the presize cache (the recipe's cache_dir defaults to $PETS_HOME): mount a volume here to keep them
# from one run's container to the next.
ENV PETS_HOME=/var/lib/pets
