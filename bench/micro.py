#!/usr/bin/env python3
"""Micro-benchmarks of the hot paths, in-process: a regression shows here before the end-to-end run.

    .venv/bin/python bench/micro.py [--quick] [--installed]

One line per case: its name and µs per operation (a frame, a message, a match), the best of 5
repeats. Measures this checkout's code, or with --installed the mqtt_broker the interpreter has
installed (the compiled build, say); the first line says which build ran. --quick runs a
hundredth of the iterations (for the tests: the figures are then rough).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import timeit
from functools import partial
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = "--installed" in sys.argv  # looked at before argparse: it decides what is imported
sys.path[:0] = [str(ROOT / "tests")] if INSTALLED else [str(ROOT), str(ROOT / "tests")]

import mqtt_broker  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from mqtt_broker.store import fire  # noqa: E402
from mqtt_broker.store.memory import MemoryStore  # noqa: E402
from mqtt_broker.topics import Subscription, SubscriptionTree  # noqa: E402
from mqtt_broker.wire import (  # noqa: E402
    MQTT_3_1_1, MQTT_5, NO_PROPERTIES, FrameReader, Publish, encode, publish_template,
)
from protocol_helpers import connected, make_broker  # noqa: E402

REPEATS = 5
TOPIC = "building/7/floor/3/room/12"
PAYLOAD = bytes(64)  # mqttbench's default payload size
FRAMES = 1000  # PUBLISHes per read, in the decoding and the broker cases
VERSIONS = {"v311": MQTT_3_1_1, "v5": MQTT_5}

Case = tuple[str, Callable[[], object], int, int]
"""(name, one call, calls per repeat, operations per call)."""


def codec_cases(scale: float) -> list[Case]:
    decoding: list[Case] = []
    encoding: list[Case] = []
    templates: list[Case] = []
    for label, version in VERSIONS.items():
        for qos in (0, 1):
            publishes = [Publish(topic=TOPIC, payload=PAYLOAD, qos=qos, packet_id=qos and i + 1)
                         for i in range(FRAMES)]
            stream = b"".join(encode(p, version) for p in publishes)
            reader = FrameReader(version=version)

            def decode(reader: FrameReader = reader, stream: bytes = stream) -> None:
                reader.receive_data(stream)
                while reader.next_packet() is not None:
                    pass

            calls = max(1, int(200_000 * scale))
            decoding.append((f"decode-qos{qos}-{label}", decode, max(1, int(100 * scale)), FRAMES))
            encoding.append((f"encode-qos{qos}-{label}", partial(encode, publishes[0], version),
                             calls, 1))
            templates.append((f"template-qos{qos}-{label}", partial(
                publish_template, TOPIC, PAYLOAD, qos, False, NO_PROPERTIES, version, qos), calls, 1))
    return decoding + encoding + templates


def subscription_tree(filters: int = 10_000) -> SubscriptionTree:
    """``filters`` distinct filters over building/B/floor/F/room/R (100 of each): a quarter
    exact, a quarter with ``+`` for the floor, a quarter with ``+`` for the building, a quarter
    ending in ``#``, held by 100 clients. A random room matches about one in four of each
    wildcard kind."""
    rng = random.Random(1)
    shapes = ["building/{b}/floor/{f}/room/{r}", "building/{b}/floor/+/room/{r}",
              "building/+/floor/{f}/room/{r}", "building/{b}/floor/{f}/#"]
    tree = SubscriptionTree()
    for shape in shapes:
        chosen: set[str] = set()
        while len(chosen) < filters // len(shapes):
            chosen.add(shape.format(b=rng.randrange(100), f=rng.randrange(100), r=rng.randrange(100)))
        for i, topic_filter in enumerate(sorted(chosen)):
            tree.add(Subscription(client_id=f"client-{i % 100}", topic_filter=topic_filter))
    return tree


def topic_cases(scale: float) -> list[Case]:
    tree = subscription_tree()
    tree.match(TOPIC)  # now cached
    per_call = 1000
    calls = max(1, int(20 * scale))
    # Every uncached match must miss the cache: each call gets rooms never matched before.
    rooms = random.Random(2).sample(range(1_000_000), per_call * calls * REPEATS)
    batches = iter([[f"building/{n // 10_000}/floor/{n // 100 % 100}/room/{n % 100}"
                     for n in rooms[i:i + per_call]] for i in range(0, len(rooms), per_call)])

    def uncached() -> None:
        match = tree.match
        for topic in next(batches):
            match(topic)

    return [("match-cached", lambda: tree.match(TOPIC), max(1, int(1_000_000 * scale)), 1),
            ("match-uncached-10k", uncached, calls, per_call)]


class BatchStore(MemoryStore):
    """A store that writes in batches, as the SQLite and Redis stores do: ``flushed()`` waits for
    ``cut()``, which the case calls after each read (the batch's own writing is not measured)."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0
        self._waiters: list[Deferred[None]] = []

    def flushed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def cut(self) -> None:
        self.generation += 1
        waiters, self._waiters = self._waiters, []
        self.gather(fire, waiters)


def broker_case(qos: int, messages: int, stored: bool = False) -> Case:
    """One publisher and one subscriber on a broker in memory; the publisher's PUBLISHes are fed
    to its protocol in reads of FRAMES, as Twisted would, and nothing is written anywhere. With
    ``stored``, the PUBLISHes are acknowledged once a store has written the batch of their read
    (the subscriber takes them at QoS 0, so that only the acknowledgements wait for it)."""
    # The in-flight window is cleared after each read, so it must hold a whole read: otherwise
    # the queue, not the direct path, would be measured.
    store = BatchStore() if stored else None
    broker = make_broker(max_inflight_messages=FRAMES, store=store)
    subscriber = connected(broker, "sub")
    subscriber.subscribe(TOPIC, qos=0 if stored else qos)
    publisher = connected(broker, "pub")
    for client in (subscriber, publisher):
        client.transport.write = lambda data: None  # type: ignore[method-assign]
    read = b"".join(encode(Publish(topic=TOPIC, payload=PAYLOAD, qos=qos, packet_id=qos and i + 1))
                    for i in range(FRAMES))
    outgoing = broker.sessions["sub"].outgoing
    assert publisher.protocol is not None
    feed = publisher.protocol.dataReceived

    def run() -> None:
        for _ in range(messages // FRAMES):
            feed(read)
            if store is not None:
                store.cut()
            outgoing.clear()  # as if the subscriber had acknowledged every message

    return (f"broker-qos{qos}{'-stored' if stored else ''}", run, 1, messages // FRAMES * FRAMES)


def measure(function: Callable[[], object], calls: int, operations: int, collect: bool) -> float:
    """Best µs per operation over REPEATS runs of ``calls`` calls."""
    # timeit turns the garbage collector off; the broker cases turn it back on, since a broker
    # runs with it and its passes are part of what a message costs.
    setup = gc.enable if collect else "pass"
    times = timeit.Timer(function, setup=setup).repeat(REPEATS, calls)
    return min(times) / (calls * operations) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a hundredth of the iterations")
    parser.add_argument("--installed", action="store_true", help="the installed mqtt_broker, not this checkout's")
    args = parser.parse_args(argv)
    scale = 0.01 if args.quick else 1.0
    build = "compiled" if mqtt_broker.compiled else "pure Python"
    print(f"µs per operation, best of {REPEATS}{' (--quick: rough)' if args.quick else ''}; "
          f"mqtt_broker {mqtt_broker.__version__} ({build}) from {Path(mqtt_broker.__file__).parent}", flush=True)
    cases = codec_cases(scale) + topic_cases(scale)
    for name, function, calls, operations in cases:
        print(f"{name:<22}{measure(function, calls, operations, False):>10.3f}", flush=True)
    for qos, stored in ((0, False), (1, False), (1, True)):
        name, function, calls, operations = broker_case(qos, max(FRAMES, int(200_000 * scale)), stored)
        print(f"{name:<22}{measure(function, calls, operations, True):>10.3f}", flush=True)


if __name__ == "__main__":
    main()
