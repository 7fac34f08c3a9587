"""Deadlines on one timer (mqtt_broker.deadlines): the keepalives of every connection, the expiry
of every disconnected session."""

from __future__ import annotations

from operator import methodcaller

from twisted.internet.task import Clock

from mqtt_broker.deadlines import Deadlines
from protocol_helpers import TurnClock


def Keepalives(clock: Clock) -> Deadlines:
    return Deadlines(clock, methodcaller("keepalive_due"))


class Connection:
    """Due at ``deadlines`` in turn; records when it was called."""

    def __init__(self, clock: Clock, *deadlines: float) -> None:
        self.clock = clock
        self.deadlines = list(deadlines)
        self.called: list[float] = []

    def keepalive_due(self) -> float | None:
        self.called.append(self.clock.seconds())
        return self.deadlines.pop(0) if self.deadlines else None


def test_each_connection_is_called_at_its_own_time_on_one_timer() -> None:
    clock = Clock()
    keepalives = Keepalives(clock)
    late, early, again = Connection(clock), Connection(clock), Connection(clock, 12.5, 20.0)
    keepalives.watch(late, 15.0)
    keepalives.watch(early, 5.0)
    keepalives.watch(again, 7.5)
    assert len(clock.getDelayedCalls()) == 1 and len(keepalives) == 3
    clock.advance(4.99)
    assert not early.called
    clock.advance(0.01)
    assert early.called == [5.0]
    clock.pump([2.5, 5.0, 2.5, 5.0])
    assert again.called == [7.5, 12.5, 20.0] and late.called == [15.0]
    assert len(keepalives) == 0 and clock.getDelayedCalls() == []


def test_a_forgotten_connection_is_not_called_and_not_held() -> None:
    clock = Clock()
    keepalives = Keepalives(clock)
    kept, gone = Connection(clock), Connection(clock)
    keepalives.watch(kept, 10.0)
    entry = keepalives.watch(gone, 5.0)
    keepalives.forget(entry)
    keepalives.forget(entry)  # twice changes nothing
    assert entry[2] is None and len(keepalives) == 1
    clock.advance(10)
    assert gone.called == [] and kept.called == [10.0]


def test_forgetting_the_last_one_leaves_a_timer_that_finds_nothing() -> None:
    clock = Clock()
    keepalives = Keepalives(clock)
    connection = Connection(clock)
    keepalives.forget(keepalives.watch(connection, 5.0))
    assert len(keepalives) == 0 and len(clock.getDelayedCalls()) == 1  # kept for the next one
    later = Connection(clock)
    keepalives.forget(keepalives.watch(later, 7.0))
    keepalives.watch(later, 9.0)
    assert len(clock.getDelayedCalls()) == 1  # the same timer, not one per connection
    clock.advance(5.0)
    assert connection.called == [] and later.called == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(4.0)
    assert later.called == [9.0] and clock.getDelayedCalls() == []


def test_forgotten_entries_are_swept_once_they_are_the_majority() -> None:
    clock = Clock()
    keepalives = Keepalives(clock)
    entries = [keepalives.watch(Connection(clock), 100.0 + n) for n in range(200)]
    for entry in entries[:150]:
        keepalives.forget(entry)
    assert len(keepalives._heap) < 200 and len(keepalives) == 50
    survivors = [entry[2] for entry in entries[150:]]
    clock.advance(100)
    clock.pump([1.0] * 200)
    assert [c.called for c in survivors] == [[100.0 + n] for n in range(150, 200)]


def test_a_connection_that_forgets_another_while_it_is_called() -> None:
    clock = Clock()
    keepalives = Keepalives(clock)
    other = Connection(clock)
    other_entry = keepalives.watch(other, 5.0)

    class Dropper(Connection):
        def keepalive_due(self) -> float | None:
            keepalives.forget(other_entry)  # e.g. a takeover closing another connection
            return super().keepalive_due()

    dropper = Dropper(clock, 9.0)
    keepalives.watch(dropper, 5.0)  # the same time, watched later: called after
    keepalives.forget(other_entry)
    keepalives.watch(other, 5.0)
    clock.advance(5)
    assert dropper.called == [5.0]
    clock.advance(4)
    assert dropper.called == [5.0, 9.0]


def test_at_most_per_turn_are_called_a_turn_the_rest_in_the_next_turns() -> None:
    clock = TurnClock()
    called: list[tuple[str, float]] = []
    deadlines = Deadlines(clock, lambda name: called.append((name, clock.seconds())), per_turn=2)
    for name in "abcde":
        deadlines.watch(name, 5.0)
    deadlines.watch("later", 6.0)
    clock.advance(5)
    assert called == [("a", 5.0), ("b", 5.0)]
    assert [call.getTime() for call in clock.getDelayedCalls()] == [5.0]  # the next turn, not 6
    clock.advance(0)
    assert [name for name, _ in called] == ["a", "b", "c", "d"]
    clock.advance(1)
    assert called[4:] == [("e", 6.0), ("later", 6.0)] and len(deadlines) == 0


def test_stopped_it_calls_nothing_and_what_it_held_can_be_forgotten_still() -> None:
    clock = Clock()
    called: list[str] = []
    deadlines = Deadlines(clock, called.append)
    entry = deadlines.watch("a", 5.0)
    deadlines.watch("b", 6.0)
    deadlines.stop()
    assert clock.getDelayedCalls() == [] and len(deadlines) == 0
    deadlines.forget(entry)
    deadlines.watch("c", 7.0)
    clock.advance(10)
    assert called == ["c"] and len(deadlines) == 0
