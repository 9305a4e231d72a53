"""MatrixRayJobTrigger: waits for a Ray job in the triggerer, never blocking its event loop.

It streams the job's `[matrix] progress` lines into the task log as they appear, fires one event
when the job ends, and stops the job when a user kills the task (mark failed/success, clear).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from matrix_provider.hooks.ray_jobs import TERMINAL, MatrixRayHook, RayJobsError
from matrix_provider.protocol import PROGRESS_PREFIX


class MatrixRayJobTrigger(BaseTrigger):
    def __init__(
        self,
        submission_id: str,
        ray_conn_id: str,
        poll_interval: float = 5.0,
        log_offset: int = 0,
        deadline: float | None = None,
    ):
        super().__init__()
        self.deadline = deadline
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.poll_interval = poll_interval
        self.log_offset = log_offset

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "submission_id": self.submission_id,
                "ray_conn_id": self.ray_conn_id,
                "poll_interval": self.poll_interval,
                "log_offset": self.log_offset,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = MatrixRayHook(self.ray_conn_id)
        try:
            while True:
                job = await hook.aget_job(self.submission_id)
                await self._stream_progress(hook)
                if job is None:
                    yield TriggerEvent(
                        {
                            "status": "MISSING",
                            "submission_id": self.submission_id,
                            "message": "the Ray job disappeared from the cluster",
                        }
                    )
                    return
                if job["status"] in TERMINAL:
                    yield TriggerEvent(
                        {
                            "status": job["status"],
                            "submission_id": self.submission_id,
                            "message": job.get("message") or "",
                        }
                    )
                    return
                if self.deadline is not None and time.time() > self.deadline:
                    await hook.astop(self.submission_id)
                    yield TriggerEvent(
                        {
                            "status": "TIMEOUT",
                            "submission_id": self.submission_id,
                            "message": "execution_timeout reached; the Ray job was stopped",
                        }
                    )
                    return
                await asyncio.sleep(self.poll_interval)
        except RayJobsError as exc:
            yield TriggerEvent({"status": "ERROR", "submission_id": self.submission_id, "message": str(exc)})

    async def _stream_progress(self, hook: MatrixRayHook) -> None:
        logs = await hook.aget_logs(self.submission_id)
        fresh, self.log_offset = logs[self.log_offset :], len(logs)
        for line in fresh.splitlines():
            if line.startswith(PROGRESS_PREFIX):
                self.log.info("%s", line)

    async def on_kill(self) -> None:
        """A user killed the deferred task: stop the Ray job too."""
        stopped = await MatrixRayHook(self.ray_conn_id).astop(self.submission_id)
        self.log.info("stopped Ray job %s: %s", self.submission_id, stopped)
