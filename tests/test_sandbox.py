"""Tools in a sandbox outside the agent process: real bubblewrap, real processes, a real local Ray.

The tool host (`tests/sandbox_tools.py`) probes what the sandbox must deny (network, writes outside
its scratch, CPU time, hanging) and keeps a counter, so replay after a lost worker is visible.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from matrix_provider.runtime.orchestrator import Orchestrator
from matrix_provider.runtime.spec import OPERATIONAL_KEYS, SpecError, _drop_keys, compose
from matrix_provider.sandbox import backends
from matrix_provider.sandbox import pool as pool_module
from matrix_provider.sandbox.client import SandboxClient, lease_of, pool_index
from matrix_provider.sandbox.pool import SandboxError, SandboxPool
from matrix_provider.sandbox.spec import SandboxSpec

HOST = "tests.sandbox_tools:make"  # in every sandbox process's argv: how the tests find them
COUNT = {"name": "count", "arguments": {}, "requestor": "assistant"}


def sandbox_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and HOST in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def assert_no_sandbox(timeout: float = 5.0) -> None:
    """Processes killed with their parent (die-with-parent) go a moment after it: poll briefly."""
    deadline = time.monotonic() + timeout
    while (left := sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, [p.info["cmdline"] for p in left]


@pytest.fixture(autouse=True)
def no_sandbox_left() -> Iterator[None]:
    yield
    assert_no_sandbox()


@asynccontextmanager
async def open_pool(**spec: Any) -> AsyncIterator[SandboxPool]:
    pool = SandboxPool(SandboxSpec(**spec))
    try:
        yield pool
    finally:
        await pool.close()


async def call(
    pool: SandboxPool, lease: str, name: str, history: list[dict[str, Any]] | None = None, **arguments: Any
) -> dict[str, Any]:
    return await pool.call(lease, HOST, {}, name, arguments, "assistant", history or [])


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP listener on this host's loopback: reachable from a plain process, not from a sandbox."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_network_is_denied_inside_and_open_without_sandbox(listener: int) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with open_pool() as sandboxed, open_pool(backend="none") as plain:
            return await call(sandboxed, "a", "open_socket", port=listener), await call(
                plain, "a", "open_socket", port=listener
            )

    inside, outside = asyncio.run(main())
    assert outside == {"content": "connected", "error": False}
    assert inside["error"] and inside["content"].startswith("open_socket: ConnectionRefusedError"), inside


def test_writes_only_into_private_scratch() -> None:
    outside = Path(__file__).parent / f"sandbox-probe-{uuid.uuid4().hex}"
    scratch = f"/tmp/sandbox-probe-{uuid.uuid4().hex}"

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with open_pool() as pool:
            return await call(pool, "a", "write_file", path=str(outside)), await call(
                pool, "a", "write_file", path=scratch
            )

    denied, allowed = asyncio.run(main())
    assert denied["error"] and "Read-only file system" in denied["content"], denied
    assert not outside.exists()
    assert allowed == {"content": f"wrote {scratch}", "error": False}
    assert not Path(scratch).exists()  # the sandbox's /tmp is its own


def test_hanging_tool_is_stopped_and_the_lease_recovers_its_state() -> None:
    async def main() -> None:
        async with open_pool(call_timeout_s=1, warm=0) as pool:
            assert (await call(pool, "a", "count"))["content"] == "1"
            assert (await call(pool, "a", "count", [COUNT]))["content"] == "2"
            worker = pool._leases["a"].worker
            assert worker is not None
            started = time.monotonic()
            result = await call(pool, "a", "sleep", [COUNT, COUNT], s=30)
            assert time.monotonic() - started < 3
            assert result == {"content": "tool 'sleep' did not finish within 1s and was stopped", "error": True}
            assert not psutil.pid_exists(worker.proc.pid) and await pool.live() == 0
            # A new worker: init, replay of the two counts, then this call.
            assert await call(pool, "a", "count", [COUNT, COUNT]) == {"content": "3", "error": False}

    asyncio.run(main())


def test_cpu_time_limit_kills_a_burner_with_an_error_result() -> None:
    async def main() -> None:
        async with open_pool(cpu_seconds=1, call_timeout_s=20) as pool:
            started = time.monotonic()
            result = await call(pool, "a", "burn_cpu")
            assert time.monotonic() - started < 5
            assert result == {
                "content": "tool 'burn_cpu' was stopped: its sandbox died (CPU time limit of 1s reached)",
                "error": True,
            }
            assert (await call(pool, "a", "echo", text="still here"))["content"] == "still here"

    asyncio.run(main())


def test_tool_failures_are_results_and_a_broken_host_is_an_exception() -> None:
    async def main() -> None:
        async with open_pool() as pool:
            assert await call(pool, "a", "nope") == {"content": "unknown tool 'nope'", "error": True}
            failed = await call(pool, "a", "count", surprise=1)
            assert failed["error"] and failed["content"].startswith("count: TypeError:"), failed
            # echo prints to stdout first: the protocol stays intact.
            assert await call(pool, "a", "echo", text="ok") == {"content": "ok", "error": False}
            with pytest.raises(SandboxError, match="could not be built: TypeError"):
                await pool.call("b", HOST, {"bad": 1}, "count", {}, "assistant", [])
            with pytest.raises(SandboxError, match="could not be loaded: ModuleNotFoundError"):
                await pool.call("c", "tests.no_such_module:make", {}, "count", {}, "assistant", [])

    asyncio.run(main())


def test_release_and_close_leave_no_sandbox_process() -> None:
    async def main() -> None:
        async with open_pool(warm=2) as pool:
            for lease in ("a", "b", "c"):
                await call(pool, lease, "count")
            await asyncio.sleep(0.2)  # spares are started in the background
            workers = [p for p in sandbox_processes() if p.info["cmdline"][0] == sys.executable]
            assert await pool.live() == 5 == len(workers)  # 3 leased, 2 warm spares
            await pool.release("a")
            await pool.release("a")  # idempotent
            assert await pool.live() == 4
            await pool.close()
            assert await pool.live() == 0
            assert_no_sandbox()

    asyncio.run(main())


def test_a_child_holding_the_pipes_does_not_hang_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a pid namespace (backend none; bwrap and apptainer's --containall have one) a tool's daemon
    # outlives the worker's killed process group and holds its pipes open: asyncio's wait() never returns.
    monkeypatch.setattr(pool_module, "_EXIT_S", 0.5)

    async def main() -> None:
        async with open_pool(backend="none", warm=0) as pool:
            holder = int((await call(pool, "a", "detach_child"))["content"])
            try:
                async with asyncio.timeout(10):
                    await pool.release("a")
                assert await pool.live() == 0 and psutil.pid_exists(holder)
                assert (await call(pool, "b", "count"))["content"] == "1"  # the slot came back
            finally:
                os.kill(holder, 9)

    asyncio.run(main())


def test_idle_lease_expires_and_replays_on_its_next_call() -> None:
    async def main() -> None:
        async with open_pool(lease_ttl_s=0.4, warm=0) as pool:
            await call(pool, "a", "count")
            await asyncio.sleep(1.0)
            assert await pool.live() == 0 and "a" not in pool._leases
            assert (await call(pool, "a", "count", [COUNT]))["content"] == "2"

    asyncio.run(main())


def test_a_full_pool_makes_the_next_lease_wait() -> None:
    async def main() -> None:
        async with open_pool(pool_size=1, warm=2) as pool:
            await call(pool, "a", "count")
            waiting = asyncio.create_task(call(pool, "b", "count"))
            await asyncio.sleep(0.5)
            assert not waiting.done() and await pool.live() == 1
            await pool.release("a")
            assert await asyncio.wait_for(waiting, 10) == {"content": "1", "error": False}
            assert await pool.live() == 1

    asyncio.run(main())


def test_apptainer_argv_and_spec_checks() -> None:
    spec = SandboxSpec(backend="apptainer", image="/images/tools.sif", cpu_seconds=5, memory_mb=512)
    assert backends.command(spec, HOST) == [
        "apptainer",
        "exec",
        "--containall",
        "--no-home",
        "--net",
        "--network",
        "none",
        "--pwd=/tmp",
        *(f"--env={k}={v}" for k, v in backends.SANDBOX_ENV.items()),
        "/images/tools.sif",
        "python",
        "-m",
        "matrix_provider.sandbox.worker",
        "--cpu-seconds=5",
        "--memory-mb=512",
        HOST,
    ]
    assert backends.environment(spec) == dict(os.environ)  # --containall keeps it out of the container
    if not shutil.which("apptainer"):
        with pytest.raises(SpecError, match=r"sandbox\.backend=apptainer needs 'apptainer' on PATH"):
            backends.require(spec)
    run = {"input": "-", "output": "-"}
    with pytest.raises(SpecError, match=r"sandbox: Value error, sandbox.backend=apptainer needs sandbox.image"):
        compose("natural_reasoning", ["sandbox.backend=apptainer"], run)
    base = compose("natural_reasoning", [], run)
    assert base.sandbox == SandboxSpec()
    faster = compose("natural_reasoning", ["sandbox.pool_size=32", "sandbox.pools=4", "sandbox.warm=0"], run)
    assert faster.config_hash() == base.config_hash()  # operational: a rerun still resumes
    assert compose("natural_reasoning", ["sandbox.call_timeout_s=3"], run).config_hash() != base.config_hash()
    # Outputs written before specs had a sandbox section keep their hash (and so resume).
    without = hashlib.sha256(
        json.dumps(
            _drop_keys(base.model_dump(mode="json", exclude={"sandbox"}), OPERATIONAL_KEYS), sort_keys=True
        ).encode()
    )
    assert base.config_hash() == without.hexdigest()[:16]


def test_pool_actor_survives_a_restart_and_its_kill_leaves_no_sandbox(ray_client) -> None:
    import ray

    from matrix_provider import names
    from matrix_provider.sandbox.pool import SandboxPoolActor

    run_id = uuid.uuid4().hex[:8]
    pools = [
        SandboxPoolActor.options(name=names.sandbox_name(run_id, i), namespace=names.NAMESPACE).remote(SandboxSpec())
        for i in range(2)
    ]
    client = SandboxClient.named(run_id, 2)
    msg = Orchestrator(id="row-1", partition=0, delivery=2, deadline=0.0, row={}, key="u1:7")
    assert lease_of(msg) == "u1:7#2"
    pool = pools[pool_index(lease_of(msg), 2)]

    async def tool(history: list[dict[str, Any]]) -> dict[str, Any]:
        return await client.call(msg, HOST, {"start": 10}, "count", {}, "assistant", history)

    assert asyncio.run(tool([]))["content"] == "11"
    assert ray.get(pool.live.remote()) >= 1 and sandbox_processes()
    ray.kill(pool, no_restart=False)  # Ray restarts it; its sandboxes died with it
    assert_no_sandbox()
    assert asyncio.run(tool([COUNT]))["content"] == "12"  # the client waits for the restart, history replays
    asyncio.run(client.release(msg))
    for actor in pools:
        ray.kill(actor, no_restart=True)
