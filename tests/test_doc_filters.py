"""natural_reasoning's admission filters: datatrove's blocks behind our heuristics, their reasons in
the output, switching and tuning them in `params`, and documents that make a check fail."""

from __future__ import annotations

import json
from pathlib import Path

from matrix_provider.runtime.pipeline import admission, load_pipeline
from matrix_provider.runtime.spec import compose
from tests.conftest import REPO, assert_exactly_once, read_manifest, read_output, run_matrix
from tests.corpus import doc_text

PIPELINE = load_pipeline("natural_reasoning")


def _params(*overrides: str) -> dict:
    return compose("natural_reasoning", list(overrides), {"input": "-", "output": "-"}).params


def _repeated_lines(i: int) -> str:
    """Passes our heuristics, but a third of its text is one line repeated: FineWeb's char_dup_ratio."""
    body = doc_text(i).split("\n")
    return "\n".join(body + [body[1]] * 3)


def _few_alpha_words(i: int) -> str:
    """Passes our heuristics and FineWeb, but a quarter of its words are numbers: Gopher's alpha rule."""
    return "\n".join(f"{line} 1 2 3 4 5 6 7 8 9 10 11 12 13." for line in doc_text(i).split("\n"))


def test_datatrove_blocks_stop_documents_our_heuristics_let_through() -> None:
    params = _params()
    assert admission(PIPELINE, {"text": doc_text(3)}, params) is None
    assert admission(PIPELINE, {"text": _repeated_lines(3)}, params) == (
        "filtered",
        "fineweb_quality: char_dup_ratio",
    )
    status, reason = admission(PIPELINE, {"text": _few_alpha_words(3)}, params)
    assert (status, reason.split(" (")[0]) == ("filtered", "gopher_quality: gopher_below_alpha_threshold")
    assert reason.endswith("of words alphabetic)")  # the measured value, which datatrove does not report
    # Ours run first and keep their reasons.
    assert admission(PIPELINE, {"text": "too few words here"}, params) == ("filtered", "too short (4 words)")


def test_params_switch_a_block_off_or_tune_it() -> None:
    repeated, numbers = {"text": _repeated_lines(4)}, {"text": _few_alpha_words(4)}
    fineweb_off = _params("params.fineweb_quality.enabled=false")
    assert admission(PIPELINE, repeated, fineweb_off) == ("filtered", "gopher_repetition: dup_line_frac")
    both_off = _params("params.fineweb_quality.enabled=false", "params.gopher_repetition.enabled=false")
    assert admission(PIPELINE, repeated, both_off) is None
    tuned = _params("params.fineweb_quality.char_duplicates_ratio=0.5", "params.gopher_repetition.enabled=false")
    assert admission(PIPELINE, repeated, tuned) is None
    assert admission(PIPELINE, numbers, _params("params.gopher_quality.max_non_alpha_words_ratio=0.5")) is None
    assert admission(PIPELINE, numbers, _params("params.gopher_quality.max_non_alpha_words_ratio=null")) is None
    status, reason = admission(PIPELINE, {"text": doc_text(4)}, _params("params.gopher_quality.min_doc_words=5000"))
    assert (status, reason) == ("filtered", "gopher_quality: gopher_short_doc (202 words)")


def test_bad_params_give_a_clear_error_naming_the_key() -> None:
    row = {"text": doc_text(5)}
    cases = {
        "params.gopher_quality.min_doc_wordz=3": "params.gopher_quality: unknown key 'min_doc_wordz'; it takes",
        "params.c4_quality.filter_javascript=maybe": "params.c4_quality.filter_javascript: expected a value like True",
        "params.fineweb_quality.enabled=no": "params.fineweb_quality.enabled must be true or false, got 'no'",
        "params.gopher_repetition=off": "params.gopher_repetition must be a mapping",
        "params.min_words=-1": "params.min_words must be a number >= 0, got -1",
    }
    for override, message in cases.items():
        status, reason = admission(PIPELINE, row, _params(override))
        assert status == "error" and reason.startswith(f"admission check failed: ParamsError: {message}"), reason


def test_documents_a_check_chokes_on_are_row_results() -> None:
    params = _params()
    cases = {
        "": ("filtered", "too short (0 words)"),
        "x" * 3_000_000: ("filtered", "too short (1 words)"),
        "\x00\xff\ufffd" * 10_000: ("filtered", "too short (0 words)"),
    }
    for text, verdict in cases.items():
        assert admission(PIPELINE, {"text": text}, params) == verdict
    for text in (17, None, ["a"], {"k": "v"}):
        status, reason = admission(PIPELINE, {"text": text}, params)
        assert status == "error" and "text is not a string" in reason


def test_a_block_that_raises_makes_only_that_row_an_error(monkeypatch) -> None:
    from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter

    def chokes(self, doc) -> bool:
        if "Document 8." in doc.text:
            raise ZeroDivisionError("division by zero")
        return True

    monkeypatch.setattr(GopherRepetitionFilter, "filter", chokes)
    params = _params()
    assert admission(PIPELINE, {"text": doc_text(8)}, params) == (
        "error",
        "admission check failed: ZeroDivisionError: division by zero",
    )
    assert admission(PIPELINE, {"text": doc_text(9)}, params) is None


def test_prefilter_run_writes_datatrove_reasons_and_row_errors(ray_cluster, tmp_path: Path) -> None:
    """A real run: reasons in the committed rows, odd documents decided row by row, the unit committed."""
    rows = [
        {"id": "good", "text": doc_text(6), "url": "https://a.test/good"},
        {"id": "dup-lines", "text": _repeated_lines(6)},
        {"id": "numbers", "text": _few_alpha_words(6)},
        {"id": "short", "text": "three words here"},
        {"id": "empty", "text": ""},
        {"id": "one-line", "text": "word" * 200_000},
        {"id": "binary", "text": "\x00\x01\xfe" * 5000},
        {"id": "number", "text": 42},
    ]
    src = tmp_path / "in" / "docs.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    env = {**ray_cluster.env, "PYTHONPATH": str(REPO)}
    result = run_matrix(["run", "prefilter", "--input", str(src.parent), "--output", str(out), "--quiet"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = {r["id"]: r for r in read_output(str(out))}
    assert_exactly_once(list(got.values()), len(rows))
    assert (got["good"]["status"], got["good"]["url"]) == ("ok", "https://a.test/good")
    assert got["dup-lines"]["error"] == "fineweb_quality: char_dup_ratio"
    assert got["numbers"]["error"].startswith("gopher_quality: gopher_below_alpha_threshold (")
    assert got["short"]["error"] == "too short (3 words)"
    assert got["number"]["status"] == "error" and "is not a string" in got["number"]["error"]
    assert {got[k]["status"] for k in ("empty", "one-line", "binary")} == {"filtered"}
    assert read_manifest(str(out))["rows_out"] == len(rows)
