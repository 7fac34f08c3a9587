"""Interoperability with Mosquitto's own command-line clients, ``mosquitto_pub`` and ``mosquitto_sub``.

Every wait is bounded: ``mosquitto_sub`` runs with ``-d`` so its SUBACK tells when a subscription is
in place (no sleeping before publishing), ``-C N`` makes it exit after N messages and ``-W`` after
``WAIT`` seconds whatever happens. ``mosquitto_pub`` at QoS 1 or 2 exits only once the broker has
acknowledged, and the broker routes a PUBLISH before it acknowledges it, so messages published by
one ``mosquitto_pub`` after another reach a subscriber in that order. Absence is shown the same
way: a message that must not arrive is published before a marker that must, and the subscriber's
first message has to be the marker.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
from typing import Sequence

WAIT = 10
"""Seconds: ``-W`` of every mosquitto_sub, and the bound on every wait for a client process."""

FORMAT = "%r %q %t %p"
"""Default ``-F`` output: retain flag, QoS, topic, payload."""

def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:  # a missing tool is a broken test environment, not a reason to skip
        raise RuntimeError(f"{tool} is not installed (Debian: apt-get install mosquitto-clients)")
    return path


def connection_args(port: int, host: str = "127.0.0.1", version: str | None = None,
                    tls: Sequence[str] = ()) -> list[str]:
    args = ["-h", host, "-p", str(port), *tls]
    if version is not None:
        args += ["-V", version]
    return args


def mosquitto_pub(port: int, topic: str, message: str | None = None, *, qos: int = 0,
                  retain: bool = False, version: str | None = None, host: str = "127.0.0.1",
                  tls: Sequence[str] = (), extra: Sequence[str] = (),
                  check: bool = True) -> subprocess.CompletedProcess[str]:
    """Publish one message (``message=None`` sends an empty one, ``-n``); returns the finished
    process, whose stdout has the ``-d`` protocol trace."""
    args = [_require("mosquitto_pub"), "-d", *connection_args(port, host, version, tls),
            "-t", topic, "-q", str(qos), *extra]
    args += ["-n"] if message is None else ["-m", message]
    if retain:
        args.append("-r")
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=WAIT)
    if check:
        assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}"
    return result


class MosquittoSub:
    """``mosquitto_sub -d`` in the background, started and waited on until its SUBACK arrived.

    Message lines are printed as ``MSG <format>`` so they stand apart from the ``-d`` trace.
    ``stdbuf -oL`` makes mosquitto_sub's stdout line-buffered on a pipe: without it the trace
    would only come out when the process exits.
    """

    def __init__(self, port: int, *topics: str, count: int = 1, qos: int = 0, fmt: str = FORMAT,
                 version: str | None = None, host: str = "127.0.0.1", tls: Sequence[str] = (),
                 extra: Sequence[str] = ()) -> None:
        self.args = [_require("stdbuf"), "-oL", _require("mosquitto_sub"), "-d",
                     *connection_args(port, host, version, tls), "-q", str(qos), "-C", str(count),
                     "-W", str(WAIT), "-F", "MSG " + fmt, *extra]
        for topic in topics:
            self.args += ["-t", topic]
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.trace: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.granted = self._wait_for_suback()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def _next_line(self) -> str | None:
        try:
            line = self._lines.get(timeout=WAIT)
        except queue.Empty:
            self.process.kill()
            raise AssertionError(f"{' '.join(self.args)}: no output for {WAIT}s:\n" + "\n".join(self.trace)) from None
        if line is not None:
            self.trace.append(line)
        return line

    def _wait_for_suback(self) -> list[int]:
        """Read the trace up to ``Subscribed (mid: 1): 1, 2``; returns the granted QoS list."""
        while True:
            line = self._next_line()
            if line is None:
                self.process.wait(WAIT)
                raise AssertionError(f"{' '.join(self.args)} exited {self.process.returncode} before "
                                     "its SUBACK:\n" + "\n".join(self.trace))
            found = re.match(r"Subscribed \(mid: \d+\): (.*)$", line)
            if found:
                return [int(code) for code in found.group(1).split(",")]

    def messages(self) -> list[str]:
        """Wait (bounded by ``-W``) for the process to exit; returns its message lines in order."""
        while self._next_line() is not None:
            pass
        self.process.wait(WAIT)
        return [line[len("MSG "):] for line in self.trace if line.startswith("MSG ")]

    def finish(self) -> list[str]:
        """Like :meth:`messages`, and the process must have exited 0: it got all ``-C`` messages."""
        lines = self.messages()
        assert self.process.returncode == 0, (
            f"{' '.join(self.args)} exited {self.process.returncode} (27: -W timeout before -C "
            f"messages came):\n" + "\n".join(self.trace))
        return lines


def test_qos_round_trips(broker) -> None:  # type: ignore[no-untyped-def]
    for qos in (0, 1, 2):
        sub = MosquittoSub(broker.port, f"cli/qos/{qos}", qos=2)
        assert sub.granted == [2]
        pub = mosquitto_pub(broker.port, f"cli/qos/{qos}", f"payload {qos}", qos=qos)
        assert sub.finish() == [f"0 {qos} cli/qos/{qos} payload {qos}"]
        if qos == 1:
            assert "received PUBACK" in pub.stdout
        if qos == 2:  # the publisher saw the whole exchange; the subscriber printed after PUBREL
            assert "received PUBREC" in pub.stdout and "received PUBCOMP" in pub.stdout
            assert "received PUBREL" in "\n".join(sub.trace)


def test_delivered_at_the_lower_of_published_and_granted_qos(broker) -> None:  # type: ignore[no-untyped-def]
    sub = MosquittoSub(broker.port, "cli/down", qos=1, count=2)
    mosquitto_pub(broker.port, "cli/down", "two", qos=2)
    mosquitto_pub(broker.port, "cli/down", "zero", qos=0)
    assert sub.finish() == ["0 1 cli/down two", "0 0 cli/down zero"]


def test_retained_message_reaches_later_subscribers_until_an_empty_retained_publish(
        broker) -> None:  # type: ignore[no-untyped-def]
    fmt = "%r %q %t %l:%p"
    mosquitto_pub(broker.port, "cli/ret/a", "kept", qos=1, retain=True)

    later = MosquittoSub(broker.port, "cli/ret/#", qos=1, fmt=fmt)
    assert later.finish() == ["1 1 cli/ret/a 4:kept"]

    # A subscriber that is already there gets retained publishes with RETAIN 0 [MQTT-3.3.1-9],
    # the empty one included [MQTT-3.3.1-10].
    live = MosquittoSub(broker.port, "cli/ret/#", qos=1, count=3, fmt=fmt)
    mosquitto_pub(broker.port, "cli/ret/b", "second", qos=1, retain=True)
    mosquitto_pub(broker.port, "cli/ret/a", None, qos=1, retain=True)  # -r -n: delete cli/ret/a
    assert live.finish() == ["1 1 cli/ret/a 4:kept", "0 1 cli/ret/b 6:second", "0 1 cli/ret/a 0:"]

    after = MosquittoSub(broker.port, "cli/ret/#", "cli/marker", qos=1, count=2, fmt=fmt)
    mosquitto_pub(broker.port, "cli/marker", "end", qos=1)
    assert after.finish() == ["1 1 cli/ret/b 6:second", "0 1 cli/marker 3:end"]


def test_retained_message_replaced_by_a_newer_one(broker) -> None:  # type: ignore[no-untyped-def]
    mosquitto_pub(broker.port, "cli/replace", "old", qos=1, retain=True)
    mosquitto_pub(broker.port, "cli/replace", "new", qos=0, retain=True)
    assert MosquittoSub(broker.port, "cli/replace", qos=1).finish() == ["1 0 cli/replace new"]


def test_wildcards(broker) -> None:  # type: ignore[no-untyped-def]
    sub = MosquittoSub(broker.port, "cli/w/+/temp", "cli/w/x/#", "cli/w/end", qos=1, count=5)
    for topic, matches in [
        ("cli/w/a/temp", True),
        ("cli/w/a/b/temp", False),   # + is exactly one level
        ("cli/w/temp", False),
        ("cli/w//temp", True),       # an empty level is a level
        ("cli/w/x", True),           # x/# matches x itself [MQTT-4.7.1-2]
        ("cli/w/x/y/z", True),
        ("cli/w/xy", False),
        ("cli/W/a/temp", False),     # topics are case-sensitive
    ]:
        mosquitto_pub(broker.port, topic, "match" if matches else "no match", qos=1)
    mosquitto_pub(broker.port, "cli/w/end", "end", qos=1)
    assert sub.finish() == ["0 1 cli/w/a/temp match", "0 1 cli/w//temp match", "0 1 cli/w/x match",
                            "0 1 cli/w/x/y/z match", "0 1 cli/w/end end"]


def test_overlapping_subscriptions_deliver_one_copy(broker) -> None:  # type: ignore[no-untyped-def]
    sub = MosquittoSub(broker.port, "cli/o/#", "cli/o/+", qos=1, count=2)
    assert sub.granted == [1, 1]
    mosquitto_pub(broker.port, "cli/o/a", "once", qos=1)
    mosquitto_pub(broker.port, "cli/o/end", "end", qos=1)
    assert sub.finish() == ["0 1 cli/o/a once", "0 1 cli/o/end end"]


def test_dollar_topics_are_not_matched_by_leading_wildcards(broker) -> None:  # type: ignore[no-untyped-def]
    # [MQTT-4.7.2-1]: a filter starting with # or + does not match a topic starting with $.
    # ($SYS itself is the broker's: clients may not publish there.)
    explicit = MosquittoSub(broker.port, "$app/#", "$internal/+", qos=1, count=2)
    wild = MosquittoSub(broker.port, "#", "+/status", qos=1, count=1)
    mosquitto_pub(broker.port, "$app/broker/test", "sys", qos=1)
    mosquitto_pub(broker.port, "$internal/status", "internal", qos=1)
    mosquitto_pub(broker.port, "cli/sys/end", "end", qos=1)
    assert wild.finish() == ["0 1 cli/sys/end end"]
    assert explicit.finish() == ["0 1 $app/broker/test sys", "0 1 $internal/status internal"]


def test_retained_dollar_topics_are_not_matched_by_leading_wildcards(broker) -> None:  # type: ignore[no-untyped-def]
    mosquitto_pub(broker.port, "$app/retained", "sys", qos=1, retain=True)
    mosquitto_pub(broker.port, "plain/retained", "plain", qos=1, retain=True)
    # Retained messages are matched by their own code path, so check it apart from routing. One
    # filter per subscriber: each new subscription gets its own copy [MQTT-3.3.1-6].
    hash_sub = MosquittoSub(broker.port, "#", qos=1, count=2)
    plus_sub = MosquittoSub(broker.port, "+/retained", qos=1, count=2)
    mosquitto_pub(broker.port, "end/retained", "end", qos=1)
    for sub in (hash_sub, plus_sub):
        assert sub.finish() == ["1 1 plain/retained plain", "0 1 end/retained end"], sub.args
    assert MosquittoSub(broker.port, "$app/+", qos=1).finish() == ["1 1 $app/retained sys"]


def test_mqtt5_round_trip_with_properties(broker) -> None:  # type: ignore[no-untyped-def]
    sub = MosquittoSub(broker.port, "cli/v5", qos=1, version="mqttv5",
                       fmt="%q %t %p|%C|%R|%D|%F|%P")
    assert sub.granted == [1]
    pub = mosquitto_pub(broker.port, "cli/v5", "five", qos=1, version="5", extra=[
        "-D", "publish", "content-type", "text/plain",
        "-D", "publish", "response-topic", "cli/v5/reply",
        "-D", "publish", "correlation-data", "corr-1",
        "-D", "publish", "payload-format-indicator", "1",
        "-D", "publish", "user-property", "origin", "cli-test",
    ])
    assert "received PUBACK" in pub.stdout
    assert sub.finish() == ["1 cli/v5 five|text/plain|cli/v5/reply|corr-1|1|origin:cli-test"]


def test_mqtt5_message_expiry_interval_is_forwarded(broker) -> None:  # type: ignore[no-untyped-def]
    sub = MosquittoSub(broker.port, "cli/v5/expiry", qos=1, version="mqttv5", fmt="%t %E")
    mosquitto_pub(broker.port, "cli/v5/expiry", "soon", qos=1, version="mqttv5",
                  extra=["-D", "publish", "message-expiry-interval", "120"])
    [line] = sub.finish()
    topic, expiry = line.split(" ")
    # [MQTT-3.3.2-6]: forwarded as the received value less the time it waited in the broker.
    assert topic == "cli/v5/expiry" and 110 <= int(expiry) <= 120


def test_mqtt31_round_trip(broker) -> None:  # type: ignore[no-untyped-def]
    sub = MosquittoSub(broker.port, "cli/v31/#", qos=2, count=3, version="mqttv31")
    assert sub.granted == [2]
    for qos in (0, 1, 2):
        mosquitto_pub(broker.port, f"cli/v31/{qos}", f"old {qos}", qos=qos, version="mqttv31")
    assert sub.finish() == ["0 0 cli/v31/0 old 0", "0 1 cli/v31/1 old 1", "0 2 cli/v31/2 old 2"]


def test_mqtt31_retained_message(broker) -> None:  # type: ignore[no-untyped-def]
    mosquitto_pub(broker.port, "cli/v31/ret", "kept", qos=1, retain=True, version="mqttv31")
    assert MosquittoSub(broker.port, "cli/v31/ret", qos=1, version="mqttv31").finish() == [
        "1 1 cli/v31/ret kept"]


def test_every_protocol_version_reaches_every_other(broker) -> None:  # type: ignore[no-untyped-def]
    versions = ("mqttv31", "mqttv311", "mqttv5")
    subs = {version: MosquittoSub(broker.port, "cli/mix/#", qos=1, count=len(versions), version=version)
            for version in versions}
    for version in versions:
        mosquitto_pub(broker.port, f"cli/mix/{version}", f"from {version}", qos=1, version=version)
    expected = [f"0 1 cli/mix/{version} from {version}" for version in versions]
    for version, sub in subs.items():
        assert sub.finish() == expected, version
