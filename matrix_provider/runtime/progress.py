"""Live progress of a run: a rich progress bar on a terminal, plain `[matrix] progress …` lines
elsewhere (Ray job logs, which the Airflow operator streams into the task log), and a summary table.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from matrix_provider.protocol import PROGRESS_PREFIX

_LINE_EVERY_S = 2.0


class Reporter:
    def __init__(self, total_hint: int | None, quiet: bool = False):
        self.console = Console(stderr=False)
        self.tty = sys.stdout.isatty() and not quiet
        self.quiet = quiet
        self.started = time.monotonic()
        self.last_line = 0.0
        self.progress: Progress | None = None
        if self.tty:
            self.progress = Progress(
                TextColumn("[bold]rows"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("rows", total=total_hint, info="")
            self.progress.start()

    def update(self, totals: dict[str, Any]) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = totals["rows_ok"] + totals["rows_filtered"] + totals["rows_error"] + totals["rows_resumed"]
        tokens = totals["prompt_tokens"] + totals["completion_tokens"]
        info = (
            f"in flight {totals['in_flight']}  errors {totals['rows_error']}  "
            f"resumed {totals['rows_resumed']}  {tokens / elapsed:,.0f} tok/s"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=done, info=info)
        elif not self.quiet and time.monotonic() - self.last_line >= _LINE_EVERY_S:
            self.last_line = time.monotonic()
            print(
                f"{PROGRESS_PREFIX}rows_done={done} in_flight={totals['in_flight']} "
                f"ok={totals['rows_ok']} filtered={totals['rows_filtered']} errors={totals['rows_error']} "
                f"resumed={totals['rows_resumed']} tokens_per_s={tokens / elapsed:.1f} elapsed_s={elapsed:.1f}",
                flush=True,
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


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
