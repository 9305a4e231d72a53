"""Roles: the stateless steps of a pipeline.

A role is a small class with one `run(msg)`; it reads the orchestrator, calls an LLM, a tool or
plain Python, and records results on the message. It never routes: the orchestrator does.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from matrix_provider.llm.client import Completion, LLMClient
from matrix_provider.runtime.orchestrator import Orchestrator

if TYPE_CHECKING:
    from matrix_provider.sandbox.client import SandboxClient


class RowError(Exception):
    """This row cannot be processed (bad content, unusable answer): it becomes an error row, no retry."""


class Role:
    """Base of every role. `params` are the role's knobs from the spec (`roles.<name>.params`);
    `sandbox` runs tools outside this process, for pipelines with `uses_sandbox`."""

    uses_llm = False
    own_process: ClassVar[str | None] = None
    """Why this role needs actors of its own ("an in-process model", "a sandbox session"): it is
    never chained with its neighbours (`runtime/chains.py`). None lets it share their process."""

    def __init__(
        self,
        name: str,
        spec: Any,
        pipeline_params: dict[str, Any],
        llm: LLMClient | None,
        sandbox: SandboxClient | None = None,
    ):
        self.name = name
        self.spec = spec
        self.params = {**pipeline_params, **spec.params}
        self.llm = llm
        self.sandbox = sandbox

    async def run(self, msg: Orchestrator) -> None:
        raise NotImplementedError


class LLMRole(Role):
    """A role that talks to the LLM; usage is recorded on the message."""

    uses_llm = True

    async def chat(
        self,
        msg: Orchestrator,
        messages: list[dict[str, Any]],
        *,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        max_tokens: int | None = None,
    ) -> Completion:
        assert self.llm is not None
        completion = await self.llm.chat(
            messages,
            sticky_key=msg.id,
            max_tokens=max_tokens or self.spec.max_tokens,
            temperature=self.spec.temperature,
            frequency_penalty=self.spec.frequency_penalty,
            response_format=response_format,
            tools=tools,
        )
        msg.add_usage(completion.prompt_tokens, completion.completion_tokens)
        return completion

    async def chat_json(
        self, msg: Orchestrator, messages: list[dict[str, Any]], schema: dict[str, Any], name: str
    ) -> dict[str, Any]:
        """Ask for a JSON object matching `schema`; an answer that is not one is a row error."""
        completion = await self.chat(
            msg,
            messages,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
        )
        try:
            value = json.loads(completion.text)
        except json.JSONDecodeError:
            if completion.finish_reason == "length":
                raise RowError(
                    f"{self.name}: answer cut off at max_tokens={self.spec.max_tokens} before its JSON closed; "
                    f"raise roles.{self.name}.max_tokens, or roles.{self.name}.frequency_penalty if it repeats itself"
                ) from None
            raise RowError(f"{self.name}: model answer is not JSON: {completion.text[:120]!r}") from None
        if not isinstance(value, dict):
            raise RowError(f"{self.name}: model answer is not a JSON object")
        return value


def json_schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties)}
