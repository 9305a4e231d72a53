# GPU variant of the Ray runtime image, one image per LLM engine (build with --target):
#   --target vllm    (the default, last stage)  vLLM through Ray Serve LLM (`llm: vllm`)
#   --target sglang                             SGLang's server under a Serve replica (`llm: sglang`)
# Same build context as runtime.Dockerfile (docker/ with wheels/matrix_provider-*.whl). Not built by
# `make image`: no GPU and no registry here; tests/test_docker.py runs hadolint on it.
#
# Why two images and not one: vLLM and SGLang pin their kernels exactly and the pins clash (sglang 0.5.23
# wants quack-kernels 0.6.5, vLLM 0.29.0 0.6.4; sglang 0.5.19-0.5.21 want numba 0.65.1, vLLM 0.65.0),
# and the matrix runtime starts SGLang with its own interpreter, so both would have to share one env.
# Why not uv.lock here: each engine pins its own torch and more (vLLM 0.29.0 needs protobuf<7, the lock
# has 7.x; sglang 0.5.23 needs numpy<2.4, the lock has 2.4.6). So each stage resolves the provider's
# runtime extra together with the pinned engine in one pip call. Checked with `uv pip compile` for
# Python 3.11 on manylinux_2_35 x86_64 (2026-11): vllm stage -> torch 2.13.0, flashinfer 0.6.18;
# sglang stage -> torch 2.14.1, flashinfer 0.7.2; both keep pyarrow 26.0.1 and pydantic 2.14.3.
# vLLM 0.29.0 is the version Ray 2.60.0's own `ray[llm]` extra pins. The embedded CPU engine is left out.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE} AS runtime

ARG BASE_IMAGE
ARG MATRIX_VERSION=0.1.0
LABEL org.opencontainers.image.title="matrix-provider runtime (GPU)" \
      org.opencontainers.image.description="Ray runtime for matrix-provider with a GPU LLM engine" \
      org.opencontainers.image.version="${MATRIX_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 1000:100
WORKDIR /home/ray
COPY wheels/matrix_provider-${MATRIX_VERSION}-py3-none-any.whl /tmp/matrix/

FROM runtime AS sglang
ARG MATRIX_VERSION=0.1.0
ARG RAY_VERSION=2.60.0
ARG SGLANG_VERSION=0.5.23
LABEL org.opencontainers.image.title="matrix-provider runtime (GPU, SGLang ${SGLANG_VERSION})"
RUN python -m pip install --no-cache-dir \
        "/tmp/matrix/matrix_provider-${MATRIX_VERSION}-py3-none-any.whl[runtime,s3]" \
        "ray[default,serve,data]==${RAY_VERSION}" "sglang==${SGLANG_VERSION}" \
    && matrix --help >/dev/null \
    && python -c "import sglang, matrix_provider.runtime.job"

FROM runtime AS vllm
ARG MATRIX_VERSION=0.1.0
ARG RAY_VERSION=2.60.0
ARG VLLM_VERSION=0.29.0
LABEL org.opencontainers.image.title="matrix-provider runtime (GPU, vLLM ${VLLM_VERSION})"
RUN python -m pip install --no-cache-dir \
        "/tmp/matrix/matrix_provider-${MATRIX_VERSION}-py3-none-any.whl[runtime,s3]" \
        "ray[default,serve,data,llm]==${RAY_VERSION}" "vllm==${VLLM_VERSION}" \
    && matrix --help >/dev/null \
    && python -c "import vllm, ray.serve.llm, matrix_provider.runtime.job"
