"""What a run reports while it runs, off a terminal (the lines the Airflow trigger streams)."""

from __future__ import annotations

import pytest

from matrix_provider.protocol import new_progress, parse_progress
from matrix_provider.runtime import progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def _totals(rows: int, tokens: int, resumed_inside: int = 0) -> dict[str, int]:
    return {
        "rows_ok": rows,
        "rows_filtered": 0,
        "rows_error": 0,
        "rows_resumed": resumed_inside,
        "in_flight": 64,
        "prompt_tokens": tokens,
        "completion_tokens": 0,
    }


def test_a_twelve_hour_run_writes_a_line_each_half_minute_not_every_two_seconds(clock: Clock, capsys) -> None:
    """Defect: a line every 2 s, ~21,600 lines in the task log over the shipped DAG's 12 h timeout."""
    reporter = progress.Reporter(units_todo=10_000, rows_resumed=0, every_s=30.0)
    for tick in range(12 * 3600 * 2):  # the job polls twice a second
        clock.now += 0.5
        done = tick * 10_000 // (12 * 3600 * 2)
        reporter.update(_totals(done * 100, done * 1000), done)
    reporter.close()
    lines = capsys.readouterr().out.splitlines()
    assert all(parse_progress(line) for line in lines)
    assert 12 * 120 <= len(lines) <= 12 * 120 + 100 + 2, len(lines)  # 2-s lines: 21,600


def test_a_line_names_units_eta_a_windowed_rate_and_resumed_rows_apart(clock: Clock, capsys) -> None:
    reporter = progress.Reporter(units_todo=20, rows_resumed=5_000, every_s=30.0)
    clock.now += 1.0
    reporter.update(_totals(0, 0), 0)
    assert capsys.readouterr().out == "", "nothing before the first 2 s"
    for second in range(2, 101):  # 10 units in 100 s at 1,000 tokens/s
        clock.now += 1.0
        reporter.update(_totals(second * 50, second * 1000, resumed_inside=300), second // 10)
    first = parse_progress(capsys.readouterr().out.splitlines()[0])
    assert first["units_todo"] == 20 and first["resumed"] == 5_300
    assert first["rows_done"] == 100, "rows done this run, resumed rows apart"
    for _ in range(60):  # then a stall: no token for a minute
        clock.now += 1.0
        reporter.update(_totals(5_000, 100_000, resumed_inside=300), 10)
    reporter.close()
    last = parse_progress(capsys.readouterr().out.splitlines()[-1])
    assert last["tokens_per_s"] == 0.0, "a stall shows at once, not as a slowly falling average"
    assert last["units_done"] == 10 and last["eta_s"] == pytest.approx(160, rel=0.01)


def test_a_short_run_still_shows_one_line_that_the_trigger_picks_up(clock: Clock, capsys) -> None:
    reporter = progress.Reporter(units_todo=1, rows_resumed=0, every_s=30.0)
    clock.now += 0.5
    reporter.update(_totals(3, 10), 0)
    reporter.close()
    tail = capsys.readouterr().out
    assert [parse_progress(line)["rows_done"] for line in new_progress(tail, "")] == [3]
