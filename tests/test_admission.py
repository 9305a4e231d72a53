"""The driver's admission checks (`Pipeline.admit`): what a stopped row looks like, and that a check
which raises stops only its own row."""

from __future__ import annotations

import dataclasses

from matrix_provider.runtime.pipeline import admission, admitted_row, load_pipeline
from matrix_provider.runtime.spec import compose
from tests.corpus import doc_text


def test_cheap_checks_stop_a_short_document_and_let_a_reasoning_one_through() -> None:
    pipeline = load_pipeline("natural_reasoning")
    params = compose("natural_reasoning", [], {"input": "-", "output": "-"}).params
    assert admission(pipeline, {"text": "too few words here"}, params) == ("filtered", "too short (4 words)")
    assert admission(pipeline, {"text": doc_text(1)}, params) is None
    row = admitted_row(pipeline, "d1", {"text": "x", "url": "https://a.test/1"}, "filtered", "too short (1 words)")
    assert row["status"] == "filtered" and row["error"] == "too short (1 words)"
    assert row["url"] == "https://a.test/1"  # the pipeline's own columns, as for a row that went through agents
    assert (row["id"], row["deliveries"], row["prompt_tokens"], row["latency_s"]) == ("d1", 1, 0, 0.0)


def test_a_check_that_raises_makes_only_that_row_an_error() -> None:
    def brittle(row: dict, params: dict) -> str | None:
        return None if row["text"].startswith("ok") else row["missing"]

    pipeline = dataclasses.replace(load_pipeline("prefilter"), admit=brittle)
    assert admission(pipeline, {"text": "ok then"}, {}) is None
    status, reason = admission(pipeline, {"text": "odd"}, {})
    assert status == "error" and reason == "admission check failed: KeyError: 'missing'"
    row = admitted_row(pipeline, "d2", {"text": "odd"}, status, reason)
    assert row["status"] == "error" and row["url"] is None  # error rows carry no pipeline columns
