"""The tau2 pipeline with a scripted user and assistant instead of LLMs (tools and reward are the real ones).

The row's `script` says what the assistant does:
- `gold`: the task's gold actions as tool calls, one per turn, then a message with every piece of
  information the task expects the agent to tell the user;
- `nothing`: one message, no tool call;
- `bad_tools`: a call of a tool that does not exist, then a real tool with arguments its schema refuses.
The user opens with its scenario and stops (###STOP###) once the assistant has spoken without a tool call.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage
from tau2.user.base import STOP

from matrix_provider.pipelines.tau2 import PIPELINE, as_dict, find_task, open_dialogue
from matrix_provider.runtime.orchestrator import Orchestrator
from matrix_provider.runtime.roles import Role


def _spoken(msg: Orchestrator) -> list[dict[str, Any]]:
    """The assistant's messages since the dialogue opened."""
    return [m for m in msg.history[msg.results["tau2"]["start"] :] if m["role"] == "assistant"]


class ScriptedUser(Role):
    async def run(self, msg: Orchestrator) -> None:
        if "tau2" not in msg.results:
            open_dialogue(msg, self.params)  # the real row checks and opening
        state = msg.results["tau2"]
        text = STOP if _spoken(msg) else str(find_task(state["domain"], state["task_id"]).user_scenario)[:200]
        msg.history.append(as_dict(UserMessage(role="user", content=text)))


class ScriptedAssistant(Role):
    async def run(self, msg: Orchestrator) -> None:
        state = msg.results["tau2"]
        task = find_task(state["domain"], state["task_id"])
        calls = self.script(msg.row["script"], task)
        turn = len(_spoken(msg))
        if turn < len(calls):
            call = ToolCall(id=f"call_{turn}", name=calls[turn][0], arguments=calls[turn][1], requestor="assistant")
            message = AssistantMessage(role="assistant", tool_calls=[call])
        else:
            told = (task.evaluation_criteria.communicate_info or []) if msg.row["script"] == "gold" else []
            message = AssistantMessage(role="assistant", content=" ".join(["Done.", *told]))
        msg.history.append(as_dict(message))

    @staticmethod
    def script(kind: str, task: Any) -> list[tuple[str, dict[str, Any]]]:
        if kind == "gold":
            return [(a.name, a.arguments) for a in task.evaluation_criteria.actions or []]
        if kind == "bad_tools":
            return [("no_such_tool", {}), ("get_user_details", {"user_id": "mia_li_3668", "bogus": json.dumps(1)})]
        return []


PIPELINE = dataclasses.replace(
    PIPELINE, name="tau2_scripted", roles={**PIPELINE.roles, "user": ScriptedUser, "assistant": ScriptedAssistant}
)
