"""Live progress of a run: a rich progress bar on a terminal, plain `[matrix] progress …` lines
elsewhere (Ray job logs, which the Airflow operator streams into the task log), and a summary table.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from matrix_provider.protocol import PROGRESS_PREFIX

_FIRST_LINE_S = 2.0  # the first plain line comes early, so a short run shows one too
_RATE_WINDOW_S = 30.0  # tokens/s over the last half minute, not since the start


class Reporter:
    """Progress of the units this run does, apart from what an earlier run committed.

    On a terminal a rich bar over the run's units; elsewhere `[matrix] progress …` lines (which the
    Airflow trigger streams into the task log): the first after 2 s, then every `every_s` or at each
    1 % of the units, and one at the end: about 1,500 lines over a 12-hour run, not 21,600.
    """

    def __init__(self, units_todo: int, rows_resumed: int, every_s: float, quiet: bool = False):
        self.console = Console(stderr=False)
        self.tty = sys.stdout.isatty() and not quiet
        self.quiet = quiet
        self.units_todo, self.rows_resumed = units_todo, rows_resumed
        self.every_s = every_s
        self.started = time.monotonic()
        self.last_line: float | None = None
        self.last_units = -1
        self.window: collections.deque[tuple[float, int]] = collections.deque()
        self.latest = ""
        self.progress: Progress | None = None
        if self.tty:
            self.progress = Progress(
                TextColumn("[bold]units"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("units", total=units_todo, info="")
            self.progress.start()

    def tokens_per_s(self, now: float, tokens: int) -> float:
        """Over the last `_RATE_WINDOW_S`: a stall shows as a stall, not as a slowly falling average."""
        if self.window and tokens < self.window[-1][1]:  # a restarted driver counts from 0 again
            self.window.clear()
        self.window.append((now, tokens))
        while len(self.window) > 2 and now - self.window[1][0] >= _RATE_WINDOW_S:
            self.window.popleft()
        then, before = self.window[0]
        return (tokens - before) / (now - then) if now > then else 0.0

    def eta_s(self, elapsed: float, units_done: int) -> float | None:
        return (self.units_todo - units_done) * elapsed / units_done if units_done else None

    def update(self, totals: dict[str, Any], units_done: int) -> None:
        """`totals`: the drivers' figures for this run; `units_done`: units this run committed."""
        now = time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        rows = totals["rows_ok"] + totals["rows_filtered"] + totals["rows_error"]
        resumed = self.rows_resumed + totals["rows_resumed"]  # whole units, and rows inside open ones
        rate = self.tokens_per_s(now, totals["prompt_tokens"] + totals["completion_tokens"])
        eta = self.eta_s(elapsed, units_done)
        self.latest = (
            f"{PROGRESS_PREFIX}units_done={units_done} units_todo={self.units_todo} "
            f"rows_done={rows} in_flight={totals['in_flight']} ok={totals['rows_ok']} "
            f"filtered={totals['rows_filtered']} errors={totals['rows_error']} resumed={resumed} "
            f"tokens_per_s={rate:.1f}" + (f" eta_s={eta:.0f}" if eta is not None else "") + f" elapsed_s={elapsed:.1f}"
        )
        if self.progress is not None:
            info = f"rows {rows:,}  in flight {totals['in_flight']}  errors {totals['rows_error']}  {rate:,.0f} tok/s"
            self.progress.update(self.task, completed=units_done, info=info)
        elif not self.quiet and self._line_due(now, units_done):
            self.last_line, self.last_units = now, units_done
            print(self.latest, flush=True)

    def _line_due(self, now: float, units_done: int) -> bool:
        if self.last_line is None:
            return now - self.started >= _FIRST_LINE_S
        step = max(1, self.units_todo // 100)
        return now - self.last_line >= self.every_s or units_done - self.last_units >= step

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        elif not self.quiet and self.latest:
            print(self.latest, flush=True)  # where the run stood at its end


def print_summary(manifest: dict[str, Any]) -> None:
    """The closing table of a run, then the most common error and filter reasons."""
    console = Console()
    table = Table(title=f"matrix run: {manifest['pipeline']} -> {manifest['output']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in (
        "rows_in",
        "rows_ok",
        "rows_filtered",
        "rows_error",
        "rows_resumed",
        "rows_redelivered",
        "prompt_tokens",
        "completion_tokens",
        "tokens_per_s",
        "wall_seconds",
        "partitions",
        "concurrency",
    ):
        value = manifest.get(key)
        table.add_row(key, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}")
    console.print(table)
    if manifest.get("summary"):
        figures = Table(title=f"{manifest['pipeline']} summary")
        figures.add_column("figure")
        figures.add_column("value", justify="right")
        for key, value in manifest["summary"].items():
            figures.add_row(key, str(value))
        console.print(figures)
    if manifest.get("error_reasons"):
        reasons = Table(title="error and filter reasons (top)")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        for reason, count in manifest["error_reasons"].items():
            reasons.add_row(reason, str(count))
        console.print(reasons)
