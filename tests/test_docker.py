"""docker/: hadolint on every Dockerfile, and the images follow the lock (versions, pins, build args).

`make image` builds the runtime image for real (offline, a few minutes); these checks are the fast part.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
HADOLINT = Path(sys.executable).parent / "hadolint"
SCRIPT = DOCKER / "build_and_check.sh"
REQUIREMENTS = DOCKER / "requirements-runtime.txt"
EXPECTED = {"runtime.Dockerfile", "runtime-gpu.Dockerfile", "airflow.Dockerfile", "standin-base.Dockerfile"}


def _dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("*Dockerfile"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
        buf = ""
    return out


def _arg_defaults(path: Path) -> dict[str, str]:
    """Each ARG's first default, quotes stripped."""
    defaults: dict[str, str] = {}
    for keyword, rest in _instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults.setdefault(name, value.strip('"'))
    return defaults


def _runs(path: Path) -> list[str]:
    return [rest for keyword, rest in _instructions(path) if keyword == "RUN"]


def _lock_version(name: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (version,) = {p["version"] for p in lock["package"] if p["name"] == name}
    return version


def _hadolint(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    # Run outside the repo with HOME and XDG_CONFIG_HOME empty, so no .hadolint.yaml can add ignores.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "NO_COLOR": "1"}
    command = [str(HADOLINT), "--no-color", *map(str, files)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_every_dockerfile(tmp_path):
    files = _dockerfiles()
    assert {f.name for f in files} >= EXPECTED
    result = _hadolint(tmp_path, *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_is_not_a_no_op(tmp_path):
    """The same invocation fails a Dockerfile with known faults, so a pass above means something."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nRUN pip install ray\n")
    result = _hadolint(tmp_path, bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013", "DL3042"):  # untagged FROM, unpinned apt/pip, pip cache
        assert rule in result.stdout, result.stdout


def test_every_hadolint_ignore_is_explained():
    """An inline ignore needs a reason: the comment line right above it (hadolint takes no trailing text)."""
    ignores = 0
    for path in _dockerfiles():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*#\s*hadolint\s+ignore=", line):
                ignores += 1
                above = lines[i - 1].strip() if i else ""
                assert above.startswith("#") and len(above) > 20, f"{path.name}:{i + 1}: no reason above the ignore"
                assert re.fullmatch(r"#\s*hadolint\s+ignore=DL\d{4}(,DL\d{4})*", line.strip()), line
    assert ignores <= 2, "more ignores than the justified ones: fix the Dockerfile instead"
    assert not (ROOT / ".hadolint.yaml").exists() and not (DOCKER / ".hadolint.yaml").exists()


def test_runtime_requirements_are_the_lock_export():
    check = ["bash", str(SCRIPT), "requirements", "--check"]
    result = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    text = REQUIREMENTS.read_text()
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, flags=re.M)
    assert len(pins) > 100
    assert ("ray", _lock_version("ray")) in pins
    assert ("xllamacpp", _lock_version("xllamacpp")) in pins  # the embedded extra is in
    assert not [name for name, _ in pins if name.startswith("apache-airflow")], "a Ray node installs no Airflow"
    # Every requirement carries a hash: the Dockerfile installs with --require-hashes.
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)


def test_requirements_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "requirements-runtime.txt"
    ray = _lock_version("ray")
    stale.write_text(REQUIREMENTS.read_text().replace(f"\nray=={ray} ", "\nray==2.59.0 "))
    env = {**os.environ, "MATRIX_REQS": str(stale)}
    result = subprocess.run(
        ["bash", str(SCRIPT), "requirements", "--check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "-ray==2.59.0" in result.stderr and f"+ray=={ray}" in result.stderr


def test_runtime_image_takes_its_base_as_a_build_arg_and_installs_the_lock():
    path = DOCKER / "runtime.Dockerfile"
    instructions = _instructions(path)
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert _arg_defaults(path)["BASE_IMAGE"] == f"rayproject/ray:{_lock_version('ray')}-py311"
    (lock_install,) = [run for run in _runs(path) if "requirements-runtime.txt" in run]
    assert "--require-hashes" in lock_install and "--no-deps" in lock_install
    (project_install,) = [run for run in _runs(path) if "matrix_provider-${MATRIX_VERSION}" in run]
    assert "--no-deps" in project_install and "matrix --help" in project_install
    assert ("COPY", "requirements-runtime.txt /tmp/matrix/requirements-runtime.txt") in instructions
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users[-1] == "1000:100"  # rayproject/ray's `ray` user, not root


@pytest.mark.parametrize("name", sorted(EXPECTED - {"standin-base.Dockerfile"}))
def test_images_carry_the_project_version(name):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _arg_defaults(DOCKER / name)["MATRIX_VERSION"] == version


def test_gpu_image_pins_the_engines_ray_supports():
    path = DOCKER / "runtime-gpu.Dockerfile"
    defaults = _arg_defaults(path)
    ray = _lock_version("ray")
    assert defaults["BASE_IMAGE"] == f"rayproject/ray:{ray}-py311-gpu"
    assert defaults["RAY_VERSION"] == ray
    # vLLM: the version Ray's own `llm` extra pins, read from the installed Ray's metadata.
    (ray_vllm,) = [r for r in importlib.metadata.requires("ray") if r.startswith("vllm")]
    assert re.search(r"==([\w.]+)", ray_vllm).group(1) == defaults["VLLM_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", defaults["SGLANG_VERSION"])
    stages = [rest.split(" AS ")[-1] for keyword, rest in _instructions(path) if keyword == "FROM"]
    assert stages == ["runtime", "sglang", "vllm"]  # vllm last: the default target


def test_airflow_image_follows_the_lock_and_airflow_constraints():
    path = DOCKER / "airflow.Dockerfile"
    defaults = _arg_defaults(path)
    assert defaults["AIRFLOW_VERSION"] == _lock_version("apache-airflow")
    assert [rest for keyword, rest in _instructions(path) if keyword == "FROM"] == [
        "apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}"
    ]
    assert defaults["AIRFLOW_CONSTRAINTS"].endswith("constraints-${AIRFLOW_VERSION}/constraints-${PYTHON_VERSION}.txt")
    (install,) = _runs(path)
    assert '--constraint "${AIRFLOW_CONSTRAINTS}"' in install
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install  # pip may not move Airflow itself
    assert "runtime" not in defaults["MATRIX_EXTRAS"]


def test_standin_base_matches_the_lock():
    assert _arg_defaults(DOCKER / "standin-base.Dockerfile")["RAY_VERSION"] == _lock_version("ray")
