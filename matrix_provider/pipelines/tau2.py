"""tau2-bench tool-use trajectories on its real domains (airline, retail, telecom, mock).

One input row is one (domain, task, trial); `matrix tau2-tasks` writes such a file. The roles are
those of the Matrix paper's tau2 case study:

- user: an LLM user simulator with tau2's own guidelines, the task's scenario and, where the domain
  has them (telecom), the user's tools. It ends the dialogue with tau2's stop tokens (###STOP###,
  ###TRANSFER###, ###OUT-OF-SCOPE###). As the first role it also loads the task and opens the dialogue
  as tau2 does (the task's message history, else the agent's greeting).
- assistant: an LLM agent with tau2's agent instruction, the domain policy and its tool schemas
  (OpenAI tool calling).
- tools: runs the last message's tool calls in the row's sandbox (`tau2_host`), where the task's
  environment lives for the whole dialogue; tau2's error text (unknown tool, bad arguments) goes
  back as the tool result and the dialogue goes on.
- reward: tau2's own evaluator (`evaluate_simulation`, EvaluationType.ALL) on the dialogue
  converted to tau2's message types, so rewards compare with tau2-bench's.

Termination follows tau2's orchestrator: a user stop token ends it, and so do `max_steps` steps
(a user or assistant message, or one batch of tool results, is a step) or `max_errors` tool
errors, checked whenever the next message is not for the tools. An assistant or user reply that
is empty or whose tool arguments are not a JSON object ends it as tau2's agent_error / user_error.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from tau2.agent.base import is_valid_agent_history_message
from tau2.config import DEFAULT_MAX_ERRORS, DEFAULT_MAX_STEPS
from tau2.data_model.message import AssistantMessage, ToolCall, ToolMessage, UserMessage
from tau2.data_model.simulation import TerminationReason
from tau2.metrics.agent_metrics import is_successful, pass_hat_k
from tau2.user.base import OUT_OF_SCOPE, STOP, TRANSFER, is_valid_user_history_message

from matrix_provider.llm.client import Completion
from matrix_provider.pipelines.tau2_host import UnknownTask, environment_constructor, find_task, tasks
from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import LLMRole, Role, RowError
from matrix_provider.runtime.summary import Summary

if TYPE_CHECKING:
    from tau2.data_model.message import Message

# litellm (imported by tau2's user simulator, agent and evaluator) fetches its model price list from
# the internet at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

HOST = "matrix_provider.pipelines.tau2_host:make_host"
_USER_STOP_TOKENS = (STOP, TRANSFER, OUT_OF_SCOPE)  # tau2's UserSimulator.is_stop
_TYPES: dict[str, type[AssistantMessage | UserMessage | ToolMessage]] = {
    "assistant": AssistantMessage,
    "user": UserMessage,
    "tool": ToolMessage,
}


# -- the task file -----------------------------------------------------------------------------------
def task_rows(domains: list[str], trials: int, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One row per (domain, task, trial): the input of `matrix run tau2`."""
    for domain in domains:
        for task_id in list(tasks(domain))[:limit]:
            for trial in range(trials):
                yield {"id": f"{domain}/{task_id}/{trial}", "domain": domain, "task_id": task_id, "trial": trial}


def write_task_file(uri: str, domains: list[str], trials: int, limit: int | None = None) -> int:
    """Write the task rows as JSONL to a local path or s3:// URI; returns how many."""
    import fsspec

    rows = list(task_rows(domains, trials, limit))
    with fsspec.open(uri, "w", auto_mkdir=True) as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


# -- the dialogue: tau2 messages as JSON-able dicts on the orchestrator's history ---------------------
def as_dict(message: Message) -> dict[str, Any]:
    return message.model_dump(mode="json", exclude_none=True, exclude={"timestamp", "turn_idx"})


def to_tau2(history: list[dict[str, Any]]) -> list[Message]:
    return [_TYPES[m["role"]].model_validate(m) for m in history]


def openai_messages(system: str, messages: list[Message]) -> list[dict[str, Any]]:
    """tau2's own conversion to the chat API, without the null fields some servers refuse."""
    from tau2.data_model.message import SystemMessage
    from tau2.utils.llm_utils import to_litellm_messages

    converted = to_litellm_messages([SystemMessage(role="system", content=system), *messages])
    return [{k: v for k, v in m.items() if v is not None} for m in converted]


