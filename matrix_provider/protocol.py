"""What the Ray job prints and the Airflow side reads: the contract between the two halves.

The runtime prints `[matrix] progress k=v …` lines while it runs and one
`[matrix] manifest {json}` line at the end; the operator streams the first into the task log and
returns the second as its XCom value. Shipped pipeline names are listed here so the Airflow side
can reject an unknown name before submitting anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROGRESS_PREFIX = "[matrix] progress "
MANIFEST_PREFIX = "[matrix] manifest "
ERROR_PREFIX = "matrix: error: "
PIPELINES_DIR = Path(__file__).resolve().parent / "pipelines"
# Manifest figures the Airflow side shows (UI) and attaches to Asset events.
MANIFEST_FIGURES = (
    "rows_in",
    "rows_ok",
    "rows_filtered",
    "rows_error",
    "rows_resumed",
    "prompt_tokens",
    "completion_tokens",
    "tokens_per_s",
    "wall_seconds",
    "config_hash",
)


def shipped_pipelines() -> list[str]:
    return sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))


def parse_manifest(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(MANIFEST_PREFIX):
            return json.loads(line[len(MANIFEST_PREFIX) :])
    return None


def parse_progress(line: str) -> dict[str, float] | None:
    if not line.startswith(PROGRESS_PREFIX):
        return None
    figures = {}
    for item in line[len(PROGRESS_PREFIX) :].split():
        key, _, value = item.partition("=")
        try:
            figures[key] = float(value)
        except ValueError:
            continue
    return figures


def new_progress(tail: str, last: str) -> list[str]:
    """Progress lines of a log tail that come after `last`, the newest line already shown.

    Lines carry `elapsed_s`, so each is unique; when `last` has scrolled out of the tail, every
    progress line in it is new.
    """
    lines = [line for line in tail.splitlines() if line.startswith(PROGRESS_PREFIX)]
    if last in lines:
        return lines[len(lines) - lines[::-1].index(last) :]
    return lines


def error_text(logs: str, tail_lines: int = 20) -> str:
    """The job's own error message if it printed one, else the tail of its log."""
    errors = [line for line in logs.splitlines() if line.startswith(ERROR_PREFIX)]
    if errors:
        return errors[-1]
    return "\n".join(logs.strip().splitlines()[-tail_lines:])
