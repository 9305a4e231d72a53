"""Bad spec, unknown key, unreadable input, unwritable output: one clear message, exit 2, no LLM work.

No RAY_ADDRESS is set, so a run that got as far as starting Ray or the LLM would take many seconds
and print Ray's banner; these must answer at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import CORPUS, run_matrix

ENV = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "--input", str(CORPUS), "--output", "OUT"], "unknown pipeline 'nope'"),
        (["missing.yaml", "--input", str(CORPUS), "--output", "OUT"], "spec file 'missing.yaml' does not exist"),
        (
            ["natural_reasoning", "--input", str(CORPUS), "--output", "OUT", "llm=sim", "llm.bogus=1"],
            "unknown key 'llm.sim.bogus'",
        ),
        (
            ["natural_reasoning", "--input", str(CORPUS), "--output", "OUT", "roles.filter.replicaz=2"],
            "unknown key 'roles.filter.replicaz'",
        ),
        (["natural_reasoning", "--input", str(CORPUS), "--output", "OUT", "llm=nope"], "Could not find 'llm/nope'"),
        (["natural_reasoning", "--input", str(CORPUS), "--output", "OUT", "llm=openai"], "'llm.model' must be set"),
        (["natural_reasoning", "--input", str(CORPUS), "--output", "OUT", "llm=sim", "llm.slots=0"], "llm.sim.slots"),
        (["natural_reasoning", "--input", str(CORPUS), "--output", "OUT", "--partitions", "0"], "run.partitions"),
        (
            ["natural_reasoning", "--input", "/does/not/exist", "--output", "OUT"],
            "input '/does/not/exist' does not exist",
        ),
        (["natural_reasoning", "--input", str(CORPUS), "--output", "/proc/forbidden/out"], "is not writable"),
        (
            ["natural_reasoning", "--input", str(CORPUS), "--output", "OUT", "params.gopher_quality.min_doc_wordz=5"],
            "params.gopher_quality: unknown key 'min_doc_wordz'",
        ),
        (
            ["prefilter", "--input", str(CORPUS), "--output", "OUT", "params.min_words=-1"],
            "params.min_words must be a number >= 0",
        ),
        (
            ["natural_reasoning", "--input", str(CORPUS), "--output", "OUT", "notakeyvalue"],
            "unrecognized arguments: notakeyvalue",
        ),
    ],
)
def test_bad_invocation_fails_fast(args: list[str], message: str, tmp_path: Path) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    started = time.monotonic()
    result = run_matrix(["run", *args], ENV, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout
    assert time.monotonic() - started < 30
    assert not list((tmp_path / "out").glob("part-*"))


def test_input_without_supported_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("hello")
    result = run_matrix(
        ["run", "natural_reasoning", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        ENV,
        timeout=60,
    )
    assert result.returncode == 2
    assert "has no JSONL" in result.stderr


def test_wrong_s3_credentials_fail_fast(s3_server, tmp_path: Path) -> None:
    env = {**ENV, **s3_server.env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    result = run_matrix(
        ["run", "natural_reasoning", "--input", str(CORPUS), "--output", f"s3://{s3_server.bucket}/wrong-creds"],
        env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "is not writable" in result.stderr
    assert "wrong-secret" not in result.stderr
