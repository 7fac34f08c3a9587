"""MQTT over WebSocket in a twisted.web site: one port serves web pages and the broker.

    python examples/websocket_site.py [HTTP_PORT [MQTT_PORT [STATIC_DIR]]]

A browser loads http://localhost:8080/ (the files of STATIC_DIR, by default the current
directory) and its MQTT.js connects to ws://localhost:8080/mqtt; MQTT clients over TCP use
MQTT_PORT (1883). Both kinds meet on the same broker.
"""

from __future__ import annotations

import sys

from twisted.internet import endpoints, reactor
from twisted.web.server import Site
from twisted.web.static import File

from mqtt_broker import BrokerService
from mqtt_broker.websocket import WebSocketResource


def main(http_port: int = 8080, mqtt_port: int = 1883, static: str = ".") -> None:
    broker = BrokerService(endpoints=[f"tcp:{mqtt_port}:interface=127.0.0.1"])
    broker.startService()
    reactor.addSystemEventTrigger("before", "shutdown", broker.stopService)

    root = File(static)
    root.putChild(b"mqtt", WebSocketResource(broker))  # ws://.../mqtt; everything else: files
    site = endpoints.serverFromString(reactor, f"tcp:{http_port}:interface=127.0.0.1")
    site.listen(Site(root)).addCallback(lambda _: print(f"http and ws on {http_port}", flush=True))
    reactor.run()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 8080, int(args[1]) if len(args) > 1 else 1883,
         args[2] if len(args) > 2 else ".")
