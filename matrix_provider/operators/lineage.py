"""OpenLineage for a pipeline run: the input folder is read, the output folder is written.

Dataset names follow OpenLineage's naming conventions: `s3://bucket` + key path for object
stores, `file` + absolute path for local folders. Imported only when the OpenLineage provider
asks (it is optional).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


def dataset_name(uri: str) -> tuple[str, str]:
    """(namespace, name) of a folder or glob URI."""
    if "://" not in uri:
        return "file", uri.rstrip("/") or "/"
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return "file", parts.path.rstrip("/") or "/"
    return f"{parts.scheme}://{parts.netloc}", parts.path.strip("/") or "/"


def lineage_for(input_uri: str, output_uri: str) -> Any:
    from airflow.providers.common.compat.openlineage.facet import Dataset
    from airflow.providers.openlineage.extractors import OperatorLineage

    return OperatorLineage(
        inputs=[Dataset(*dataset_name(input_uri))],
        outputs=[Dataset(*dataset_name(output_uri))],
    )
