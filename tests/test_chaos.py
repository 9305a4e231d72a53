"""Three fixed chaos schedules (tests/chaos.py) on a real 3-node cluster with S3 behind a fault proxy.

`make chaos` runs 30 schedules and prints the table; these three seeds together strike with every
fault kind: 5 (an S3 outage, a second run, a lost node, a killed job, an appended input), 17 (an
appended input, a frozen job taken over twice, a killed driver, a killed job) and 31 (a killed
agent and driver, an S3 error burst).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.chaos import KINDS, Schedule, chaos_stand, draw

SEEDS = (5, 17, 31)


def test_the_fixed_seeds_strike_with_every_fault_kind() -> None:
    assert {f.kind for seed in SEEDS for f in draw(seed)} == set(KINDS)


@pytest.fixture(scope="module")
def stand(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    with chaos_stand(tmp_path_factory.mktemp("chaos"), s3_server) as parts:
        yield parts


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", SEEDS)
def test_a_chaos_schedule_loses_and_doubles_nothing(stand, tmp_path: Path, seed: int) -> None:
    outcome = Schedule(*stand, tmp_path, seed).run()
    assert outcome.clean, f"violations {outcome.violations}; readers {outcome.readers}; {asdict(outcome)}"
    assert set(outcome.readers) == {"plain", "duckdb", "records"}
