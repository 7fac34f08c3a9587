"""Leases: what one node of a cluster runs at a time (a bridge), whichever node that is.

A lease is a key in Redis holding the node's id, with the TTL of a heartbeat key: the node that
finds it free takes it, and renews it at each heartbeat; another node takes it once it is given
up (the holder stops) or expires (the holder died, or lost Redis). The holder counts its lease
from when it asked for it, so it lets go (its TTL run out, no renewal answered) before Redis
frees it for another node.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime

from .store import RedisStore


class Leases:
    """The leases this node asks for, and those it holds."""

    def __init__(self, store: RedisStore, clock: IReactorTime, ttl_ms: int) -> None:
        self._store = store
        self._clock = clock
        self._ttl_ms = ttl_ms
        self._wanted: dict[str, Callable[[bool], None]] = {}
        self._held: dict[str, Any] = {}
        """The leases held, each with the timer that lets it go unless a renewal comes first."""

    def want(self, name: str, changed: Callable[[bool], None]) -> None:
        """Hold the lease ``name`` whenever it is free, from the next heartbeat on: ``changed``
        is called with True once this node holds it, with False once it holds it no more."""
        self._wanted[name] = changed

    def guard_retained(self, name: str, topic: str) -> None:
        """The retained message of ``topic`` is written by the holder of the lease ``name``:
        this node's changes of it are applied only while it holds the lease or no node does. A
        node cut off from Redis whose lease ran out writes what it published then (a bridge's
        "0") once back, over what the next holder published meanwhile."""
        self._store.guard_retained(topic, name)

    def renew(self) -> Deferred[Any]:
        """Take the free leases asked for and renew those held (a heartbeat); fires once Redis
        answered."""
        asked = self._clock.seconds()
        return DeferredList([self._store.lease(name, self._ttl_ms).addCallbacks(
            self._answered, lambda _: None, (name, asked)) for name in list(self._wanted)])

    def _answered(self, held: bool, name: str, asked: float) -> None:
        if name not in self._wanted:  # (given up meanwhile)
            return
        if not held:
            self._lost(name)
            return
        left = asked + self._ttl_ms / 1000 - self._clock.seconds()
        if left <= 0:  # (answered too late: Redis may have freed it for another node since)
            return
        timer = self._held.get(name)
        if timer is not None:
            timer.reset(left)
        else:
            self._held[name] = self._clock.callLater(left, self._lost, name)
            self._wanted[name](True)

    def _lost(self, name: str) -> None:
        timer = self._held.pop(name, None)
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        self._wanted[name](False)

    def give_up(self) -> Deferred[Any]:
        """Let go of every lease (the node leaves): what holds one stops here, and Redis frees it
        for the others at once, not a TTL later."""
        for name in list(self._held):
            self._lost(name)
        names, self._wanted = list(self._wanted), {}
        return DeferredList([self._store.give_lease(name) for name in names], consumeErrors=True)


__all__ = ["Leases"]
