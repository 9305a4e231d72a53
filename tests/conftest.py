"""Real services for the suite: a Ray head started with `ray start` (token auth on), SeaweedFS S3.

Both bind 127.0.0.1 only, are started once per session, and are stopped by the PIDs we started
(never `ray stop`, which would end every Ray on the machine).
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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil
import pyarrow.parquet as pq
import pytest

from tests.slurm import SlurmCluster, running_slurm

# The session's cluster runs with token auth on; Ray clients send the token only in token mode.
# Set before any test module imports ray (Ray reads it once).
os.environ["RAY_AUTH_MODE"] = "token"

PROXY_KEY_ENV = "MATRIX_TEST_UPSTREAM_KEY"
# Through the environment so that `conftest` and `tests.conftest` (two imports of this file) agree.
PROXY_KEY = os.environ.setdefault("MATRIX_TEST_PROXY_KEY_VALUE", "sk-test-" + uuid.uuid4().hex)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CORPUS = REPO / "matrix_provider" / "data" / "corpus"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    serve_port: int
    token: str | None
    env: dict[str, str]
    temp_dir: Path  # its own Ray temp dir: session logs, and the address file Ray Jobs resolves "auto" by


def _kill_cluster(gcs_port: int) -> None:
    """End the processes of the head we started: those naming its GCS port, and their children."""
    mark = re.compile(rf"(gcs[-_]address=\S*:|--port=|gcs_server_port=){gcs_port}(\s|$)")
    roots = [p for p in psutil.process_iter(["cmdline"]) if mark.search(" ".join(p.info["cmdline"] or []))]
    procs = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)] if p.pid != os.getpid()}
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def ensure_token(env: dict[str, str]) -> str:
    """The token `ray start` needs in token mode; generated into ~/.ray/auth_token on a fresh machine."""
    token_file = Path.home() / ".ray" / "auth_token"
    if not token_file.exists():
        subprocess.run(
            [str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True
        )
    return token_file.read_text().strip()


def _head_command(gcs_port: int, dash_port: int, temp_dir: Path) -> list[str]:
    return [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        f"--temp-dir={temp_dir}",
        f"--port={gcs_port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        "--num-cpus=8",
        "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    # The cluster's own environment holds the proxy key and the S3 credentials, as a production
    # cluster's nodes would: no run forwards a secret to its workers (runtime/job.py FORWARDED_ENV).
    env[PROXY_KEY_ENV] = PROXY_KEY
    env.update(S3_CREDS)
    serve_port = free_port()
    env.update(RAY_AUTH_MODE="token", MATRIX_SERVE_PORT=str(serve_port))  # inherited by jobs the cluster runs
    # The raylet waits 30 s for its dashboard agent by default; at a load of 20-40 the agent's imports
    # take longer and `ray start` fails ("Timed out waiting for file .../metrics_agent_port_...").
    env["RAY_agent_register_timeout_ms"] = "180000"
    workdir = tmp_path_factory.mktemp("raycwd")  # never start jobs beside Ray's temp dir
    token = ensure_token(env)
    # On a loaded machine Ray's start-up gives up waiting for its raylet to register (15 s by default):
    # wait longer, and try again once.
    start_env = {**env, "RAY_raylet_start_wait_time_s": "120"}
    # A temp dir of its own: a Ray job's driver finds its cluster through the `ray_current_cluster`
    # file in the head's temp dir, which another cluster started on this machine (a second checkout's
    # suite, the chaos stand) would otherwise overwrite, sending this cluster's jobs to the other's GCS.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))  # short: Ray's socket paths must fit
    for attempt in (1, 2):
        gcs_port, dash_port = free_port(), free_port()
        try:
            started = subprocess.run(
                _head_command(gcs_port, dash_port, temp_dir),
                env=start_env,
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=300,
            )
            failure = "" if started.returncode == 0 else f"{started.stdout[-2000:]}\n{started.stderr[-3000:]}"
        except subprocess.TimeoutExpired as exc:
            failure = f"timed out after {exc.timeout:.0f}s"
        if not failure:
            break
        _kill_cluster(gcs_port)
        if attempt == 2:
            raise RuntimeError(f"ray start --head failed twice; last: {failure}")
    run_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
    wait_port(dash_port)
    try:
        yield RayCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", serve_port, token, run_env, temp_dir)
    finally:
        _kill_cluster(gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_client(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """This test process joined to the session's cluster (for Serve deployments and the state API)."""
    import ray

    os.environ["MATRIX_SERVE_PORT"] = str(ray_cluster.serve_port)
    ray.init(address=ray_cluster.gcs_address, namespace="matrix", log_to_driver=False)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()


