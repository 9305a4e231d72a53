# Airflow with the matrix-provider (the Airflow side only: hooks, operators, triggers, sensors, links,
# the Matrix view). No `runtime` extra: Airflow talks to Ray over the Jobs REST API, Ray is not installed.
#
# Build context: this docker/ folder with wheels/matrix_provider-<version>-py3-none-any.whl
# (`uv build --wheel --out-dir docker/wheels`). Installed under Airflow's constraints file, as Airflow's
# docs ask of anything added to its image, with apache-airflow pinned in the same command so pip cannot
# move Airflow itself.
#
# DAGs are not copied in: a platform delivers them its own way (git-sync, a volume, an object-store
# bundle) and changes them far more often than the image; baking the example DAGs in would ship them to
# every deployment. The shipped examples are in the repo's dags/ folder.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG AIRFLOW_VERSION
ARG PYTHON_VERSION
# A URL, or a file under wheels/ seen as /tmp/matrix/wheels/<name> (an offline build or a mirror).
ARG AIRFLOW_CONSTRAINTS=https://raw.githubusercontent.com/apache/airflow/constraints-${AIRFLOW_VERSION}/constraints-${PYTHON_VERSION}.txt
ARG MATRIX_VERSION=0.1.0
# Extras of matrix-provider: `airflow` (the provider's Airflow floor), plus `s3` to read an s3:// output's
# manifest from the workers.
ARG MATRIX_EXTRAS="airflow"
LABEL org.opencontainers.image.title="Apache Airflow with matrix-provider" \
      org.opencontainers.image.description="Airflow ${AIRFLOW_VERSION} (Python ${PYTHON_VERSION}) with the matrix-provider" \
      org.opencontainers.image.version="${MATRIX_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The official image's `airflow` user (uid 50000, group root 0); its docs install extra packages as it.
USER 50000:0
RUN --mount=type=bind,source=wheels,target=/tmp/matrix/wheels \
    pip install --no-cache-dir --constraint "${AIRFLOW_CONSTRAINTS}" "apache-airflow==${AIRFLOW_VERSION}" \
        "/tmp/matrix/wheels/matrix_provider-${MATRIX_VERSION}-py3-none-any.whl${MATRIX_EXTRAS:+[${MATRIX_EXTRAS}]}" \
    && python -c "from matrix_provider.provider_info import get_provider_info; print(get_provider_info()['package-name'])"