def next_speaker(history: list[dict[str, Any]]) -> str | None:
    """Who speaks after the last message, as tau2's orchestrator routes it; None: the user ended it."""
    last = history[-1]
    if last["role"] == "tool":
        return last["requestor"]
    if last.get("tool_calls"):
        return "tools"
    if last["role"] == "assistant":
        return "user"
    return None if any(token in (last.get("content") or "") for token in _USER_STOP_TOKENS) else "assistant"


def counts(history: list[dict[str, Any]], start: int) -> dict[str, int]:
    """tau2's step and error counts of the dialogue after the task's opening messages."""
    steps = turns = calls = errors = 0
    previous = None
    for message in history[start:]:
        if message["role"] == "tool":
            calls += 1
            errors += bool(message.get("error"))
            steps += previous != "tool"  # one batch of tool results is one step
        else:
            steps += 1
            turns += 1
        previous = message["role"]
    return {"steps": steps, "turns": turns, "tool_calls": calls, "tool_errors": errors}


@functools.cache
def tool_schemas(domain: str, requestor: str) -> list[dict[str, Any]]:
    """OpenAI tool schemas of the assistant's or the user's tools (none: the domain has no user tools)."""
    env = environment_constructor(domain)()
    toolkit = env.tools if requestor == "assistant" else env.user_tools
    if toolkit is None:
        return []
    return [tool.openai_schema for tool in toolkit.get_tools().values()]


@functools.cache
def policy(domain: str) -> str:
    return environment_constructor(domain)().get_policy()


# -- routing -----------------------------------------------------------------------------------------
class Tau2Orchestrator(Orchestrator):
    """user opens (and loads the task), then user <-> assistant with tools between, then reward."""

    def route(self, done: str | None) -> str | None:
        if done is None:
            return "user"
        if done == "reward":
            self.finish(OK)
            return None
        state = self.results["tau2"]
        if state.get("termination") is None:
            state["termination"] = self._termination(state)
        if state["termination"] is not None:
            return "reward"
        return next_speaker(self.history)

    def _termination(self, state: dict[str, Any]) -> str | None:
        speaker = next_speaker(self.history)
        if speaker is None:
            return TerminationReason.USER_STOP.value
        if speaker == "tools":  # tau2 checks its limits only when a message is not for the environment
            return None
        figures = counts(self.history, state["start"])
        if figures["steps"] >= state["max_steps"]:
            return TerminationReason.MAX_STEPS.value
        if figures["tool_errors"] >= state["max_errors"]:
            return TerminationReason.TOO_MANY_ERRORS.value
        return None


# -- roles -------------------------------------------------------------------------------------------
class Tau2Role(LLMRole):
    """What the user and assistant share: turning an LLM reply into a tau2 message."""

    requestor = "assistant"  # the message's role and its tool calls' requestor
    protocol_error = TerminationReason.AGENT_ERROR

    def reply(self, msg: Orchestrator, completion: Completion) -> None:
        """Append the reply as a tau2 message; an unusable one ends the dialogue as tau2's *_error."""
        calls = []
        for index, call in enumerate(completion.tool_calls):
            function = call.get("function") or {}
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except json.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                self._protocol_error(msg, f"tool call arguments are not a JSON object: {function.get('arguments')!r}")
                return
            calls.append(
                ToolCall(
                    id=call.get("id") or f"call_{len(msg.history)}_{index}",
                    name=str(function.get("name", "")),
                    arguments=arguments,
                    requestor=self.requestor,
                )
            )
        text = completion.text if completion.text.strip() else None
        if not calls and text is None:
            self._protocol_error(msg, "empty reply")
            return
        message = _TYPES[self.requestor](role=self.requestor, content=text, tool_calls=calls or None)
        msg.history.append(as_dict(message))

    def _protocol_error(self, msg: Orchestrator, reason: str) -> None:
        msg.results["tau2"].update(termination=self.protocol_error.value, note=f"{self.name}: {reason}")


