"""Azure OpenAI and Gemini proxies behind Ray Serve, against a local stand-in upstream.

The key lives only in the cluster's environment (see conftest): it must reach the upstream and
appear nowhere else: not in the CLI's output, the output files, the manifest or Ray's logs.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from tests.conftest import PROXY_KEY, PROXY_KEY_ENV, read_manifest, read_output, run_matrix
from tests.corpus import write_jsonl
from tests.upstream_stand_in import StandIn


@pytest.fixture(scope="module")
def upstream() -> StandIn:
    return StandIn().start()


def _args(backend: str, upstream: StandIn, src: Path, out: Path, **extra: str) -> list[str]:
    settings = {"upstream": upstream.url, "api_key_env": PROXY_KEY_ENV, "model": "my-deployment", **extra}
    return [
        "run",
        "natural_reasoning",
        "--input",
        str(src),
        "--output",
        str(out),
        f"llm={backend}",
        *(f"llm.{k}={v}" for k, v in settings.items()),
    ]


def _ray_logs_contain(ray_cluster, text: str) -> list[str]:
    hits = []
    for path in glob.glob(f"{ray_cluster.temp_dir}/session_latest/logs/**/*", recursive=True):
        try:
            if text in Path(path).read_text(errors="ignore"):
                hits.append(path)
        except (IsADirectoryError, PermissionError):
            continue
    return hits


@pytest.mark.parametrize("backend", ["azure_openai", "gemini"])
def test_key_goes_upstream_and_nowhere_else(backend: str, ray_cluster, upstream: StandIn, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 6)
    out = tmp_path / "out"
    upstream.seen.clear()
    result = run_matrix(_args(backend, upstream, src, out, app_name=f"test-{backend}"), ray_cluster.env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_output(str(out))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    assert upstream.seen, "no request reached the upstream"
    for request in upstream.seen:
        if backend == "azure_openai":
            assert request["api-key"] == PROXY_KEY
            assert request["path"].startswith("/openai/deployments/my-deployment/")
            assert "api-version=" in request["query"]
        else:
            assert request["authorization"] == f"Bearer {PROXY_KEY}"
            assert request["model"] == "my-deployment"
    assert PROXY_KEY not in result.stdout + result.stderr
    written = [out / "_manifest.json", *out.glob("_epochs/*.json"), *out.glob("_commits/*/*.json")]
    assert len(written) > 2 and not [p for p in written if PROXY_KEY in p.read_text()]
    assert not _ray_logs_contain(ray_cluster, PROXY_KEY)
    assert read_manifest(str(out))["prompt_tokens"] > 0


def test_upstream_error_echoing_the_key_is_scrubbed(ray_cluster, upstream: StandIn, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 2)
    out = tmp_path / "out"
    upstream.refuse = True
    try:
        result = run_matrix(_args("azure_openai", upstream, src, out, app_name="test-azure-refuse"), ray_cluster.env)
    finally:
        upstream.refuse = False
    assert result.returncode == 2
    assert "refused the API key" in result.stderr
    assert PROXY_KEY not in result.stdout + result.stderr
    assert not _ray_logs_contain(ray_cluster, PROXY_KEY)


def test_missing_key_on_the_cluster_is_one_clear_error(ray_cluster, upstream: StandIn, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 2)
    result = run_matrix(
        _args("gemini", upstream, src, tmp_path / "out", api_key_env="NO_SUCH_KEY_VAR", app_name="test-gemini-nokey"),
        ray_cluster.env,
    )
    assert result.returncode == 2
    assert "NO_SUCH_KEY_VAR" in result.stderr
    assert "Traceback" not in result.stderr
