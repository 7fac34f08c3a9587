"""A known workload on an in-memory broker (task.Clock), with every byte and packet counted on
the client side, so that $SYS and /metrics can be checked against exact numbers; and a
connection to an admin site on a StringTransport."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol_helpers import FakeClient, make_broker
from twisted.internet.testing import StringTransport

from mqtt_broker import BrokerService
from mqtt_broker.wire import Disconnect, Puback, Pubcomp, Publish, Pubrec, Pubrel


def site_connection(site: Any) -> tuple[Any, StringTransport]:
    """A connection (HTTPChannel) to ``site`` on a StringTransport: what the site answers is
    the transport's ``value()``."""
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


class CountingClient(FakeClient):
    """A FakeClient that counts what it sends and what the broker writes to it."""

    def __init__(self, broker: BrokerService, tally: Tally, version: int = 4) -> None:
        super().__init__(broker, version)
        self.tally = tally
        write = self.transport.write

        def counting_write(data: bytes) -> None:
            tally.bytes_to_clients += len(data)
            write(data)
        self.transport.write = counting_write  # type: ignore[method-assign]

    def send(self, *packets: Any) -> None:
        self.tally.packets_from_clients += len(packets)
        super().send(*packets)

    def send_bytes(self, data: bytes) -> None:
        self.tally.bytes_from_clients += len(data)
        super().send_bytes(data)

    def received(self) -> list[Any]:
        packets = super().received()
        self.tally.packets_to_clients += len(packets)
        return packets


@dataclass
class Tally:
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    packets_from_clients: int = 0
    packets_to_clients: int = 0
    clients: list[CountingClient] = field(default_factory=list)

    def client(self, broker: BrokerService, client_id: str, version: int = 4, **kwargs: Any) -> CountingClient:
        client = CountingClient(broker, self, version)
        connack = client.connect(client_id, **kwargs)
        assert connack.reason_code == 0, connack  # type: ignore[union-attr]
        self.clients.append(client)
        return client


N_PUBLISHERS = 4
M_MESSAGES = 25   # per publisher: 10 at QoS 0, 10 at QoS 1, 5 at QoS 2
QOS_MIX = [0] * 10 + [1] * 10 + [2] * 5


def workload(broker: BrokerService | None = None, **settings: Any) -> tuple[BrokerService, Tally, dict[str, Any]]:
    """N_PUBLISHERS clients publish M_MESSAGES each to one subscriber (QoS 2 subscription); one
    persistent client subscribes and goes away; one retained message. Returns the broker (started),
    the client-side tally, and what the workload did."""
    broker = broker or make_broker(**settings)
    broker.startService()
    tally = Tally()
    sub = tally.client(broker, "subscriber", version=5)
    sub.subscribe("work/#", qos=2)
    away = tally.client(broker, "away", clean=False)
    away.subscribe("elsewhere/+", qos=1)
    away.send(Disconnect())
    away.received()
    away.lose()
    publishers = [tally.client(broker, f"pub{n}") for n in range(N_PUBLISHERS)]
    packet_id = 0
    for publisher in publishers:
        for index, qos in enumerate(QOS_MIX):
            packet_id += 1
            answers = publisher.publish(f"work/{publisher.protocol.client.client_id}/{index}", b"m" * 10,  # type: ignore[union-attr]
                                        qos=qos, packet_id=packet_id if qos else 0,
                                        retain=(index == 0 and publisher is publishers[0]))
            for answer in answers:
                if isinstance(answer, Pubrec):
                    publisher.send(Pubrel(packet_id=answer.packet_id))
    # Everyone acknowledges until nothing is left in flight (bounded: the queue drains in windows).
    for _ in range(50):
        packets = sub.received()
        if not packets:
            break
        for p in packets:
            if isinstance(p, Publish) and p.qos == 1:
                sub.send(Puback(packet_id=p.packet_id))
            elif isinstance(p, Publish) and p.qos == 2:
                sub.send(Pubrec(packet_id=p.packet_id))
            elif isinstance(p, Pubrel):
                sub.send(Pubcomp(packet_id=p.packet_id))
        for publisher in publishers:
            for p in publisher.received():
                if isinstance(p, Pubrec):
                    publisher.send(Pubrel(packet_id=p.packet_id))
    for client in tally.clients:
        client.received()
    done = {"published": N_PUBLISHERS * M_MESSAGES, "qos": [N_PUBLISHERS * QOS_MIX.count(q) for q in (0, 1, 2)],
            "connected": N_PUBLISHERS + 1, "disconnected": 1, "subscriptions": 2, "retained": 1}
    return broker, tally, done


__all__ = ["CountingClient", "Tally", "workload", "N_PUBLISHERS", "M_MESSAGES"]
