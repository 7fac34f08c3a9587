#!/usr/bin/env python3
"""The least a Twisted TCP server can do in mqttbench's connections scenario: answer the first
read of each connection with a CONNACK, close on DISCONNECT, nothing else (no parsing, no
session, no timers). What the broker spends per connection above this is the broker's; what
this spends is Twisted's accept path and transport, and the kernel's.

    mqttbench compare --scenario connections --broker "floor=python bench/twisted_floor.py {port}" ...

It runs with the collector settings of a twistd broker (``mqtt_broker.tap.tune_gc``).
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from mqtt_broker.tap import tune_gc  # noqa: E402

CONNACK = b"\x20\x02\x00\x00"
DISCONNECT = 0xE0


class Floor(Protocol):
    answered = False

    def dataReceived(self, data: bytes) -> None:
        if data[0] == DISCONNECT:
            self.transport.loseConnection()
        elif not self.answered:
            self.answered = True
            self.transport.write(CONNACK)


def main() -> None:
    tune_gc()
    reactor.listenTCP(int(sys.argv[1]), Factory.forProtocol(Floor), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
