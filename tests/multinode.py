"""A real multi-node Ray cluster on this machine, for tests of node loss.

A head and N worker nodes, each its own `ray start --block` in its own session: every process of
a node (raylet, agents, log monitor, the node's Ray workers) descends from that launcher, so a
node's processes are known by PID and ended by PID (never `ray stop`, which would end every Ray
on the machine). All ports are chosen free.

Loopback only. On Linux, Ray 2.60 rewrites 127.0.0.1 (in `--node-ip-address`, `--address`,
RAY_ADDRESS) to the machine's outward address (`services.resolve_ip_for_localhost`), and a GCS or
raylet whose node address is not exactly 127.0.0.1 listens on every interface. With
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` Ray keeps 127.0.0.1, but then `ray start --address` refuses
to add a node. So the nodes' environment (inherited by everything they start, job drivers
included) and `cluster.env` carry that variable, and each node is started through Ray's own
`ray start` entry point (`_RAY_START`) with the refusal lifted and the rewrite made the identity:
every node registers as 127.0.0.1 and every listener of the cluster binds loopback. A driver in
the test process itself needs the variable in `os.environ` before `import ray` (Ray reads it once),
else it dials the outward address and hangs.

The head lowers the GCS health check (`FAST_HEALTH_CHECK`) through `--system-config`; the GCS hands
it to every node that joins, and a node whose raylet is killed is DEAD in ~3 s instead of ~17 s.

    with multinode_cluster(tmp_path, workers=2) as cluster:
        subprocess.run([sys.executable, "job.py"], env=cluster.env, cwd=cluster.workdir)
        node_id = kill_worker_raylet(cluster, 0)
        wait_node_dead(cluster, node_id)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.conftest import ensure_token

VENV_BIN = Path(sys.executable).parent

# Ray 2.60 names (ray_config_def.h); a misspelt one makes the GCS exit ("unexpected config parameter").
# With the defaults (3000 ms / 10000 ms / 5) a SIGKILLed raylet was DEAD after ~17 s; with these, ~3 s.
FAST_HEALTH_CHECK: dict[str, int] = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 3,
}

# `ray start`, keeping 127.0.0.1 as the node address (see the module docstring).
_RAY_START = (
    "import sys\n"
    "import ray._private.ray_constants as constants\n"
    "import ray._private.services as services\n"
    "constants.ENABLE_RAY_CLUSTER = True\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)

# AF_UNIX paths are capped at 107 bytes; Ray puts sockets at <temp>/<node>/session_<date>_<pid>/sockets/...
_MAX_TEMP_ROOT = 32


@dataclass
class RayNode:
    """One `ray start --block` and what it started."""

    name: str
    launcher: psutil.Popen
    temp_dir: Path
    log: Path
    node_id: str = ""
    raylet_pid: int = 0
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def resource(self) -> str:
        """The custom resource only this node has (`node_head`, `node_w1`, ...)."""
        return f"node_{self.name}"

    def pids(self) -> list[int]:
        """Live PIDs of the node: its launcher's tree plus any seen before and orphaned since."""
        self.remember()
        return sorted(pid for pid, proc in self.seen.items() if _alive(proc))

    def remember(self) -> None:
        """Record the launcher's current tree, so workers orphaned by a raylet kill stay known."""
        for proc in [self.launcher, *_children(self.launcher)]:
            self.seen.setdefault(proc.pid, proc)


@dataclass
class MultiNodeCluster:
    gcs_address: str
    dashboard_url: str
    token: str
    env: dict[str, str]  # for drivers that join: RAY_ADDRESS, RAY_AUTH_MODE=token, venv PATH
    workdir: Path  # a cwd for drivers, away from Ray's temp folders
    head: RayNode | None = None
    workers: list[RayNode] = field(default_factory=list)
    retired: list[RayNode] = field(default_factory=list)  # lost nodes that `replace_worker` replaced
    object_store_bytes: int = 256 * 1024**2

    @property
    def nodes(self) -> list[RayNode]:
        return [n for n in [self.head, *self.workers, *self.retired] if n is not None]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (bound together, so none repeats)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def node_states(cluster: MultiNodeCluster) -> dict[str, str]:
    """node id -> ALIVE/DEAD, from the state API (answered by the GCS), with the cluster's token."""
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/api/v0/nodes?limit=1000",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        body = json.load(resp)
    return {row["node_id"]: row["state"] for row in body["data"]["result"]["result"]}