# The session S3's credentials: the Ray cluster's nodes hold them from their start (see ray_cluster).
S3_CREDS = {"AWS_ACCESS_KEY_ID": "matrixtest", "AWS_SECRET_ACCESS_KEY": "matrixtestsecret"}


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]

    def storage_options(self) -> dict[str, object]:
        return {
            "key": self.env["AWS_ACCESS_KEY_ID"],
            "secret": self.env["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint},
        }


# Every port `weed mini` listens on, chosen free so that two suites (two checkouts) can run side by side.
_WEED_PORTS = (
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "s3.metricsPort",
    "s3.debug.port",
    "master.port",
    "master.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
    "metricsPort",
)


def start_seaweed(data: Path, bucket: str, creds: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """`weed mini` on 127.0.0.1 with every port free-chosen; returns the process and its S3 port."""
    ports = {flag: free_port() for flag in _WEED_PORTS}
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "weed"),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={bucket}",
            "-admin.ui=false",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ],
        env={**os.environ, **creds},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, ports["s3.port"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    data = tmp_path_factory.mktemp("seaweed")
    creds = S3_CREDS
    proc, port = start_seaweed(data, "matrix-test", creds)
    try:
        wait_port(port, timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        s3 = S3Server(
            endpoint,
            "matrix-test",
            {**creds, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"},
        )
        _wait_bucket(s3)
        yield s3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_bucket(s3: S3Server, timeout: float = 60.0) -> None:
    import s3fs

    deadline = time.monotonic() + timeout
    while True:
        try:
            fs = s3fs.S3FileSystem(**s3.storage_options())
            fs.pipe(f"{s3.bucket}/.ready", b"1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_matrix(
    args: list[str],
    env: dict[str, str],
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`matrix ARGS` as a user would run it; output captured."""
    return subprocess.run(
        [str(VENV_BIN / "matrix"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO
    )


def read_output(uri: str, storage_options: dict[str, object] | None = None) -> list[dict[str, object]]:
    """The committed rows, as a reader should take them: the parts that commit records name
    (published, or still staged when their driver died between committing and publishing)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    rows: list[dict[str, object]] = []
    for record in committed_units(uri, storage_options):
        for part in record["parts"]:
            path = f"{root}/{part['name']}"
            if not fs.exists(path):
                path = f"{root}/_staging/{record['epoch']:08d}/{part['name']}"
            with fs.open(path, "rb") as handle:
                rows.extend(pq.read_table(handle).to_pylist())
    return rows


def current_epoch(uri: str, storage_options: dict[str, object] | None = None) -> int | None:
    """The epoch a reader takes: the manifest's once `_SUCCESS` exists, else the newest with records."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()  # s3fs caches listings, and a run is committing units meanwhile
    if fs.exists(f"{root}/_SUCCESS"):
        return int(json.loads(fs.cat_file(f"{root}/_manifest.json"))["epoch"])
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_commits", detail=False)]
    except FileNotFoundError:
        return None
    epochs = [int(n) for n in names if n.isdigit()]
    return max(epochs) if epochs else None


def committed_units(uri: str, storage_options: dict[str, object] | None = None) -> list[dict[str, object]]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    epoch = current_epoch(uri, storage_options)
    if epoch is None:
        return []
    return [json.loads(fs.cat_file(path)) for path in sorted(fs.glob(f"{root}/_commits/{epoch:08d}/*.json"))]


def read_manifest(uri: str, storage_options: dict[str, object] | None = None) -> dict[str, object]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return json.loads(fs.cat_file(f"{root}/_manifest.json"))


def assert_exactly_once(rows: list[dict[str, object]], expected: int) -> None:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids in the output"
    assert len(ids) == expected, f"{len(ids)} rows out, {expected} in"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def copy_corpus(dest: Path) -> Path:
    shutil.copytree(CORPUS, dest)
    return dest


@dataclass
class AirflowEnv:
    home: Path
    env: dict[str, str]

    def airflow(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "airflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
        )

    def prepare(self) -> None:
        """Migrate the metadata DB and create the GPU pool the shipped DAGs ask for."""
        for args in (("db", "migrate"), ("pools", "set", "matrix_gpu", "4", "GPU capacity")):
            result = self.airflow(*args, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]

    def python(self, code: str) -> str:
        """Run code in a fresh interpreter against this Airflow's database; returns its stdout."""
        result = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120, cwd=self.home
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout


@pytest.fixture(scope="session")
def airflow_env(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> AirflowEnv:
    """A real Airflow (SQLite, migrated) whose `matrix_ray_default` connection points at the test cluster."""
    home = tmp_path_factory.mktemp("airflow")
    host, port = ray_cluster.dashboard_url.removeprefix("http://").split(":")
    conn = {"conn_type": "matrix_ray", "host": host, "port": int(port), "password": ray_cluster.token}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RAY_"))}
    env.update(
        PATH=f"{VENV_BIN}:{env['PATH']}",
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        AIRFLOW_CONN_MATRIX_RAY_DEFAULT=json.dumps(conn),
        MATRIX_CURATION_LLM="sim",
        MATRIX_CURATION_PARTITIONS="2",
    )
    env.pop("MATRIX_TEST_PROXY_KEY_VALUE", None)
    airflow = AirflowEnv(home, env)
    airflow.prepare()
    return airflow


@pytest.fixture
def conn(airflow_env, monkeypatch) -> dict:
    """`matrix_ray_default` for this process, as the Airflow under test sees it; returns its fields."""
    value = airflow_env.env["AIRFLOW_CONN_MATRIX_RAY_DEFAULT"]
    monkeypatch.setenv("AIRFLOW_CONN_MATRIX_RAY_DEFAULT", value)
    return json.loads(value)


def task_context(dag_id: str, task_id: str, run_id: str, map_index: int = -1, try_number: int = 1, max_tries: int = 0):
    """A task instance's context as operators read it (ti, outlet_events), for running them in-process."""
    pushed: dict[str, object] = {}
    ti = SimpleNamespace(
        dag_id=dag_id,
        task_id=task_id,
        run_id=run_id,
        map_index=map_index,
        try_number=try_number,
        max_tries=max_tries,
        xcom_push=lambda key, value: pushed.__setitem__(key, value),
        pushed=pushed,
    )
    return {"ti": ti, "outlet_events": OutletEvents()}


class OutletEvents(dict):
    def __missing__(self, key):
        self[key] = SimpleNamespace(extra=None, added=[], add=lambda asset, extra=None: None)
        return self[key]


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A real single-node SLURM for the session (tests/slurm.py)."""
    with running_slurm(cpus=2) as cluster:
        yield cluster
