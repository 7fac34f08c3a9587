#!/usr/bin/env python3
"""Order across session moves in a cluster: how often a message comes after newer ones.

    .venv/bin/python bench/cluster_moves.py [--moves 6] [--apart 8] [--publisher-node c]

A Redis and three nodes (a, b, c) on loopback, started as the tests start them
(tests/cluster_helpers.py: heartbeats every 0.5 s). A paho client publishes numbered QoS 1
messages on the publisher's node as fast as it is let (``--every`` seconds between them at
least); subscriber s (a persistent session, MQTT 3.1.1) starts on node a and is taken over by
the other of a and b every ``--apart`` seconds (its old client stops reading, as one that lost
its network does, and the node closes it). Prints, for each move, the messages that came after
newer ones and how many newer ones came before each.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from cluster_helpers import Cluster  # noqa: E402
from paho_helpers import PahoClient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=6)
    parser.add_argument("--apart", type=float, default=8.0, help="seconds between moves")
    parser.add_argument("--every", type=float, default=0.0002, help="least seconds between messages")
    parser.add_argument("--publisher-node", choices=("a", "b", "c"), default="c")
    args = parser.parse_args()
    got: list[tuple[int, int]] = []  # (move, number), in the order they came
    cluster = Cluster("a", "b", "c")
    try:
        clients = [(0, PahoClient(cluster["a"].port, "s", clean=False))]
        clients[0][1].subscribe("t", 1)
        time.sleep(1.5)  # (every node routes t to a: a bench, not a test)
        publisher = PahoClient(cluster[args.publisher_node].port, "p")
        stop, sent = threading.Event(), [0]

        def publish() -> None:
            for number in range(1, 10_000_000):
                if stop.is_set():
                    return
                publisher.client.publish("t", str(number).encode(), 1)
                sent[0] = number
                time.sleep(args.every)
        thread = threading.Thread(target=publish)
        thread.start()
        for move in range(1, args.moves + 1):
            time.sleep(args.apart)
            clients[-1][1].client.loop_stop()  # (stops reading: taken over, not disconnected)
            clients.append((move, PahoClient(cluster["b" if move % 2 else "a"].port, "s", clean=False)))
        time.sleep(args.apart)
        stop.set()
        thread.join(30)
        time.sleep(5.0)  # (what is on its way arrives)
        for move, client in clients:
            while True:
                try:
                    got.append((move, int(client.messages.get_nowait().payload)))
                except queue.Empty:
                    break
        publisher.close()
    finally:
        cluster.close()
    seen: set[int] = set()
    late: dict[int, list[tuple[int, int]]] = {}
    highest = 0
    for move, number in got:
        if number in seen:
            continue  # (QoS 1: sent again, DUP)
        seen.add(number)
        if number < highest:
            late.setdefault(move, []).append((number, sum(1 for other in seen if other > number)))
        highest = max(highest, number)
    print(f"sent {sent[0]}, received {len(seen)}, missing {len(set(range(1, sent[0] + 1)) - seen)}, "
          f"received again {len(got) - len(seen)}")
    print(f"moves with a message after newer ones: {len(late)} of {args.moves}")
    for move, numbers in sorted(late.items()):
        print(f"  move {move}: {len(numbers)} messages, after up to {max(n for _, n in numbers)} newer ones")


if __name__ == "__main__":
    main()