def wait_node_dead(cluster: MultiNodeCluster, node_id: str, timeout: float = 30.0) -> float:
    """Block until the GCS reports `node_id` DEAD; returns the seconds waited."""
    start = time.monotonic()
    _wait_states(cluster, {node_id: "DEAD"}, timeout)
    return time.monotonic() - start


def kill_worker_raylet(cluster: MultiNodeCluster, index: int) -> str:
    """SIGKILL worker `index`'s raylet, as a lost machine; returns its node id.

    The node's launcher then ends its other daemons and its Ray workers exit on losing their
    raylet; the PIDs seen just before stay recorded, so teardown still ends any straggler.
    """
    node = cluster.workers[index]
    node.remember()
    os.kill(node.raylet_pid, signal.SIGKILL)
    return node.node_id


def replace_worker(cluster: MultiNodeCluster, index: int, num_cpus: int = 2, timeout: float = 180.0) -> RayNode:
    """Start a new node in place of worker `index` (after it was lost), with the same resource name.

    The lost node's processes stay recorded in `cluster.retired`, so teardown still ends them.
    """
    lost = cluster.workers[index]
    lost.remember()
    cluster.retired.append(lost)
    node = _start_node(
        cluster,
        lost.name,
        [f"--address={cluster.gcs_address}"],
        num_cpus,
        lost.temp_dir.parent,
        lost.log.parent,
        cluster.object_store_bytes,
        timeout,
        tag=f"r{len(cluster.retired)}",
    )
    cluster.workers[index] = node
    return node


def stop_cluster(cluster: MultiNodeCluster, grace: float = 10.0) -> None:
    """End every process of every node, by PID: SIGTERM, then SIGKILL what outlives `grace`."""
    procs: dict[int, psutil.Process] = {}
    for node in cluster.nodes:
        node.remember()
        procs.update({pid: p for pid, p in node.seen.items() if _alive(p)})
    procs.update({p.pid: p for p in _strays(cluster)})
    _signal_all(procs.values(), signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    _signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)


@contextlib.contextmanager
def multinode_cluster(
    tmp_path: Path,
    workers: int = 2,
    num_cpus: int = 2,
    extra_env: dict[str, str] | None = None,
    *,
    head_cpus: int | None = None,
    object_store_bytes: int = 256 * 1024**2,
    system_config: dict[str, int] | None = None,
    timeout: float = 180.0,
) -> Iterator[MultiNodeCluster]:
    """A head plus `workers` nodes, all ALIVE in the GCS before this yields; all ended on exit.

    Worker i (0-based) is named `w{i+1}` and alone has the resource `node_w{i+1}` (the head
    `node_head`), so work can be pinned with `resources={"node_w1": 0.01}`. `extra_env` reaches
    every node (and so every Ray worker) and `cluster.env`.
    """
    env = _node_env(extra_env)
    temp_root, owned = _temp_root(tmp_path)
    workdir, logs = tmp_path / "cwd", tmp_path / "ray-logs"
    for folder in (workdir, logs):
        folder.mkdir(parents=True, exist_ok=True)
    gcs_port, dash_port = free_ports(2)
    gcs = f"127.0.0.1:{gcs_port}"
    token = ensure_token(env)
    cluster = MultiNodeCluster(gcs, f"http://127.0.0.1:{dash_port}", token, {**env, "RAY_ADDRESS": gcs}, workdir)
    cluster.object_store_bytes = object_store_bytes
    try:
        head_extra = _head_args(gcs_port, dash_port, system_config or FAST_HEALTH_CHECK)
        cpus = num_cpus if head_cpus is None else head_cpus
        cluster.head = _start_node(cluster, "head", head_extra, cpus, temp_root, logs, object_store_bytes, timeout)
        for i in range(1, workers + 1):  # one at a time: on 2 cores parallel starts trip Ray's 15 s agent wait
            node = _start_node(
                cluster, f"w{i}", [f"--address={gcs}"], num_cpus, temp_root, logs, object_store_bytes, timeout
            )
            cluster.workers.append(node)
        yield cluster
    finally:
        stop_cluster(cluster)
        if owned:
            shutil.rmtree(temp_root, ignore_errors=True)


