"""Real vLLM (its CPU build) behind Ray Serve LLM on the session's Ray cluster, through `matrix run`.

One deployment for the module (two replicas, SmolLM2-135M from the shipped GGUF): every shipped
LLM pipeline runs on it, and the manifest's tokens are compared with vLLM's own counters, which Ray
exports from the engine (`log_engine_metrics`). The faults run last: a killed replica (Serve then
restarts it, which takes the engine's load time) and an engine that cannot start.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray
from ray import serve

from matrix_provider.monitoring.scrape import scrape, total
from matrix_provider.protocol import ERROR_PREFIX
from tests.conftest import (
    REPO,
    RayCluster,
    assert_exactly_once,
    committed_units,
    free_port,
    read_manifest,
    read_output,
    run_matrix,
)
from tests.corpus import doc_text, write_jsonl

# The module's deployment loads two engines (~210-260 s on a busy 2-core machine) in its first test's setup.
pytestmark = pytest.mark.timeout(1200)
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
APP = "test-vllm"
LLM = ["llm=vllm_cpu", f"llm.app_name={APP}", f"llm.python={VLLM_PY}", "llm.min_replicas=2", "llm.max_replicas=2"]
QUESTIONS = REPO / "matrix_provider" / "data" / "coral" / "questions.jsonl"
PROMPT_TOKENS = "ray_vllm_prompt_tokens_total"  # vLLM's vllm:prompt_tokens, as Ray exports it
GENERATION_TOKENS = "ray_vllm_generation_tokens_total"
_CORAL = (
    "params.max_turns=2",
    "roles.agent_a.max_tokens=96",
    "roles.agent_b.max_tokens=96",
    "roles.extract.max_tokens=48",
)
PROBE = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}  # what backends.probe sends


@dataclass
class VLLMApp:
    endpoint: str
    metrics_url: str
    env: dict[str, str]
    probe_tokens: tuple[float, float]  # vLLM's count of one probe request, which every run sends

    def tokens(self) -> tuple[float, float]:
        samples = scrape(self.metrics_url, "vllm")
        return total(samples, PROMPT_TOKENS), total(samples, GENERATION_TOKENS)

    def settled_tokens(self) -> tuple[float, float]:
        """The counters once two reads more than a Ray export interval (10 s) apart agree."""
        last = self.tokens()
        for _ in range(10):
            time.sleep(11)
            now = self.tokens()
            if now == last:
                return now
            last = now
        raise AssertionError(f"vLLM's counters never settled: {last}")


@pytest.fixture(scope="module")
def vllm(ray_client: RayCluster) -> Iterator[VLLMApp]:
    weights = run_matrix(["vllm-weights", "--python", str(VLLM_PY)], ray_client.env, timeout=600)
    assert weights.returncode == 0, weights.stderr[-3000:]
    started = time.monotonic()
    served = run_matrix(["serve", "natural_reasoning", *LLM], ray_client.env, timeout=900)
    assert served.returncode == 0, served.stderr[-3000:]
    print(f"\nvLLM app (2 replicas) up in {time.monotonic() - started:.0f} s")
    endpoint = next(line for line in served.stdout.splitlines() if line.endswith("\thealthy")).split("\t")[2]
    port = next(node["MetricsExportPort"] for node in ray.nodes() if node["Alive"])
    try:
        answer = httpx.post(
            f"{endpoint}/chat/completions", json={"model": "smollm2-135m-instruct", **PROBE}, timeout=300
        )
        usage = answer.json()["usage"]
        yield VLLMApp(
            endpoint,
            f"http://127.0.0.1:{port}/metrics",
            ray_client.env,
            (float(usage["prompt_tokens"]), float(usage["completion_tokens"])),
        )
    finally:
        serve.delete(APP)


def _run(app: VLLMApp, spec: str, src: Path, out: Path, *overrides: str, timeout: float = 900) -> dict[str, Any]:
    args = ["run", spec, "--input", str(src), "--output", str(out), "--concurrency", "8", *LLM, *_patient(spec)]
    args += overrides
    result = run_matrix(args, app.env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_manifest(str(out))


def _patient(spec: str) -> list[str]:
    """No LLM step times out on a busy 2-core machine: an abandoned request's tokens are the
    engine's, never the row's, and would spoil the comparison with vLLM's counters."""
    return [f"roles.{role}.step_timeout_s=900" for role in _LLM_ROLES[spec]]


_LLM_ROLES = {
    "natural_reasoning": ("filter", "score", "question"),
    "coral": ("agent_a", "agent_b", "extract"),
    "tau2": ("user", "assistant"),
}


