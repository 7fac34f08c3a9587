"""Clusters for end-to-end tests: one real redis-server and broker processes that are its nodes,
each on its own loopback port, started, stopped and killed by the tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from conftest import BrokerProcess
from redis_helpers import RedisServer

HEARTBEAT = "0.5"
"""Seconds between heartbeats in the tests: a node is taken for dead after three missed ones (1.5 s: a node of a busy test machine may stall for a moment, and a node taken for dead while alive loses its clients to fencing)."""


def wait_until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """A bounded poll: raise AssertionError naming ``what`` if it does not hold in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def holds_within(condition: Callable[[], object], timeout: float) -> bool:
    """Whether ``condition`` comes to hold within ``timeout`` seconds."""
    try:
        wait_until(condition, "", timeout)
    except AssertionError:
        return False
    return True


def reachable(publisher: Any, subscribers: list[Any], topic: str) -> None:
    """Wait until a message ``publisher`` (a PahoClient) publishes on ``topic`` reaches every one of
    ``subscribers``: a node learns the others' filters from the control channel, a moment after
    their SUBACKs. QoS 1 probes, one at a time, until each has one; then a last one, and
    everything up to it is dropped, so that no probe is left on its way (order per publisher and
    QoS is kept)."""
    waiting = list(subscribers)
    for _ in range(150):
        publisher.publish(topic, b"probe", qos=1)
        waiting = [s for s in waiting if s.no_message(0.1)]
        if not waiting:
            break
    assert not waiting, f"{topic}: the probes never reached {len(waiting)} of the subscribers"
    publisher.publish(topic, b"last probe", qos=1)
    for subscriber in subscribers:
        for _ in range(1000):
            if subscriber.message().payload == b"last probe":
                break


class Node(BrokerProcess):
    """A broker process that is a node of the cluster on ``redis``; started when it has joined."""

    def __init__(self, redis: RedisServer, node_id: str, *args: str, port: int | None = None,
                 data_dir: Path | None = None) -> None:
        self.node_id = node_id
        super().__init__("--cluster", redis.url, "--cluster-node-id", node_id, "--cluster-heartbeat", HEARTBEAT,
                         *args, port=port, data_dir=data_dir)
        wait_until(lambda: "joined through Redis" in self.output(), f"node {node_id} to join the cluster")

    def kill(self) -> None:
        """SIGKILL: the node vanishes without a word to the others."""
        self.process.kill()
        self.process.wait(10)


class Cluster:
    """``Cluster(tmp_path, "a", "b", "c")``: a Redis and nodes by id (``cluster["a"].port``)."""

    def __init__(self, *node_ids: str, args: tuple[str, ...] = ()) -> None:
        self.redis = RedisServer()
        self.args = args
        self.nodes: dict[str, Node] = {}
        try:
            for node_id in node_ids:
                self.add(node_id)
        except BaseException:
            self.close()
            raise

    def add(self, node_id: str, *args: str) -> Node:
        node = self.nodes[node_id] = Node(self.redis, node_id, *self.args, *args)
        return node

    def __getitem__(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def routes(self, node_id: str) -> set[str]:
        """The filters Redis says a node holds."""
        return {f.decode() for f in self.redis.client().hkeys(f"mqtt:routes:{node_id}")}

    def inbox_length(self, node_id: str) -> int:
        return int(self.redis.client().xlen(f"mqtt:inbox:{node_id}"))

    def members(self) -> set[str]:
        return {m.decode() for m in self.redis.client().smembers("mqtt:nodes")}

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.redis.close()