def _node_env(extra_env: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token")
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep 127.0.0.1 (module docstring)
    # A SIGTERMed node would otherwise drain for up to 30 s before ending its processes.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env.update(extra_env or {})
    return env


def _temp_root(tmp_path: Path) -> tuple[Path, bool]:
    """Ray's temp root: under tmp_path if short enough for Ray's socket paths, else a short /tmp dir we own."""
    candidate = tmp_path / "rt"
    if len(str(candidate)) <= _MAX_TEMP_ROOT:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate, False
    return Path(tempfile.mkdtemp(prefix="raymn-", dir="/tmp")), True


def _head_args(gcs_port: int, dash_port: int, system_config: dict[str, int]) -> list[str]:
    (client_port,) = free_ports(1)
    return [
        "--head",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={client_port}",
        f"--system-config={json.dumps(system_config)}",
    ]


def _node_args(name: str, num_cpus: int, temp_dir: Path, object_store_bytes: int) -> list[str]:
    """Flags every node gets: its own ports, resource and temp dir; Ray workers bind OS-chosen ports (0/0)."""
    om, nm, agent_http, agent_grpc, env_agent, metrics = free_ports(6)
    return [
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps({f'node_{name}': 1})}",
        f"--object-store-memory={object_store_bytes}",
        f"--object-manager-port={om}",
        f"--node-manager-port={nm}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]


def _start_node(
    cluster: MultiNodeCluster,
    name: str,
    role_args: list[str],
    num_cpus: int,
    temp_root: Path,
    logs: Path,
    object_store_bytes: int,
    timeout: float,
    attempts: int = 2,
    tag: str = "",
) -> RayNode:
    """Launch one node and wait until the GCS has it ALIVE; a second try if Ray's start-up gives up."""
    for attempt in range(1, attempts + 1):
        label = f"{name}-{tag}{attempt}"
        temp_dir = temp_root / label
        args = [*role_args, *_node_args(name, num_cpus, temp_dir, object_store_bytes)]
        node = _launch(name, args, temp_dir, cluster.env, cluster.workdir, logs / f"{label}.log")
        try:
            _find_raylet(node, timeout)
            _wait_states(cluster, {node.node_id: "ALIVE"}, timeout, launcher=node)
            node.remember()
            return node
        except (RuntimeError, TimeoutError):
            _end_node(node)
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _launch(name: str, args: list[str], temp_dir: Path, env: dict[str, str], cwd: Path, log: Path) -> RayNode:
    temp_dir.mkdir(parents=True, exist_ok=True)
    node_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    with log.open("wb") as out:
        proc = psutil.Popen(
            [sys.executable, "-c", _RAY_START, "start", *args],
            env=node_env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return RayNode(name, proc, temp_dir, log)


def _find_raylet(node: RayNode, timeout: float) -> None:
    """Wait for the raylet under the node's launcher and read the node id from its flags."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_launcher(node)
        for proc in _children(node.launcher):
            cmd = _cmdline(proc)
            flag = next((a for a in cmd if a.startswith("--node_id=")), None)
            if cmd and Path(cmd[0]).name == "raylet" and flag:
                node.node_id, node.raylet_pid = flag.split("=", 1)[1], proc.pid
                return
        time.sleep(0.2)
    raise TimeoutError(f"no raylet for {node.name} after {timeout}s:\n{_tail(node.log)}")


def _wait_states(
    cluster: MultiNodeCluster, want: dict[str, str], timeout: float, launcher: RayNode | None = None
) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] | str = {}
    while time.monotonic() < deadline:
        if launcher is not None:
            _check_launcher(launcher)
        try:
            seen = node_states(cluster)
        except (OSError, ValueError, KeyError) as exc:  # dashboard not up yet
            seen = repr(exc)
        if isinstance(seen, dict) and all(seen.get(node) == state for node, state in want.items()):
            return
        time.sleep(0.25)
    raise TimeoutError(f"nodes not {want} after {timeout}s; last seen {seen}")


def _check_launcher(node: RayNode) -> None:
    if node.launcher.poll() is not None:
        raise RuntimeError(f"ray start for {node.name} exited {node.launcher.returncode}:\n{_tail(node.log)}")


def _end_node(node: RayNode) -> None:
    node.remember()
    procs = [p for p in node.seen.values() if _alive(p)]
    _signal_all(procs, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=5)


def _strays(cluster: MultiNodeCluster) -> list[psutil.Process]:
    """Processes outside the launchers' trees whose flags name this cluster's GCS or temp dirs."""
    mark = re.compile(
        "|".join([rf"{re.escape(cluster.gcs_address)}(?!\d)", *(re.escape(str(n.temp_dir)) for n in cluster.nodes)])
    )
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    return [p for p in psutil.process_iter() if p.pid not in me and mark.search(" ".join(_cmdline(p)))]


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (`is_running` also guards against a reused PID)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