def _assert_engine_counted(app: VLLMApp, before: tuple[float, float], manifest: dict[str, Any]) -> None:
    """vLLM's own prompt and generation counters grew by the manifest's tokens plus the run's probe.

    Ray exports the engine's counters every few seconds, so wait for them to settle on the figure.
    A retried request may have been counted by vLLM once more than it was answered: none may happen.
    """
    assert manifest["llm_retries"] == 0 and manifest["step_retries"] == 0, manifest
    expected = (
        before[0] + manifest["prompt_tokens"] + app.probe_tokens[0],
        before[1] + manifest["completion_tokens"] + app.probe_tokens[1],
    )
    deadline = time.monotonic() + 60
    while (seen := app.tokens()) != expected and time.monotonic() < deadline:
        time.sleep(2)
    assert seen == expected, f"vLLM counted {seen}, the manifest (plus one probe) says {expected}"


def test_the_weights_made_from_the_gguf_answer_and_are_made_once(vllm: VLLMApp) -> None:
    """Tied embeddings stored under vLLM's name: without them vLLM would emit token 0 forever.

    Greedy, so the answer is the model's best and the same every run (sampled, SmolLM2-135M once
    talked about "this classic math concept" for 16 tokens without saying 4)."""
    question = [{"role": "user", "content": "What is 2+2?"}]
    body = {"model": "smollm2-135m-instruct", "messages": question, "max_tokens": 32, "temperature": 0}
    before = vllm.tokens()
    answer = httpx.post(f"{vllm.endpoint}/chat/completions", json=body, timeout=300).json()
    assert "4" in answer["choices"][0]["message"]["content"], answer
    # Wait until Ray has exported this request's tokens: a later test's "before" must include them
    # (Ray exports every 10 s, so two equal reads 6 s apart can both predate them).
    used = answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]
    deadline = time.monotonic() + 60
    while not all(now >= was + n for now, was, n in zip(vllm.tokens(), before, used, strict=True)):
        assert time.monotonic() < deadline, f"vLLM's counters never showed the request's {used} tokens"
        time.sleep(2)
    started = time.monotonic()
    again = run_matrix(["vllm-weights", "--python", "/nonexistent/python"], vllm.env)  # cached: no conversion
    assert again.returncode == 0 and time.monotonic() - started < 60, again.stderr[-2000:]
    folder = Path(again.stdout.strip().splitlines()[-1])
    with (folder / "model.safetensors").open("rb") as weights:  # safetensors: 8-byte length, JSON header
        header = json.loads(weights.read(int.from_bytes(weights.read(8), "little")))
    assert header["model.embed_tokens.weight"]["dtype"] == "BF16" and "lm_head.weight" not in header


