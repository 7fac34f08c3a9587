"""Deadlines on one timer of the broker's clock: every connection's (CONNECT within
connect_timeout, then its keepalive), every disconnected session's expiry and every delayed will's
delay.

A ``callLater`` costs about 420 bytes with Twisted's reactor (the ``DelayedCall``, its bound
methods and keyword dictionary): a fifth of what an idle connection holds, and more than an
offline session holds besides. Here a deadline is an entry of a heap (a small list) and the
clock has one timer, for the earliest deadline, so each one is checked at exactly the time its
own timer would have fired.

An entry that is no longer wanted is forgotten by clearing it, and then waits in the heap for
its time (holding nothing); the heap is rebuilt without such entries once they are the
majority, as Twisted's reactor does with cancelled calls.
"""

from __future__ import annotations

import heapq
from itertools import count
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime


class Deadlines:
    """``watch(item, at)`` calls ``due(item)`` at clock time ``at`` (unless ``forget`` comes
    first), which returns the next time to be called at, or None. ``per_turn``: at most so many
    calls a turn of the reactor, the rest in the next turns (0: all that are due)."""

    def __init__(self, clock: IReactorTime, due: Callable[[Any], float | None], per_turn: int = 0) -> None:
        self.clock = clock
        self._call_due = due
        self._per_turn = per_turn
        self._heap: list[list[Any]] = []
        """Entries ``[at, order, item]``; ``item`` is None once forgotten."""
        self._order = count()
        self._forgotten = 0
        self._call: Any = None
        self._call_at = 0.0

    def watch(self, item: Any, at: float) -> list[Any]:
        """Returns the entry, for :meth:`forget`."""
        entry = [at, next(self._order), item]
        heapq.heappush(self._heap, entry)
        if self._call is None or at < self._call_at:
            self._schedule(at)
        return entry

    def forget(self, entry: list[Any]) -> None:
        if entry[2] is not None:
            entry[2] = None
            self._forgotten += 1
            if self._forgotten == len(self._heap):
                # None left to watch. The timer stays: it finds nothing when it fires, where
                # cancelling it would cost a new one for the next connection (a callLater and a
                # cancel per connection, when each connects before the next one comes).
                self._heap.clear()
                self._forgotten = 0
            elif self._forgotten > 50 and self._forgotten * 2 > len(self._heap):
                heap = self._heap  # in place: _due may be iterating over it
                heap[:] = [e for e in heap if e[2] is not None]
                heapq.heapify(heap)
                self._forgotten = 0

    def __len__(self) -> int:
        return len(self._heap) - self._forgotten

    def stop(self) -> None:
        """Forget every entry (a later ``forget`` of one changes nothing) and the timer."""
        for entry in self._heap:
            entry[2] = None
        self._heap.clear()
        self._forgotten = 0
        cancel(self._call)
        self._call = None

    def _schedule(self, at: float) -> None:
        cancel(self._call)
        self._call_at = at
        self._call = self.clock.callLater(max(at - self.clock.seconds(), 0), self._due)

    def _due(self) -> None:
        self._call = None
        heap = self._heap
        now = self.clock.seconds()
        left = self._per_turn or -1
        while heap and heap[0][0] <= now and left:
            entry = heapq.heappop(heap)
            item = entry[2]
            if item is None:
                self._forgotten -= 1
                continue
            left -= 1
            entry[2] = None  # done: a forget() of it now changes nothing
            later = self._call_due(item)
            if later is not None:
                entry[0], entry[1], entry[2] = later, next(self._order), item
                heapq.heappush(heap, entry)  # the same entry: the item's handle stays valid
        while heap and heap[0][2] is None:  # the next timer for a live entry only
            heapq.heappop(heap)
            self._forgotten -= 1
        if heap:
            self._schedule(heap[0][0])


def cancel(call: Any) -> None:
    """Cancel a ``callLater`` call unless it is None, has run or was cancelled."""
    if call is not None and call.active():
        call.cancel()
