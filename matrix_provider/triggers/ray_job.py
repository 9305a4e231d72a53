"""MatrixRayJobTrigger: waits for a Ray job in the triggerer, never blocking its event loop.

It logs the job's new `[matrix] progress` lines (read from a bounded log tail, parsed in a
thread), fires one event when the job ends, and stops the job when a user kills the task.
A dashboard outage is waited out for up to `outage_budget_s`; only then does it fire ERROR, naming
the URL and how long it was down. The Ray job keeps running: a retry re-attaches to it. (Airflow
re-creates a trigger from the kwargs it was deferred with, so a triggerer restart starts the
budget afresh.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from matrix_provider.clusters.cluster import ended as cluster_ended
from matrix_provider.hooks.ray_jobs import TERMINAL, MatrixRayHook, RayJobsError, RayUnavailable
from matrix_provider.protocol import new_progress

TAIL_LINES = 100


class MatrixRayJobTrigger(BaseTrigger):
    def __init__(
        self,
        submission_id: str,
        ray_conn_id: str,
        poll_interval: float = 5.0,
        deadline: float | None = None,
        outage_budget_s: float = 900.0,
        outage_since: float | None = None,
        last_progress: str = "",
        stream_progress: bool = True,
        cluster: dict[str, Any] | None = None,
        cancel_on_kill: bool = True,
    ):
        super().__init__()
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.outage_budget_s = outage_budget_s
        self.outage_since = outage_since
        self.last_progress = last_progress
        self.stream_progress = stream_progress
        self.cluster = cluster
        self.cancel_on_kill = cancel_on_kill

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "submission_id": self.submission_id,
                "ray_conn_id": self.ray_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "outage_budget_s": self.outage_budget_s,
                "outage_since": self.outage_since,
                "last_progress": self.last_progress,
                "stream_progress": self.stream_progress,
                "cluster": self.cluster,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    def _event(self, status: str, message: str) -> TriggerEvent:
        return TriggerEvent({"status": status, "submission_id": self.submission_id, "message": message})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # Short retries per call, so an outage shows in the task log as it happens; the budget spans calls.
        hook = MatrixRayHook(self.ray_conn_id, retry_s=min(5.0, self.outage_budget_s), cluster=self.cluster)
        try:
            async for event in self._watch(hook):
                yield event
                return
        finally:
            await hook.aclose()

    async def _watch(self, hook: MatrixRayHook) -> AsyncIterator[TriggerEvent]:
        while True:
            # First, so it holds while the dashboard is down too: the task's execution_timeout is kept.
            if self.deadline is not None and time.time() > self.deadline:
                yield await self._timeout(hook)
                return
            try:
                job = await hook.aget_job(self.submission_id)
                if self.stream_progress and job is not None:
                    await self._log_progress(hook, job.get("driver_node_id"))
                self.outage_since = None
            except RayUnavailable as exc:
                self.outage_since = self.outage_since or time.time()
                down = time.time() - self.outage_since
                gone = await asyncio.to_thread(cluster_ended, self.cluster) if self.cluster else None
                if gone:
                    yield self._event("ERROR", f"{exc} — {gone}: Ray job {self.submission_id} ended with it")
                    return
                if down >= self.outage_budget_s:
                    yield self._event(
                        "ERROR",
                        f"{exc} — gave up after {down:.0f}s (outage_budget_s={self.outage_budget_s:.0f}); "
                        f"Ray job {self.submission_id} was left running and a retry re-attaches to it",
                    )
                    return
                self.log.warning("Ray dashboard unavailable for %.0fs, waiting: %s", down, exc)
                await asyncio.sleep(self.poll_interval)
                continue
            except RayJobsError as exc:
                yield self._event("ERROR", str(exc))
                return
            if job is None:
                yield self._event("MISSING", "the Ray job disappeared from the cluster")
                return
            if job["status"] in TERMINAL:
                yield self._event(job["status"], job.get("message") or "")
                return
            await asyncio.sleep(self.poll_interval)

    async def _timeout(self, hook: MatrixRayHook) -> TriggerEvent:
        """TIMEOUT, after trying to stop the job: a stop that fails is reported, never a crashed trigger."""
        try:
            if not await hook.astop(self.submission_id):  # it ended first: report how it ended
                job = await hook.aget_job(self.submission_id)
                if job is not None and job["status"] in TERMINAL:
                    return self._event(job["status"], job.get("message") or "")
            outcome = "the Ray job was stopped"
        except RayJobsError as exc:
            outcome = f"stopping Ray job {self.submission_id} failed ({exc}): stop it by hand"
        return self._event("TIMEOUT", f"execution_timeout reached; {outcome}")

    async def _log_progress(self, hook: MatrixRayHook, node_id: str | None) -> None:
        if not node_id:
            return
        tail = await hook.atail_logs(self.submission_id, TAIL_LINES, node_id)
        fresh = await asyncio.to_thread(new_progress, tail, self.last_progress)
        for line in fresh:
            self.log.info("%s", line)
        if fresh:
            self.last_progress = fresh[-1]

    async def on_kill(self) -> None:
        """A user killed the deferred task: stop the Ray job too (unless `cancel_on_kill=False`)."""
        if not self.cancel_on_kill:
            self.log.info("left Ray job %s running (cancel_on_kill=False)", self.submission_id)
            return
        hook = MatrixRayHook(self.ray_conn_id, cluster=self.cluster)
        try:
            self.log.info("stopped Ray job %s: %s", self.submission_id, await hook.astop(self.submission_id))
        finally:
            await hook.aclose()


async def first_event(trigger: BaseTrigger) -> dict[str, Any]:
    """The payload of a trigger's one event (how a worker waits with the trigger's loop)."""
    async for event in trigger.run():
        return event.payload
    raise RuntimeError(f"{type(trigger).__name__} ended without an event")
