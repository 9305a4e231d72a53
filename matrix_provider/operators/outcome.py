"""How a finished Ray job becomes a task result: its manifest, its failure text, its asset extra.

Shared by the pipeline operator and the sensor. The manifest is the job's last `[matrix] manifest`
line, read from a bounded log tail; when Ray cannot serve the log (a dashboard restart, an expired
driver log) the run's own `_manifest.json` in the output folder answers instead.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from matrix_provider.hooks.ray_jobs import MatrixRayHook, RayJobsError
from matrix_provider.protocol import MANIFEST_FIGURES, error_text, parse_manifest

# The one import of AirflowException for the Airflow side (operators, sensor).
try:
    from airflow.sdk.exceptions import AirflowException
except ImportError:  # pragma: no cover - older layouts
    from airflow.exceptions import AirflowException

# Read once per job. After the manifest line, actors being torn down can still print a few hundred
# lines (asyncio's "Task was destroyed…"), so the tail reaches well past them.
MANIFEST_TAIL_LINES = 2000


def manifest_of(hook: MatrixRayHook, submission_id: str, output_uri: str | None) -> dict[str, Any]:
    log_error = ""
    try:
        manifest = parse_manifest(hook.tail_logs(submission_id, MANIFEST_TAIL_LINES))
        if manifest is not None:
            return manifest
        log_error = "its log tail has no manifest line"
    except RayJobsError as exc:
        log_error = f"its log could not be read ({exc})"
    if output_uri:
        try:
            return _manifest_file(output_uri)
        except Exception as exc:  # any filesystem's error: report it beside the log's
            raise AirflowException(
                f"Ray job {submission_id} succeeded but {log_error}, and {output_uri.rstrip('/')}/_manifest.json "
                f"could not be read ({type(exc).__name__}: {exc})"
            ) from None
    raise AirflowException(f"Ray job {submission_id} succeeded but {log_error}")


def _manifest_file(output_uri: str) -> dict[str, Any]:
    import fsspec

    with fsspec.open(output_uri.rstrip("/") + "/_manifest.json", "rt") as handle:
        manifest = json.load(handle)
    manifest.pop("spec", None)
    return manifest


def failure_message(hook: MatrixRayHook, event: dict[str, Any]) -> str:
    """The event's message plus the job's own error line (or its log's last lines)."""
    detail = ""
    if event["status"] in ("FAILED", "STOPPED"):
        with contextlib.suppress(RayJobsError):
            detail = error_text(hook.tail_logs(event["submission_id"], MANIFEST_TAIL_LINES))
    return f"Ray job {event['submission_id']} {event['status']}: {event.get('message') or ''}\n{detail}".strip()


def outlet_extra(manifest: dict[str, Any], submission_id: str) -> dict[str, Any]:
    return {k: manifest.get(k) for k in MANIFEST_FIGURES} | {
        "output": manifest.get("output"),
        "ray_submission_id": submission_id,
    }


def will_retry(context: Any) -> bool:
    ti = context["ti"]
    return int(getattr(ti, "try_number", 1) or 1) <= int(getattr(ti, "max_tries", 0) or 0)
