"""Exactly-once across kill -9, end to end: the real broker with the SQLite store, killed with
SIGKILL in the middle of a publisher's and a subscriber's QoS 1/2 traffic and started again on
the same data directory, several times per run (see crash_clients.py, which also runs longer
trials from the command line). Each run counts every message: QoS 2 arrives exactly once, QoS 1
at least once, first arrivals in the order published, and everything acknowledged arrives soon
after the last restart (no stall)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import free_port
from crash_clients import run


@pytest.mark.parametrize("qos, seed, away, broker_args", [
    (2, 1, 0.0, ()),
    (2, 2, 0.0, ()),
    (2, 3, 0.3, ("--max-queued-messages", "50")),  # the subscriber's backlog spills to the store
    (1, 4, 0.0, ()),
    (1, 5, 0.3, ("--max-queued-messages", "50")),
])
def test_nothing_acknowledged_lost_doubled_or_stuck_across_kills(
        tmp_path: Path, qos: int, seed: int, away: float, broker_args: tuple[str, ...]) -> None:
    report = run(qos, messages=3000, kills=6, seed=seed, port=free_port(), workdir=tmp_path, away=away,
                 broker_args=broker_args, settle=30.0, deadline=90.0)
    assert report.kills == 6, report.line()  # each of a broker serving the traffic
    assert report.ok(), report.line() + "\n" + (tmp_path / "broker.log").read_text(errors="replace")[-3000:]
    assert report.received == report.acknowledged == 3000
    if qos == 2:
        assert report.duplicates == 0
