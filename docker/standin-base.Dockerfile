# A stand-in for rayproject/ray:2.60.0-py311, made here because no registry can be reached from this
# machine: `make image` builds docker/runtime.Dockerfile on it, offline. It reproduces what the runtime
# image relies on: user `ray` (uid 1000, group users 100) owning a Python 3.11 env first on PATH,
# with pip and Ray installed, HOME and WORKDIR /home/ray, and libgomp1 (kept in Ray's GPU images).
#
# FROM is a minimal Debian 12 rootfs made with debootstrap from Debian's mirror (python3 is 3.11 there,
# so the cp311 manylinux wheels the host downloads for the lock install as they are). Its Python
# packages come from the wheelhouse in the build context; PIP_NO_INDEX tells pip there is no index.
ARG DEBIAN_IMAGE=localhost/matrix-debian:bookworm
FROM ${DEBIAN_IMAGE}

ARG RAY_VERSION=2.60.0
LABEL org.opencontainers.image.title="stand-in for rayproject/ray:${RAY_VERSION}-py311 (offline, local only)"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN useradd --create-home --home-dir /home/ray --shell /bin/bash --uid 1000 --gid 100 ray

USER 1000:100
ENV HOME=/home/ray \
    PATH=/home/ray/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_INDEX=1 \
    RAY_USAGE_STATS_ENABLED=0
WORKDIR /home/ray
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \
    python3 -m venv /home/ray/venv \
    && python -m pip install --no-cache-dir --find-links /tmp/wheels "ray[default,serve,data]==${RAY_VERSION}" \
    && ray --version