class UserRole(Tau2Role):
    """tau2's user simulator: its guidelines and the task's scenario, the dialogue seen with roles flipped."""

    requestor = "user"
    protocol_error = TerminationReason.USER_ERROR

    async def run(self, msg: Orchestrator) -> None:
        from tau2.user.base import UserState
        from tau2.user.user_simulator import SYSTEM_PROMPT, get_global_user_sim_guidelines

        if "tau2" not in msg.results:
            open_dialogue(msg, self.params)
            if next_speaker(msg.history) != "user":
                return
        state = msg.results["tau2"]
        task = find_task(state["domain"], state["task_id"])
        tools = tool_schemas(state["domain"], "user")
        system = SYSTEM_PROMPT.format(
            global_user_sim_guidelines=get_global_user_sim_guidelines(use_tools=bool(tools)),
            instructions=task.user_scenario,
        )
        seen = [m for m in to_tau2(msg.history) if is_valid_user_history_message(m)]
        flipped = UserState(system_messages=[], messages=seen).flip_roles()
        self.reply(msg, await self.chat(msg, openai_messages(system, flipped), tools=tools or None))


def open_dialogue(msg: Orchestrator, params: dict[str, Any]) -> None:
    """Check the row, load its task and start the dialogue as tau2's orchestrator does."""
    from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE

    row = msg.row
    domain, task_id, trial = row.get("domain"), row.get("task_id"), row.get("trial", 0)
    if not isinstance(domain, str) or not isinstance(task_id, str):
        raise RowError(f"tau2 row needs string 'domain' and 'task_id', got {domain!r} and {task_id!r}")
    if not isinstance(trial, int) or isinstance(trial, bool) or trial < 0:
        raise RowError(f"tau2 row's 'trial' must be a non-negative integer, got {trial!r}")
    try:
        task = find_task(domain, task_id)
    except UnknownTask as exc:
        raise RowError(str(exc)) from None
    opening = task.initial_state.message_history if task.initial_state else None
    msg.history[:] = [as_dict(m) for m in (opening or [DEFAULT_FIRST_AGENT_MESSAGE])]
    msg.set_result(
        "tau2",
        {
            "domain": domain,
            "task_id": task_id,
            "trial": trial,
            "start": len(msg.history),
            "max_steps": int(params.get("max_steps", DEFAULT_MAX_STEPS)),
            "max_errors": int(params.get("max_errors", DEFAULT_MAX_ERRORS)),
            "termination": None,
        },
    )


class AssistantRole(Tau2Role):
    """tau2's LLM agent: its instruction and the domain policy, the domain's tools."""

    async def run(self, msg: Orchestrator) -> None:
        from tau2.agent.llm_agent import AGENT_INSTRUCTION, SYSTEM_PROMPT

        domain = msg.results["tau2"]["domain"]
        system = SYSTEM_PROMPT.format(domain_policy=policy(domain), agent_instruction=AGENT_INSTRUCTION)
        seen = [m for m in to_tau2(msg.history) if is_valid_agent_history_message(m)]
        tools = tool_schemas(domain, "assistant")
        self.reply(msg, await self.chat(msg, openai_messages(system, seen), tools=tools))


class ToolsRole(Role):
    """Runs the last message's tool calls in the row's sandbox, where the task's environment lives."""

    own_process = "a sandbox session"

    async def run(self, msg: Orchestrator) -> None:
        state = msg.results["tau2"]
        init = {"domain": state["domain"], "task_id": state["task_id"]}
        done = successful_calls(msg.history, state["start"])
        results = []  # appended together: a retried step starts from the same history
        for call in msg.history[-1]["tool_calls"]:
            name, arguments, requestor = call["name"], call["arguments"], call["requestor"]
            result = await self.sandbox.call(msg, HOST, init, name, arguments, requestor, done)
            reply = ToolMessage(
                id=call["id"], role="tool", content=result["content"], requestor=requestor, error=result["error"]
            )
            results.append(as_dict(reply))
            if not result["error"]:
                done.append({"name": name, "arguments": arguments, "requestor": requestor})
        msg.history.extend(results)


