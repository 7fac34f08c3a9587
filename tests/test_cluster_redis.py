"""How a node reaches Redis: a password, TLS with the server's certificate checked, and the master
a Sentinel names. Real redis-server (and Sentinel) processes, two nodes each, a message between
them; and the refusals when the password or the certificate is wrong."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from cluster_helpers import HEARTBEAT, wait_until
from conftest import ROOT, BrokerProcess, free_port, wait_for_port
from paho_helpers import PahoClient
from redis_helpers import redis_server

from mqtt_broker.cluster.address import RedisAddress
from mqtt_broker.cluster.redis import RECONNECT_MAX_DELAY, SENTINEL_DISCOVERY_TIMEOUT, Redis


class Server:
    """redis-server (or ``--sentinel``) with the given options, in a directory of its own."""

    def __init__(self, *options: str, sentinel_conf: str | None = None, tls: bool = False) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="mqttbroker-redis-"))
        server = redis_server()
        assert server is not None
        if sentinel_conf is not None:
            conf = self.directory / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\n{sentinel_conf}")
            command = [server, str(conf), "--sentinel"]
        else:
            command = [server, "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                       "--appendonly", "no", *options]
            command += ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        self.log = open(self.directory / "server.log", "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def node(url: str, node_id: str, *args: str) -> BrokerProcess:
    return BrokerProcess("--cluster", url, "--cluster-node-id", node_id, "--cluster-heartbeat", HEARTBEAT, *args)


def joined(broker: BrokerProcess) -> bool:
    return "joined through Redis" in broker.output()


def across(a: BrokerProcess, b: BrokerProcess) -> None:
    """A QoS 1 message from a client of ``a`` reaches a client of ``b``."""
    wait_until(lambda: joined(a) and joined(b), "both nodes to join")
    subscriber = PahoClient(b.port, "across-sub")
    publisher = PahoClient(a.port, "across-pub")
    try:
        subscriber.subscribe("across/#", 1)
        for _ in range(100):  # the route reaches a by the control channel
            publisher.publish("across/x", b"over", qos=1)
            if not subscriber.no_message(0.1):
                return
        raise AssertionError("nothing crossed between the nodes")
    finally:
        subscriber.close()
        publisher.close()


@pytest.fixture
def stop_after() -> Iterator[list[object]]:
    started: list[object] = []
    yield started
    for thing in reversed(started):
        thing.stop() if isinstance(thing, BrokerProcess) else thing.close()  # type: ignore[attr-defined]


def test_a_password_in_the_url(stop_after: list[object]) -> None:
    redis = Server("--requirepass", "s3cret")
    stop_after.append(redis)
    a = node(f"redis://:s3cret@127.0.0.1:{redis.port}/2", "pw-a")
    b = node(f"redis://:s3cret@127.0.0.1:{redis.port}/2", "pw-b")
    stop_after += [a, b]
    across(a, b)
    wrong = node(f"redis://:wrong@127.0.0.1:{redis.port}/2", "pw-wrong")
    stop_after.append(wrong)
    wait_until(lambda: "has not reached Redis" in wrong.output(), "the warning that it cannot reach Redis",
               timeout=20)
    assert not joined(wrong)


def test_tls_with_the_server_certificate_checked(stop_after: list[object], tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "certs" / "make-certs.sh"), str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    redis = Server("--tls-cert-file", str(tmp_path / "server.pem"), "--tls-key-file", str(tmp_path / "server.key"),
                   "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no", tls=True)
    stop_after.append(redis)
    url = f"rediss://localhost:{redis.port}/0"
    a = node(url, "tls-a", "--cluster-tls-ca-file", str(tmp_path / "ca.pem"))
    b = node(url, "tls-b", "--cluster-tls-ca-file", str(tmp_path / "ca.pem"))
    stop_after += [a, b]
    across(a, b)
    untrusted = node(url, "tls-untrusted")  # the platform's CAs do not know this one
    stop_after.append(untrusted)
    wait_until(lambda: "has not reached Redis" in untrusted.output(), "the warning that it cannot reach Redis",
               timeout=20)
    assert not joined(untrusted)


def test_the_master_a_sentinel_names(stop_after: list[object]) -> None:
    redis = Server()
    stop_after.append(redis)
    sentinel = Server(sentinel_conf=f"sentinel monitor mymaster 127.0.0.1 {redis.port} 1\n"
                                    "sentinel down-after-milliseconds mymaster 5000\n")
    stop_after.append(sentinel)
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
    a = node(url, "sentinel-a")
    b = node(url, "sentinel-b")
    stop_after += [a, b]
    across(a, b)


@pytest_twisted.inlineCallbacks
def test_the_sentinels_are_asked_again_within_the_back_off() -> Iterator[Deferred[Any]]:
    """txredisapi waits up to 10 s for a Sentinel to name a master that is up: a node that asked
    while the old master was down stayed off Redis that long after the Sentinels had named the
    new one (11.4 s measured after a master was killed, against three Sentinels). A round of
    asking is bounded by less than the reconnection back-off."""
    link = Redis(RedisAddress.parse(f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/mymaster/0"))
    try:
        assert link._sentinel.discovery_timeout == SENTINEL_DISCOVERY_TIMEOUT < RECONNECT_MAX_DELAY
        # The connections to the Sentinels themselves: txredisapi's back off up to 10 s.
        assert [handler._factory.maxDelay for handler in link._sentinel.sentinels] == [RECONNECT_MAX_DELAY] * 2
    finally:
        yield link.close()


def test_a_master_turned_replica_is_left_for_the_one_the_sentinels_name(stop_after: list[object]) -> None:
    """A switchover that leaves the old master's clients connected: every write is refused
    READONLY. The node retried its batches there for ever (logging each second that writing
    worked again); it leaves the connection and asks the Sentinels, as redis-py's client does."""
    import redis

    master = Server()
    replica = Server("--replicaof", "127.0.0.1", str(master.port))
    stop_after += [master, replica]
    wait_until(lambda: redis.Redis(port=replica.port).info("replication")["master_link_status"] == "up",
               "the replica to sync")
    sentinel = Server(sentinel_conf=f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
                                    "sentinel down-after-milliseconds mymaster 5000\n")
    stop_after.append(sentinel)
    a = node(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0", "readonly-a")
    stop_after.append(a)
    wait_until(lambda: joined(a), "the node to join")
    publisher = PahoClient(a.port, "readonly-pub")
    try:
        publisher.publish("t/x", b"before", qos=1)  # (acknowledged once stored)
        redis.Redis(port=replica.port).execute_command("REPLICAOF", "NO", "ONE")
        redis.Redis(port=master.port).execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
        told = redis.Redis(port=sentinel.port)
        told.execute_command("SENTINEL", "REMOVE", "mymaster")
        told.execute_command("SENTINEL", "MONITOR", "mymaster", "127.0.0.1", str(replica.port), "1")
        publisher.publish("t/x", b"after", qos=1)  # (PahoClient waits, bounded, for its PUBACK)
    finally:
        publisher.close()
