"""tau2-bench's domains for the `tau2` pipeline, and the tool host that runs inside a sandbox worker.

Kept apart from `tau2.py` so that a sandbox worker imports only a domain's environment (under a
second), not litellm and the evaluator that the pipeline's roles need (four seconds and ~150 MB
more), and stays well inside the sandbox's memory limit.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loguru import logger

from matrix_provider.sandbox.host import ToolError

if TYPE_CHECKING:
    from tau2.data_model.tasks import Task
    from tau2.environment.environment import Environment

logger.disable("tau2")  # tau2 logs every tool response at DEBUG and a missing .env at WARNING

# The tau2 registry's domains with their environment and task functions (tau2.registry itself
# imports every agent and so litellm: too heavy for a sandbox worker).
DOMAINS: dict[str, tuple[str, str]] = {
    "mock": ("get_environment", "get_tasks"),
    "airline": ("get_environment", "get_tasks"),
    "retail": ("get_environment", "get_tasks"),
    "telecom": ("get_environment_manual_policy", "get_tasks"),
}


class UnknownTask(ValueError):
    """The row names a domain or task that tau2 does not have."""


def environment_constructor(domain: str) -> Callable[..., Environment]:
    if domain not in DOMAINS:
        raise UnknownTask(f"unknown tau2 domain {domain!r} (known: {', '.join(DOMAINS)})")
    module = importlib.import_module(f"tau2.domains.{domain}.environment")
    return getattr(module, DOMAINS[domain][0])


@functools.cache
def tasks(domain: str) -> dict[str, Task]:
    """The domain's tasks by id, loaded once per process."""
    environment_constructor(domain)  # names an unknown domain
    module = importlib.import_module(f"tau2.domains.{domain}.environment")
    return {task.id: task for task in getattr(module, DOMAINS[domain][1])()}


def find_task(domain: str, task_id: str) -> Task:
    task = tasks(domain).get(task_id)
    if task is None:
        raise UnknownTask(f"tau2 task {task_id!r} not found in domain {domain!r}")
    return task


def task_environment(domain: str, task: Task) -> Environment:
    """The domain's environment in the task's initial state, as tau2's orchestrator sets it up."""
    env = environment_constructor(domain)()
    state = task.initial_state
    env.set_state(
        initialization_data=state.initialization_data if state else None,
        initialization_actions=state.initialization_actions if state else None,
        message_history=list(state.message_history or []) if state else [],
    )
    return env


class Tau2Host:
    """One trajectory's environment: tool calls of the assistant and of the user change its database."""

    def __init__(self, domain: str, task_id: str):
        self.env = task_environment(domain, find_task(domain, task_id))

    def call(self, name: str, arguments: dict[str, Any], requestor: str) -> str:
        """tau2's own tool response; its error text ("Error: Tool 'x' not found.") as a ToolError."""
        from tau2.data_model.message import ToolCall

        reply = self.env.get_response(ToolCall(name=name, arguments=arguments, requestor=requestor))
        if reply.error:
            raise ToolError(reply.content)
        return reply.content or ""


def make_host(domain: str, task_id: str) -> Tau2Host:
    """The sandbox's factory: `matrix_provider.pipelines.tau2_host:make_host` with init {domain, task_id}."""
    return Tau2Host(domain, task_id)