def successful_calls(history: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """The dialogue's tool calls that succeeded (the sandbox replays them into a new worker)."""
    calls = {c["id"]: c for m in history[start:] for c in m.get("tool_calls") or []}
    return [
        {"name": calls[m["id"]]["name"], "arguments": calls[m["id"]]["arguments"], "requestor": m["requestor"]}
        for m in history[start:]
        if m["role"] == "tool" and not m.get("error") and m["id"] in calls
    ]


class RewardRole(Role):
    """tau2's evaluator on the finished dialogue: the environment replayed and compared with the
    task's gold actions, the expected tool calls and what the agent had to tell the user."""

    async def run(self, msg: Orchestrator) -> None:
        state = msg.results["tau2"]
        try:
            info = await asyncio.to_thread(evaluate, state, msg.history, self.params)
        except Exception as exc:  # the evaluator replays the dialogue; a replay that differs cannot be scored
            raise RowError(f"reward: tau2's evaluator failed: {type(exc).__name__}: {exc}") from None
        breakdown = {str(getattr(k, "value", k)): v for k, v in (info.reward_breakdown or {}).items()}
        note = (info.info or {}).get("note") or state.get("note")
        if note:
            breakdown["note"] = note
        msg.set_result("reward", {"reward": info.reward, "breakdown": breakdown})


def evaluate(state: dict[str, Any], history: list[dict[str, Any]], params: dict[str, Any]) -> Any:
    """tau2's RewardInfo for the dialogue (blocking: the environment is rebuilt and replayed)."""
    from tau2.data_model.simulation import SimulationRun
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

    task = find_task(state["domain"], state["task_id"])
    simulation = SimulationRun(
        id=f"{state['domain']}/{task.id}/{state['trial']}",
        task_id=task.id,
        start_time="",
        end_time="",
        duration=0.0,
        termination_reason=TerminationReason(state["termination"]),
        messages=to_tau2(history),
        trial=state["trial"],
    )
    kind = EvaluationType(params.get("evaluation_type", EvaluationType.ALL.value))
    return evaluate_simulation(simulation, task, kind, solo_mode=False, domain=state["domain"])


# -- output ------------------------------------------------------------------------------------------
def output(msg: Orchestrator) -> dict[str, Any]:
    state, reward = msg.results["tau2"], msg.results["reward"]
    return {
        "domain": state["domain"],
        "task_id": state["task_id"],
        "trial": state["trial"],
        "reward": reward["reward"],
        "reward_breakdown": json.dumps(reward["breakdown"]),
        "termination_reason": state["termination"],
        **{k: v for k, v in counts(msg.history, state["start"]).items() if k != "steps"},
        "trajectory": json.dumps(msg.history),
    }


def summary_row(row: dict[str, Any]) -> dict[str, Any]:
    """A scored (ok) trajectory's share of the summary: its reward overall, by domain and by task
    (successes per task give tau2's pass^1), and its tool calls."""
    if row["status"] != OK:
        return {}
    reward, task = row["reward"], f"{row['domain']}/{row['task_id']}"
    return {
        "trajectories": 1,
        "reward": reward,
        "by_domain": {row["domain"]: {"n": 1, "reward": reward}},
        "by_task": {task: {"n": 1, "successes": int(is_successful(reward))}},
        "tool_calls": row["tool_calls"],
        "tool_errors": row["tool_errors"],
    }


def summary_finish(total: dict[str, Any]) -> dict[str, Any]:
    """tau2-bench's figures: mean reward (per domain and overall), pass^1 and the tool-call error rate."""
    n, calls = total.get("trajectories", 0), total.get("tool_calls", 0)
    by_domain, by_task = total.get("by_domain", {}), total.get("by_task", {})
    pass_1 = [pass_hat_k(t["n"], t["successes"], 1) for t in by_task.values()]
    return {
        "trajectories": n,
        "mean_reward": round(total["reward"] / n, 4) if n else None,
        "mean_reward_by_domain": {d: round(v["reward"] / v["n"], 4) for d, v in sorted(by_domain.items())},
        "pass^1": round(sum(pass_1) / len(pass_1), 4) if pass_1 else None,
        "tool_calls": calls,
        "tool_call_error_rate": round(total.get("tool_errors", 0) / calls, 4) if calls else None,
    }


PIPELINE = Pipeline(
    name="tau2",
    orchestrator=Tau2Orchestrator,
    roles={"user": UserRole, "assistant": AssistantRole, "tools": ToolsRole, "reward": RewardRole},
    columns=pa.schema(
        [
            pa.field("domain", pa.string()),
            pa.field("task_id", pa.string()),
            pa.field("trial", pa.int32()),
            pa.field("reward", pa.float64()),
            pa.field("reward_breakdown", pa.string()),
            pa.field("termination_reason", pa.string()),
            pa.field("turns", pa.int32()),
            pa.field("tool_calls", pa.int32()),
            pa.field("tool_errors", pa.int32()),
            pa.field("trajectory", pa.string()),
        ]
    ),
    output=output,
    summary=Summary(summary_row, summary_finish, columns=("domain", "task_id", "reward", "tool_calls", "tool_errors")),
    uses_sandbox=True,
)