def test_natural_reasoning_on_vllm_and_its_token_counts(vllm: VLLMApp, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", 4)
    before = vllm.settled_tokens()
    manifest = _run(vllm, "natural_reasoning", src, tmp_path / "out", "roles.question.max_tokens=96")
    rows = read_output(str(tmp_path / "out"))
    assert_exactly_once(rows, 4)
    assert manifest["prompt_tokens"] > 0 and manifest["completion_tokens"] > 0
    assert all(r["prompt_tokens"] > 0 for r in rows), rows  # every document reached the engine
    _assert_engine_counted(vllm, before, manifest)


def test_coral_dialogues_on_vllm(vllm: VLLMApp, tmp_path: Path) -> None:
    src = tmp_path / "q.jsonl"
    src.write_text("\n".join(QUESTIONS.read_text().splitlines()[:3]) + "\n")
    before = vllm.settled_tokens()
    manifest = _run(vllm, "coral", src, tmp_path / "out", *_CORAL)
    rows = read_output(str(tmp_path / "out"))
    assert_exactly_once(rows, 3)
    _assert_model_rows(rows)
    assert manifest["summary"]["questions_answered"] == manifest["rows_ok"]
    assert any(r["status"] == "ok" and r["turns"] == 2 for r in rows), rows
    _assert_engine_counted(vllm, before, manifest)


def _assert_model_rows(rows: list[dict[str, Any]]) -> None:
    """Every row is ok, or an error of the small model's own making (JSON it cut off or got wrong)."""
    for row in rows:
        if row["status"] != "ok":
            assert "JSON" in row["error"] or "max_tokens" in row["error"], row["error"]


def test_tau2_on_vllm_with_its_tool_parser(vllm: VLLMApp, tmp_path: Path) -> None:
    """The assistant gets tau2's tool schemas and vLLM's hermes parser reads its answers; SmolLM2
    writes no tool call, so the dialogues end as tau2's own would, with tau2's reward."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"m{i}", "domain": "mock", "task_id": t, "trial": 0}) + "\n"
            for i, t in enumerate(("create_task_1", "update_task_1"))
        )
    )
    before = vllm.settled_tokens()
    overrides = ("params.max_steps=4", "roles.user.max_tokens=48", "roles.assistant.max_tokens=64")
    manifest = _run(vllm, "tau2", tasks, tmp_path / "out", *overrides)
    rows = read_output(str(tmp_path / "out"))
    assert_exactly_once(rows, 2)
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["termination_reason"] in {"user_stop", "max_steps", "agent_error", "user_error"}, row
        assert 0.0 <= row["reward"] <= 1.0 and row["turns"] >= 1
    assert manifest["summary"]["trajectories"] == 2
    print("\ntau2 on vLLM:", [(r["task_id"], r["termination_reason"], r["turns"], r["tool_calls"]) for r in rows])
    _assert_engine_counted(vllm, before, manifest)


def test_a_prompt_over_the_context_is_an_error_row_naming_the_limit(vllm: VLLMApp, tmp_path: Path) -> None:
    src = tmp_path / "in" / "long.jsonl"
    src.parent.mkdir()
    src.write_text(json.dumps({"id": "long", "text": doc_text(7, words=4000)}) + "\n")
    _run(vllm, "natural_reasoning", src, tmp_path / "out", "params.max_chars=40000")
    [row] = read_output(str(tmp_path / "out"))
    assert row["status"] == "error"
    assert "2048" in row["error"] and "context" in row["error"].lower(), row["error"]


def test_an_unknown_model_or_a_backend_that_is_down_stops_the_run_before_any_row(vllm: VLLMApp, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", 2)
    unknown = [*LLM, "llm.model=no-such-model"]
    down = ["llm=openai", "llm.model=smollm2-135m-instruct", f"llm.endpoints=[http://127.0.0.1:{free_port()}/v1]"]
    for overrides, reason in ((unknown, "has no model 'no-such-model'"), (down, "is unreachable")):
        out = tmp_path / overrides[-1].split("=")[0]
        args = ["run", "natural_reasoning", "--input", str(src), "--output", str(out), *overrides]
        result = run_matrix(args, vllm.env)
        assert result.returncode == 2 and reason in _error_line(result.stderr), result.stderr[-2000:]
        assert not committed_units(str(out))


def _error_line(stderr: str) -> str:
    """The run's own one-line error (Ray streams its workers' logs to the same stderr)."""
    return next((line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)), "")


def test_an_engine_that_cannot_start_fails_the_run_with_vllms_reason(vllm: VLLMApp, tmp_path: Path) -> None:
    """max_model_len above SmolLM2's 8,192 positions: vLLM refuses it while the replica starts."""
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", 2)
    out = tmp_path / "out"
    bad = ["llm.app_name=test-vllm-bad", "llm.min_replicas=1", "llm.max_replicas=1", "llm.max_model_len=100000"]
    args = ["run", "natural_reasoning", "--input", str(src), "--output", str(out), *LLM, *bad]
    started = time.monotonic()
    result = run_matrix(args, vllm.env, timeout=600)
    print(f"\nengine start failure reported after {time.monotonic() - started:.0f} s")
    assert result.returncode == 2, result.stderr[-3000:]
    error = _error_line(result.stderr)
    assert error.startswith(f"{ERROR_PREFIX}backend 'vllm' did not start: "), result.stderr[-3000:]
    assert "max_model_len" in error and "100000" in error, error
    print(error)
    assert not committed_units(str(out))
    assert "test-vllm-bad" not in serve.status().applications  # nothing left restarting engines


def test_a_replica_killed_mid_run_loses_no_row(vllm: VLLMApp, tmp_path: Path) -> None:
    """Last in the module: Serve restarts the killed replica, which loads its engine again."""
    src = tmp_path / "q.jsonl"
    # Six dialogues, each with one request always out, sticky-routed over two replicas: one meets the
    # victim unless all six hash to the other (1 in 64). Twelve took 9.5 min on a busy 2-core machine.
    src.write_text("\n".join(QUESTIONS.read_text().splitlines()[:6]) + "\n")
    out = tmp_path / "out"
    args = ["run", "coral", "--input", str(src), "--output", str(out), "--concurrency", "6", *LLM, *_CORAL]
    done: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: done.update(result=run_matrix(args, vllm.env, timeout=900)))
    before = vllm.tokens()
    runner.start()
    while vllm.tokens()[1] < before[1] + 200 and runner.is_alive():  # dialogues under way on both replicas
        time.sleep(1)
    victim = _replicas()[0]
    engine = [p.pid for p in psutil.Process(victim["pid"]).children(recursive=True)]
    ray.kill(victim["handle"], no_restart=True)
    runner.join()
    result = done["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_output(str(out))
    assert_exactly_once(rows, 6)
    _assert_model_rows(rows)
    assert read_manifest(str(out))["llm_retries"] > 0, "no request met the killed replica"
    assert not [pid for pid in engine if _alive(pid)], "the killed replica's engine processes live on"


def _replicas() -> list[dict[str, Any]]:
    """The app's engine replicas (Serve names them SERVE_REPLICA::<app>#<deployment>#<id>) and their pids."""
    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and actor["name"].startswith(f"SERVE_REPLICA::{APP}#LLMServer")
    ]
    handles = [ray.get_actor(name, namespace="serve") for name in names]
    pids = ray.get([h.__ray_call__.remote(lambda _: os.getpid()) for h in handles], timeout=60)
    return [{"name": n, "handle": h, "pid": pid} for n, h, pid in zip(names, handles, pids, strict=True)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
