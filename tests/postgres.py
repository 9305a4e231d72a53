"""A throwaway PostgreSQL server for tests that run Airflow's services side by side.

SQLite locks the whole database on each write; with a scheduler, a DAG processor, a triggerer and
an API server all writing, a CLI call can fail with "database is locked". Production Airflow runs
on PostgreSQL, so the whole-system tests do too.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _bin(name: str) -> str:
    """Debian puts the server tools under /usr/lib/postgresql/<major>/bin, off PATH."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: run `bash tests/system_deps.sh` (installs postgresql)")
    return found


def _as_owner(args: list[str]) -> list[str]:
    """The server refuses to run as root; run it as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def running_postgres(port: int) -> Iterator[str]:
    """Start a server on 127.0.0.1:`port` with an `airflow` database; yield its SQLAlchemy URL."""
    root = Path(tempfile.mkdtemp(prefix="matrix-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")

    def run(*args: str, check: bool = True) -> None:
        subprocess.run(_as_owner(list(args)), check=check, capture_output=True, text=True, timeout=120, cwd=root)

    run(_bin("initdb"), "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8")
    options = f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=200"
    run(_bin("pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(root / "pg.log"), "start")
    try:
        run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "airflow", "airflow")
        yield f"postgresql+psycopg2://airflow@127.0.0.1:{port}/airflow"
    finally:
        run(_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
