"""Event hooks: deciders, filters and notifications, run in order through maybeDeferred; and what
clients see of them in a running broker."""

from __future__ import annotations

import dataclasses
import enum
import gc
import math
import os
import subprocess
import sys
import weakref
from typing import Any, Iterator, Sequence

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure

from mqtt_broker import hooks as hooks_module
from mqtt_broker.hooks import EVENTS, Hooks, Refused
from mqtt_broker.message import Client, Message
from mqtt_broker.connecting import TAKEOVER_WAIT
from mqtt_broker.protocol import READ_WHILE_DECIDING
from mqtt_broker.testing import MemoryBroker
from mqtt_broker.topics import Subscription
from mqtt_broker.wire import (
    MQTT_3_1_1, MQTT_5, Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Publish, Suback, Subscribe, SubscriptionRequest, Will,
    encode,
)
from mqtt_broker.wire.codes import ReasonCode
from protocol_helpers import FakeClient, connected, make_broker

CLIENT = Client(client_id="c1", username="u", peer="127.0.0.1:5000", protocol_version=4,
                clean_start=True, keep_alive=60)


class Boom(Exception):
    pass


class Outcome:
    """Watches a Deferred. ``d.called`` cannot tell whether ``decide()`` has answered: its
    chain starts from ``succeed(None)``, so it is "called" while paused on a handler's Deferred.
    A callback added at the end of the chain runs only once the answer is there."""

    def __init__(self, d: Deferred[Any]) -> None:
        self.results: list[Any] = []
        self.failures: list[Any] = []
        d.addCallbacks(self.results.append, self.failures.append)

    @property
    def fired(self) -> bool:
        return bool(self.results or self.failures)

    @property
    def value(self) -> Any:
        assert not self.failures, self.failures[0].getTraceback() if self.failures else ""
        assert self.results, "the Deferred has not fired"
        return self.results[0]


def result_of(d: Deferred[Any]) -> Any:
    """The value a Deferred has fired with; it must have fired, and with a value, not a failure."""
    return Outcome(d).value


@pytest.fixture
def logged() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def failures_logged(events: Sequence[LogEvent]) -> list[BaseException]:
    return [e["log_failure"].value for e in events if "log_failure" in e]


def recorder(calls: list[tuple[str, tuple[Any, ...]]], name: str, answer: Any = None) -> Any:
    def handler(*args: Any) -> Any:
        calls.append((name, args))
        return answer
    return handler


# --- flags and registration -------------------------------------------------------------------

def test_no_handlers_no_flags() -> None:
    hooks = Hooks()
    for event in EVENTS:
        assert getattr(hooks, "has_" + event) is False


@pytest.mark.parametrize("event", EVENTS)
def test_flag_flips_on_register_and_remove(event: str) -> None:
    hooks = Hooks()
    register = getattr(hooks, "on_" + event)

    def first(*args: Any) -> None:
        return None

    def second(*args: Any) -> None:
        return None

    assert register(first) is first  # usable as a decorator
    assert getattr(hooks, "has_" + event) is True
    assert all(getattr(hooks, "has_" + other) is False for other in EVENTS if other != event)
    register(second)
    hooks.remove(event, first)
    assert getattr(hooks, "has_" + event) is True  # one is left
    hooks.remove(event, second)
    assert getattr(hooks, "has_" + event) is False


def test_removed_handler_is_not_called() -> None:
    hooks = Hooks()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    handler = hooks.on_connect(recorder(calls, "h", False))
    hooks.remove("connect", handler)
    assert result_of(hooks.decide("connect", CLIENT)) is None
    assert calls == []


def test_removing_an_unknown_handler_raises() -> None:
    with pytest.raises(ValueError):
        Hooks().remove("connect", lambda client: None)


# --- deciders ---------------------------------------------------------------------------------

@pytest.mark.parametrize("event", ["connect", "publish", "subscribe", "unsubscribe", "ping", "will"])
def test_decide_with_no_handlers_fires_none(event: str) -> None:
    assert result_of(Hooks().decide(event, CLIENT, "x")) is None


def test_handlers_called_in_registration_order_with_the_args() -> None:
    hooks = Hooks()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    subscription = Subscription(client_id="c1", topic_filter="a/#", qos=1)
    hooks.on_subscribe(recorder(calls, "first"))
    hooks.on_subscribe(recorder(calls, "second", True))
    hooks.on_subscribe(recorder(calls, "third"))
    hooks.on_connect(recorder(calls, "other event"))
    assert result_of(hooks.decide("subscribe", CLIENT, subscription)) is None
    assert calls == [("first", (CLIENT, subscription)), ("second", (CLIENT, subscription)),
                     ("third", (CLIENT, subscription))]


def test_false_refuses_with_the_events_default_code() -> None:
    hooks = Hooks()
    hooks.on_connect(lambda client: False)
    result = result_of(hooks.decide("connect", CLIENT))
    assert result == Refused()
    assert result.code(ReasonCode.NOT_AUTHORIZED) is ReasonCode.NOT_AUTHORIZED


def test_refused_code() -> None:
    assert Refused().code(ReasonCode.NOT_AUTHORIZED) is ReasonCode.NOT_AUTHORIZED
    assert Refused(ReasonCode.BANNED).code(ReasonCode.NOT_AUTHORIZED) is ReasonCode.BANNED


def test_returned_refused_is_the_answer() -> None:
    hooks = Hooks()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    refusal = Refused(ReasonCode.QUOTA_EXCEEDED, reason_string="slow down")
    hooks.on_publish(lambda client, message: refusal)
    hooks.on_publish(recorder(calls, "after"))
    assert result_of(hooks.decide("publish", CLIENT, Message(topic="a"))) is refusal
    assert calls == []


@pytest.mark.parametrize("code", [ReasonCode.UNSPECIFIED_ERROR, ReasonCode.BAD_USER_NAME_OR_PASSWORD,
                                  ReasonCode.BANNED, ReasonCode.NOT_AUTHORIZED])
def test_error_reason_code_refuses_with_that_code(code: ReasonCode) -> None:
    hooks = Hooks()
    hooks.on_connect(lambda client: code)
    result = result_of(hooks.decide("connect", CLIENT))
    assert result == Refused(code)
    assert result.reason_code is code


def test_success_reason_code_is_an_answer_not_a_refusal() -> None:
    hooks = Hooks()
    hooks.on_subscribe(lambda client, subscription: ReasonCode.GRANTED_QOS_1)
    assert result_of(hooks.decide("subscribe", CLIENT, None)) == ReasonCode.GRANTED_QOS_1


def test_last_non_none_answer_wins() -> None:
    hooks = Hooks()
    hooks.on_subscribe(lambda client, subscription: 2)
    hooks.on_subscribe(lambda client, subscription: 1)
    hooks.on_subscribe(lambda client, subscription: None)
    hooks.on_subscribe(lambda client, subscription: True)
    assert result_of(hooks.decide("subscribe", CLIENT, None)) == 1


def test_several_subscribe_hooks_grant_the_lowest_qos_of_their_answers() -> None:
    """Each int grants at most that QoS: a later handler's 2 lifted an earlier one's cap of 0."""
    hooks = Hooks()
    later: Deferred[Any] = Deferred()
    hooks.on_subscribe(lambda client, subscription: 0)
    hooks.on_subscribe(lambda client, subscription: 2)
    assert result_of(hooks.decide("subscribe", CLIENT, None)) == 0
    hooks.on_subscribe(lambda client, subscription: later)
    decided = hooks.decide("subscribe", CLIENT, None)
    later.callback(1)
    assert result_of(decided) == 0


def test_a_handler_an_earlier_one_removes_is_not_called() -> None:
    hooks = Hooks()
    calls: list[str] = []

    def refusing(client: Client, message: Message) -> bool:
        calls.append(message.topic)
        return False

    hooks.on_publish(lambda client, message: hooks.remove("publish", refusing))
    hooks.on_publish(refusing)
    assert result_of(hooks.decide("publish", CLIENT, Message(topic="t", payload=b""))) is None and calls == []


def test_a_handler_removed_while_an_earlier_one_decides_is_not_called() -> None:
    hooks = Hooks()
    first: Deferred[Any] = Deferred()
    calls: list[str] = []

    def refusing(client: Client, message: Message) -> bool:
        calls.append(message.topic)
        return False

    hooks.on_publish(lambda client, message: first)
    hooks.on_publish(refusing)
    decided = hooks.decide("publish", CLIENT, Message(topic="t", payload=b""))
    hooks.remove("publish", refusing)
    first.callback(None)
    assert result_of(decided) is None and calls == []


def test_zero_is_an_answer_not_a_refusal() -> None:  # grant QoS 0
    hooks = Hooks()
    hooks.on_subscribe(lambda client, subscription: 0)
    result = result_of(hooks.decide("subscribe", CLIENT, None))
    assert result == 0 and not isinstance(result, Refused)


def test_first_refusal_stops_the_chain() -> None:
    hooks = Hooks()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    hooks.on_unsubscribe(recorder(calls, "first", True))
    hooks.on_unsubscribe(recorder(calls, "second", ReasonCode.BANNED))
    hooks.on_unsubscribe(recorder(calls, "third", False))
    assert result_of(hooks.decide("unsubscribe", CLIENT, "a/b")) == Refused(ReasonCode.BANNED)
    assert [name for name, _ in calls] == ["first", "second"]


def test_raising_handler_refuses_logs_and_stops(logged: Sequence[LogEvent]) -> None:
    hooks = Hooks()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    error = Boom("no")

    def broken(client: Client) -> None:
        raise error

    hooks.on_connect(recorder(calls, "first"))
    hooks.on_connect(broken)
    hooks.on_connect(recorder(calls, "after"))
    assert result_of(hooks.decide("connect", CLIENT)) == Refused(ReasonCode.UNSPECIFIED_ERROR)
    assert [name for name, _ in calls] == ["first"]
    assert failures_logged(logged) == [error]
    event = next(e for e in logged if "log_failure" in e)
    assert event["event"] == "connect" and event["handler"] is broken
    assert event["log_namespace"] == "mqtt_broker.hooks"


def test_failed_deferred_refuses_and_is_logged(logged: Sequence[LogEvent]) -> None:
    hooks = Hooks()
    error = Boom("later")
    hooks.on_ping(lambda client: fail(error))
    assert result_of(hooks.decide("ping", CLIENT)) == Refused(ReasonCode.UNSPECIFIED_ERROR)
    assert failures_logged(logged) == [error]


def test_unfired_deferred_delays_the_answer() -> None:
    hooks = Hooks()
    pending: Deferred[Any] = Deferred()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    hooks.on_connect(lambda client: pending)
    hooks.on_connect(recorder(calls, "second"))
    result = Outcome(hooks.decide("connect", CLIENT))
    assert not result.fired
    assert calls == []  # the next handler waits for the first
    pending.callback(False)
    assert result.fired
    assert result.value == Refused()
    assert calls == []


def test_unfired_deferred_then_allow_runs_the_next_handler() -> None:
    hooks = Hooks()
    pending: Deferred[Any] = Deferred()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    hooks.on_subscribe(lambda client, subscription: pending)
    hooks.on_subscribe(recorder(calls, "second"))
    result = Outcome(hooks.decide("subscribe", CLIENT, "s"))
    assert not result.fired and calls == []
    pending.callback(1)
    assert calls == [("second", (CLIENT, "s"))]
    assert result.value == 1


def test_a_deferred_returned_to_several_calls_gives_each_its_answer(logged: Sequence[LogEvent]) -> None:
    """One "ready" Deferred handed to every call: each call, and the handler's own callbacks
    after them, see what it fired with (the first call's chain turned False into None for the
    rest: a refusal became an acceptance)."""
    hooks = Hooks()
    gate: Deferred[Any] = Deferred()
    hooks.on_connect(lambda client: gate)
    first, second = Outcome(hooks.decide("connect", CLIENT)), Outcome(hooks.decide("connect", CLIENT))
    seen: list[Any] = []
    gate.addCallback(seen.append)
    gate.callback(False)
    assert first.value == second.value == Refused() and seen == [False]
    failing: Deferred[Any] = Deferred()
    hooks = Hooks()
    hooks.on_connect(lambda client: failing)
    first, second = Outcome(hooks.decide("connect", CLIENT)), Outcome(hooks.decide("connect", CLIENT))
    failing.errback(Boom())
    assert first.value == second.value == Refused(ReasonCode.UNSPECIFIED_ERROR)
    assert [event["log_failure"].type for event in logged if "log_failure" in event] == [Boom, Boom]
    # A call after it failed is refused too (it found None, which lets through).
    assert result_of(hooks.decide("connect", CLIENT)) == Refused(ReasonCode.UNSPECIFIED_ERROR)


def test_a_wait_that_times_out_leaves_the_others_on_the_same_deferred_waiting() -> None:
    """Each call has its own hook_timeout; the handler's Deferred is cancelled only when the
    last wait on it gives up."""
    from twisted.internet.task import Clock
    clock = Clock()
    hooks = Hooks(clock, timeout=5)
    cancelled: list[Any] = []
    gate: Deferred[Any] = Deferred(cancelled.append)
    hooks.on_connect(lambda client: gate)
    first = Outcome(hooks.decide("connect", CLIENT))
    clock.advance(4)
    second = Outcome(hooks.decide("connect", CLIENT))
    clock.advance(1)
    assert first.value == Refused(ReasonCode.UNSPECIFIED_ERROR) and not second.fired and not cancelled
    clock.advance(4)
    assert second.value == Refused(ReasonCode.UNSPECIFIED_ERROR) and cancelled == [gate]


def test_waits_that_gave_up_on_a_deferred_leave_nothing_on_it() -> None:
    """A "ready" Deferred that has not fired, each call given up (its client left, or its
    hook_timeout passed) while the next one waits: the Deferred holds the wait still on it, not
    every wait that gave up on it."""
    hooks = Hooks()
    ready: Deferred[Any] = Deferred()
    hooks.on_connect(lambda client: ready)
    wait = hooks.decide("connect", CLIENT)
    given_up: list[weakref.ref[Deferred[Any]]] = []
    for _ in range(100):
        given_up.append(weakref.ref(wait))
        wait, previous = hooks.decide("connect", CLIENT), wait
        previous.cancel()
    del previous
    gc.collect()
    assert [ref for ref in given_up if ref() is not None] == []
    last = Outcome(wait)
    ready.callback(False)
    assert last.value == Refused()


_REFUSED_CLIENTS = """
import gc, sys
from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogBeginner
from mqtt_broker.protocol import MQTTProtocol
from mqtt_broker.testing import MemoryBroker

async def raising(client, *_):
    raise PermissionError(client.client_id)

@inlineCallbacks
def raising_later(client, *_):
    yield None
    raise PermissionError(client.client_id)

globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)  # (no buffer, as a broker's)
event, handler = sys.argv[1], globals()[sys.argv[2]]
broker = MemoryBroker()
getattr(broker.hooks, "on_" + event)(handler)
for n in range(20):
    client = broker.client()
    answers = [client.connect("c%d" % n)]
    if event == "publish":
        answers = [client.publish("t", b"x" * 1000, qos=1)]
    broker.advance(10)
    [answer] = [a for a in answers if a is not None] + client.received()
    assert answer.reason_code >= 0x80, answer
    client.drop()
    del client
gc.collect()
print(sum(type(o) is MQTTProtocol for o in gc.get_objects()))
"""


@pytest.mark.parametrize("event", ["connect", "publish"])
@pytest.mark.parametrize("handler", ["raising", "raising_later"])
def test_a_handler_that_fails_keeps_nothing_of_the_clients_it_refused(event: str, handler: str) -> None:
    """A handler's Deferred that failed was kept with its failure, whose traceback's frames hold
    the Deferred (the key it was weakly kept by), the connection and what was asked about: 10 KiB
    for each refused client, for ever. (In a process of its own: a test's log events, buffered
    until logging begins, hold the frames too.)"""
    alive = subprocess.run([sys.executable, "-c", _REFUSED_CLIENTS, event, handler], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert alive.returncode == 0, alive.stderr
    assert alive.stdout.split() == ["0"], alive.stdout


def test_a_handler_deferred_failed_with_what_is_not_an_exception_refuses_and_leaves_nothing_unhandled() -> None:
    """Twisted's Failure takes any value: the frames of its exception were dropped as if it had
    to be one, and the AttributeError failed the handler's Deferred with nothing to handle it
    (which conftest's check of such Deferreds, at the end of each test, finds)."""
    broker = MemoryBroker()
    broker.hooks.on_connect(lambda client: fail(Failure("not an exception")))  # type: ignore[no-untyped-call]
    connack = broker.client().connect("c")
    assert connack is not None and connack.reason_code == ReasonCode.UNSPECIFIED_ERROR


def test_the_waits_on_a_shared_deferred_hear_it_once_each_in_the_order_they_came() -> None:
    """The first wait's answer ends the second (its client's connection lost in the same turn):
    the second is not answered again, and the third, after it, is still answered."""
    hooks = Hooks()
    ready: Deferred[Any] = Deferred()
    hooks.on_connect(lambda client: ready)
    waits = [hooks.decide("connect", CLIENT) for _ in range(4)]
    heard: list[tuple[int, Any]] = []
    for n, wait in enumerate(waits):
        wait.addBoth(lambda result, n=n: heard.append((n, result)))
    waits[0].addCallback(lambda _: waits[2].cancel())
    ready.callback(True)
    assert heard == [(0, None), (2, Refused(ReasonCode.UNSPECIFIED_ERROR)), (1, None), (3, None)]
    assert ready.result is True


def test_a_handler_removing_itself_leaves_the_next_one_to_decide() -> None:
    hooks = Hooks()
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def once(client: Client) -> None:
        hooks.remove("connect", once)

    hooks.on_connect(once)
    hooks.on_connect(recorder(calls, "guard", False))
    assert result_of(hooks.decide("connect", CLIENT)) == Refused()
    assert calls == [("guard", (CLIENT,))]


def test_coroutine_handler() -> None:
    hooks = Hooks()

    async def deny(client: Client) -> bool:
        return False

    hooks.on_connect(deny)
    assert result_of(hooks.decide("connect", CLIENT)) == Refused()


def test_coroutine_handler_awaiting_a_deferred() -> None:
    hooks = Hooks()
    pending: Deferred[int] = Deferred()

    async def grant(client: Client, subscription: Any) -> int:
        return await pending

    hooks.on_subscribe(grant)
    result = Outcome(hooks.decide("subscribe", CLIENT, "s"))
    assert not result.fired
    pending.callback(2)
    assert result.value == 2


def test_raising_coroutine_refuses(logged: Sequence[LogEvent]) -> None:
    hooks = Hooks()
    error = Boom("async")

    async def broken(client: Client) -> None:
        raise error

    hooks.on_connect(broken)
    assert result_of(hooks.decide("connect", CLIENT)) == Refused(ReasonCode.UNSPECIFIED_ERROR)
    assert failures_logged(logged) == [error]


# --- filters: publish and will may replace the message ----------------------------------------

@pytest.mark.parametrize("event", ["publish", "will"])
def test_returned_message_replaces_it_for_later_handlers(event: str) -> None:
    hooks = Hooks()
    register = getattr(hooks, "on_" + event)
    original = Message(topic="a", payload=b"1")
    replaced = Message(topic="b", payload=b"2")
    calls: list[tuple[str, tuple[Any, ...]]] = []
    register(recorder(calls, "first", replaced))
    register(recorder(calls, "second"))
    register(recorder(calls, "third", True))
    result = result_of(hooks.decide(event, CLIENT, original))
    assert result is replaced
    assert calls[0] == ("first", (CLIENT, original))
    assert calls[1][1][1] is replaced and calls[2][1][1] is replaced


def test_each_replacement_feeds_the_next() -> None:
    hooks = Hooks()
    original = Message(topic="a", payload=b"")
    seen: list[bytes] = []

    def append(suffix: bytes) -> Any:
        def handler(client: Client, message: Message) -> Message:
            seen.append(message.payload)
            return Message(topic=message.topic, payload=message.payload + suffix)
        return handler

    hooks.on_publish(append(b"x"))
    hooks.on_publish(append(b"y"))
    result = result_of(hooks.decide("publish", CLIENT, original))
    assert seen == [b"", b"x"]
    assert result.payload == b"xy"
    assert original.payload == b""


def test_publish_refused_after_a_replacement() -> None:
    hooks = Hooks()
    hooks.on_publish(lambda client, message: Message(topic="b"))
    hooks.on_publish(lambda client, message: False)
    assert result_of(hooks.decide("publish", CLIENT, Message(topic="a"))) == Refused()


def test_answers_do_not_replace_arguments_of_other_deciders() -> None:
    hooks = Hooks()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    subscription = Subscription(client_id="c1", topic_filter="a")
    hooks.on_subscribe(recorder(calls, "first", 1))
    hooks.on_subscribe(recorder(calls, "second"))
    assert result_of(hooks.decide("subscribe", CLIENT, subscription)) == 1
    assert calls[1] == ("second", (CLIENT, subscription))


# --- notifications ----------------------------------------------------------------------------

def test_notify_calls_every_handler_and_logs_failures(logged: Sequence[LogEvent]) -> None:
    hooks = Hooks()
    calls: list[tuple[str, tuple[Any, ...]]] = []
    error = Boom("disconnect")

    def broken(client: Client, graceful: bool) -> None:
        calls.append(("broken", (client, graceful)))
        raise error

    hooks.on_disconnect(recorder(calls, "first", False))
    hooks.on_disconnect(broken)
    hooks.on_disconnect(recorder(calls, "third"))
    hooks.notify("disconnect", CLIENT, True)
    assert calls == [("first", (CLIENT, True)), ("broken", (CLIENT, True)),
                     ("third", (CLIENT, True))]
    assert failures_logged(logged) == [error]
    event = next(e for e in logged if "log_failure" in e)
    assert event["handler"] is broken and event["event"] == "disconnect"


def test_notify_logs_a_later_failure(logged: Sequence[LogEvent]) -> None:
    hooks = Hooks()
    pending: Deferred[None] = Deferred()
    calls: list[str] = []
    hooks.on_disconnect(lambda client, graceful: pending)
    hooks.on_disconnect(lambda client, graceful: calls.append("second"))
    hooks.notify("disconnect", CLIENT, False)
    assert calls == ["second"]  # a notification does not wait
    assert failures_logged(logged) == []
    error = Boom("late")
    pending.errback(error)
    assert failures_logged(logged) == [error]


def test_notify_with_no_handlers() -> None:
    Hooks().notify("disconnect", CLIENT, True)


# --- in a running broker, through its clients (mqtt_broker.testing) --------------------------

def test_connect_hook_refuses_in_the_broker() -> None:
    broker = MemoryBroker()
    broker.hooks.on_connect(lambda client: client.client_id != "bad")
    assert broker.client(MQTT_3_1_1).connect("good") == Connack(reason_code=0)
    bad = broker.client(MQTT_3_1_1)
    assert bad.connect("bad") == Connack(reason_code=5) and bad.closed


@pytest.mark.parametrize("answer", ["no", ReasonCode.SUCCESS, Message(topic="t")], ids=["str", "success-code", "message"])
def test_a_connect_hooks_answer_it_does_not_define_refuses(answer: Any, logged: Sequence[LogEvent]) -> None:
    """on_connect answers None, a bool, an error code or a Refused: anything else refuses with
    0x80 and is logged, as a failing hook is; it let the client in."""
    broker = MemoryBroker()
    broker.hooks.on_connect(lambda client: answer)
    client = broker.client(MQTT_5)
    assert client.connect("c") == Connack(reason_code=ReasonCode.UNSPECIFIED_ERROR) and client.closed
    assert any(repr(answer) in formatEvent(event) for event in logged)


def test_an_error_code_written_as_a_plain_int_refuses_with_it() -> None:
    """0x87 is ReasonCode.NOT_AUTHORIZED: as a plain int, it let the client in (and a plain 0x80
    granted a subscription at the QoS asked)."""
    broker = MemoryBroker()
    broker.hooks.on_connect(lambda client: 0x87 if client.client_id == "bad" else None)
    broker.hooks.on_subscribe(lambda client, subscription: 0x80)
    bad = broker.client(MQTT_5)
    assert bad.connect("bad") == Connack(reason_code=ReasonCode.NOT_AUTHORIZED) and bad.closed
    good = broker.client(MQTT_5)
    good.connect("good")
    assert good.subscribe("t", qos=1) == Suback(packet_id=1, reason_codes=(0x80,))


@pytest.mark.parametrize("event, answer", [("publish", 3), ("subscribe", 3), ("subscribe", "1"),
                                           ("unsubscribe", "keep"), ("ping", Message(topic="t")), ("will", b"x")])
def test_an_answer_an_event_does_not_take_refuses(event: str, answer: Any, logged: Sequence[LogEvent]) -> None:
    hooks = Hooks()
    getattr(hooks, f"on_{event}")(lambda *args: answer)
    assert result_of(hooks.decide(event, CLIENT, None)) == Refused(ReasonCode.UNSPECIFIED_ERROR)
    assert any(repr(answer) in formatEvent(event) for event in logged)


def test_publish_hook_drops_and_rewrites() -> None:
    broker = MemoryBroker()
    sub = broker.connect("sub", version=MQTT_3_1_1)
    sub.subscribe("#")

    def hook(client: Client, message: Message) -> Message | bool | None:
        if message.topic == "drop":
            return False
        if message.topic == "rewrite":
            return Message(topic="rewritten", payload=message.payload.upper())
        return None

    broker.hooks.on_publish(hook)
    pub = broker.connect("pub", version=MQTT_3_1_1)
    assert pub.publish("drop", b"x", qos=1) == Puback(packet_id=1)  # MQTT 3 still acknowledges
    pub.publish("rewrite", b"abc")
    pub.publish("plain", b"p")
    assert pub.received() == []
    assert sub.received() == [Publish(topic="rewritten", payload=b"ABC"), Publish(topic="plain", payload=b"p")]


def test_async_publish_hook_keeps_order() -> None:
    broker = MemoryBroker()
    sub = broker.connect("sub", version=MQTT_3_1_1)
    sub.subscribe("t")
    pending: list[Deferred[None]] = []

    def hook(client: Client, message: Message) -> Deferred[None] | None:
        if message.payload == b"slow":
            pending.append(Deferred())
            return pending[-1]
        return None

    broker.hooks.on_publish(hook)
    pub = broker.connect("pub", version=MQTT_3_1_1)
    pub.publish("t", b"slow")
    pub.publish("t", b"fast")
    # Read on, not handled: a client that leaves meanwhile is seen to (up to a bound, then paused).
    assert sub.received() == [] and pub.transport.producerState == "producing"
    pub.publish("t", bytes(READ_WHILE_DECIDING))
    assert sub.received() == [] and pub.transport.producerState == "paused"
    pending[0].callback(None)
    assert sub.received() == [Publish(topic="t", payload=b"slow"), Publish(topic="t", payload=b"fast"),
                              Publish(topic="t", payload=bytes(READ_WHILE_DECIDING))]
    assert pub.transport.producerState == "producing"


@pytest.mark.parametrize("reason,wills", [(0, []), (0x04, [("wills/c", b"gone")]), (0x80, [("wills/c", b"gone")])])
def test_what_a_client_sent_before_closing_while_a_hook_decides_is_handled(
        logged: Sequence[LogEvent], reason: int, wills: list[tuple[str, bytes]]) -> None:
    """A client sends a PUBLISH and a DISCONNECT, then closes its socket, as clients do, while a
    publish hook decides: the DISCONNECT, read already, is handled once the hook has decided (a
    normal one discards the will [MQTT-3.14.4-3]), and the PUBLISH is routed. (Ended at once,
    the connection published the will and dropped both.)"""
    broker = MemoryBroker()
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    watcher = broker.connect("watcher")
    watcher.subscribe("#")
    timers = len(broker.reactor.getDelayedCalls())
    client = broker.client()
    client.send(Connect(client_id="c", protocol_level=5, protocol_name="MQTT",
                        will=Will(topic="wills/c", payload=b"gone")))
    client.send(Publish(topic="data", payload=b"last reading"), Disconnect(reason_code=reason))
    client.drop()
    assert "c" in broker.service.sessions and watcher.messages() == []  # (waiting for the hook)
    pending[0].callback(None)
    assert [(m.topic, m.payload) for m in watcher.messages()] == [("data", b"last reading"), *wills]
    assert "c" not in broker.service.sessions and broker.service.connections == {watcher.protocol}
    assert failures_logged(logged) == [] and len(broker.reactor.getDelayedCalls()) == timers


@pytest.mark.parametrize("socket_closed", [False, True])
def test_a_client_connecting_again_while_a_hook_decides_has_what_it_sent_before_handled_first(
        logged: Sequence[LogEvent], socket_closed: bool) -> None:
    """A client sends two PUBLISHes and a DISCONNECT 0x00 while a publish hook decides on the
    first, and connects again before it has: the new connection's CONNACK waits until the old
    one has handled them, so both messages are routed and the will is discarded
    [MQTT-3.14.4-3], with the old socket closed or not. (Taken over at once, the old connection
    published the will and lost both.)"""
    broker = MemoryBroker()
    pending: list[Deferred[None]] = []

    @broker.hooks.on_publish
    def slow_on_the_first(client: Client, message: Message) -> Deferred[None] | None:
        if message.payload != b"1":
            return None
        pending.append(Deferred())
        return pending[-1]

    watcher = broker.connect("watcher")
    watcher.subscribe("#")
    old = broker.client()
    old.connect("c", will=Will(topic="wills/c", payload=b"gone"))
    old.send(Publish(topic="data", payload=b"1"), Publish(topic="data", payload=b"2"), Disconnect(reason_code=0))
    if socket_closed:
        old.drop()
    new = broker.client()
    waited = new.connect("c") is None and watcher.messages() == []  # (waiting for the hook)
    pending[0].callback(None)
    assert [(m.topic, m.payload) for m in watcher.messages()] == [("data", b"1"), ("data", b"2")]
    assert broker.service.stats.wills_published == 0
    assert waited and [p.reason_code for p in new.received()] == [0]  # type: ignore[attr-defined]
    assert old.received() == [] and old.closed and failures_logged(logged) == []


@pytest.mark.parametrize("keep_alive", [60, 0])
@pytest.mark.parametrize("hook_timeout", [5.0, 0.0])
def test_a_client_connecting_again_waits_for_its_old_connection_no_longer_than_a_hook_may_take(
        hook_timeout: float, keep_alive: int) -> None:
    """Each of the old connection's PUBLISHes waits for a hook that never answers: the new
    connection takes the session over after hook_timeout (TAKEOVER_WAIT without one, when a
    hook may hold its own client for ever), as it did at once before; the old connection is
    then closed (0x8E) with what it had not handled, and its will goes. A client without a
    keepalive, which connect_timeout (10 s) bounds until its CONNACK, has it from the wait's end:
    it was closed at 10 s, each time it came back."""
    broker = MemoryBroker(hook_timeout=hook_timeout)
    watcher = broker.connect("watcher")
    watcher.subscribe("wills/#")
    broker.hooks.on_publish(lambda client, message: Deferred())
    old = broker.client()
    old.connect("c", will=Will(topic="wills/c", payload=b"gone"))
    old.send(Publish(topic="data", payload=b"1"), Publish(topic="data", payload=b"2"), Disconnect(reason_code=0))
    new = broker.client()
    assert new.connect("c", keep_alive=keep_alive) is None
    wait = hook_timeout or TAKEOVER_WAIT
    broker.reactor.advance(wait - 0.1)
    assert new.received() == [] and not old.closed
    broker.reactor.advance(0.1)
    assert [p.reason_code for p in new.received()] == [0]  # type: ignore[attr-defined]
    assert old.received() == [Disconnect(reason_code=ReasonCode.SESSION_TAKEN_OVER, properties={
        "reason_string": "session taken over by a new connection"})] and old.closed
    assert [(m.topic, m.payload) for m in watcher.messages()] == [("wills/c", b"gone")]


@pytest.mark.parametrize("hook_timeout", [5.0, 0.0])
def test_of_two_new_connections_waiting_for_the_old_one_the_newest_has_the_session(hook_timeout: float) -> None:
    """c connects again while a hook that never answers holds its old connection, and again
    halfway through that wait: the first new connection takes the session over once its wait
    ends, and the second, whose wait the old connection's close ends, takes it from the first
    (0x8E) [MQTT-3.1.4-2]. Its wait ended inside the first's takeover, and both were left
    connected, one of them on a session it no longer held."""
    broker = MemoryBroker(hook_timeout=hook_timeout)
    wait = hook_timeout or TAKEOVER_WAIT
    broker.hooks.on_publish(lambda client, message: Deferred())
    old = broker.client()
    old.connect("c")
    old.send(Publish(topic="data", payload=b"1"), Publish(topic="data", payload=b"2"))
    first = broker.client()
    assert first.connect("c", keep_alive=60) is None
    broker.reactor.advance(wait / 2)
    second = broker.client()
    assert second.connect("c", keep_alive=60) is None
    broker.reactor.advance(wait / 2)
    broker.reactor.advance(0)
    assert old.closed and first.closed and not second.closed
    assert [p.reason_code for p in first.received()] == [0, ReasonCode.SESSION_TAKEN_OVER]  # type: ignore[attr-defined]
    assert [p.reason_code for p in second.received()] == [0]  # type: ignore[attr-defined]
    assert broker.service.sessions["c"].connection is second.protocol


@pytest.mark.parametrize("will_delay", [0, 5])
def test_a_client_connecting_again_while_a_will_hook_decides_has_its_old_will_go_out_first(will_delay: int) -> None:
    """c's connection drops and a will hook decides on its retained will (at once, or once its
    Will Delay Interval is over); c connects again before the hook has answered: the new
    connection's CONNACK waits for the answer, so the old will goes out before what the new
    connection publishes. (Accepted at once, c published its retained "online", which the old
    "offline" then replaced while c was connected.)"""
    broker = MemoryBroker()
    pending: list[Deferred[None]] = []
    broker.hooks.on_will(lambda client, message: pending.append(Deferred()) or pending[-1])
    old = broker.client()
    old.connect("c", properties={"session_expiry_interval": 60}, will=Will(
        topic="status/c", payload=b"offline", retain=True, properties={"will_delay_interval": will_delay}))
    old.publish("status/c", b"online", retain=True)
    old.drop()
    broker.advance(will_delay)
    new = broker.client()
    assert pending and new.connect("c", clean_start=False, keep_alive=60) is None
    pending[0].callback(None)
    assert [p.reason_code for p in new.received()] == [0]  # type: ignore[attr-defined]
    new.publish("status/c", b"online", retain=True)
    watcher = broker.connect("watcher")
    watcher.subscribe("status/#")
    assert [m.payload for m in watcher.messages()] == [b"online"]
    assert broker.service.stats.wills_published == 1


@pytest.mark.parametrize("making", ["takeover", "clean start"])
def test_a_will_a_new_connection_makes_due_itself_goes_out_before_its_connack(making: str) -> None:
    """As above for a will the new connection makes due itself: it takes over c's connection,
    still open (half-open: c did not see it go), or its clean start ends the session whose will
    waited for its delay. Its CONNACK, and what follows it (the message in flight on the old
    connection, sent again), waits for the will hook's answer; what the client sent meanwhile
    (its retained "online") is handled after it. (Accepted at once, c's "online" was replaced
    by the old "offline" when the hook answered.)"""
    broker = MemoryBroker()
    pending: list[Deferred[None]] = []
    broker.hooks.on_will(lambda client, message: pending.append(Deferred()) or pending[-1])
    old = broker.client(acknowledge=False)
    old.connect("c", properties={"session_expiry_interval": 60}, will=Will(
        topic="status/c", payload=b"offline", retain=True,
        properties={"will_delay_interval": 5 if making == "clean start" else 0}))
    old.subscribe("news", qos=1)
    old.publish("status/c", b"online", retain=True)
    broker.connect("p").publish("news", b"in flight", qos=1)
    assert [m.payload for m in old.messages()] == [b"in flight"]
    if making == "clean start":
        old.drop()
    new = broker.client()
    assert new.connect("c", clean_start=making == "clean start", keep_alive=60) is None
    new.publish("status/c", b"online", retain=True)
    assert pending and new.received() == []
    pending[0].callback(None)
    received = new.received()
    assert [type(p) for p in received] == [Connack, *[Publish] * (making == "takeover")]
    watcher = broker.connect("watcher")
    watcher.subscribe("status/#")
    assert [m.payload for m in watcher.messages()] == [b"online"]
    assert broker.service.stats.wills_published == 1


def test_a_will_a_new_connection_makes_due_itself_holds_its_connack_no_longer_than_a_hook_may_take() -> None:
    """As for a will due before (below): TAKEOVER_WAIT at most, with no hook_timeout."""
    broker = MemoryBroker()
    broker.hooks.on_will(lambda client, message: Deferred())
    broker.connect("c", will=Will(topic="status/c", payload=b"offline"))
    new = broker.client()
    assert new.connect("c", keep_alive=60) is None
    broker.reactor.advance(TAKEOVER_WAIT - 0.1)
    assert new.received() == []
    broker.reactor.advance(0.1)
    assert [p.reason_code for p in new.received()] == [0]  # type: ignore[attr-defined]
    assert not new.closed


def test_a_connection_that_closes_before_its_accepting_connack_went_has_no_disconnect_hook_called() -> None:
    """on_connect: "on_disconnect comes only after a CONNACK that accepted it". A connection that
    takes over c's makes c's will due, and its CONNACK waits for the will hook: if it closes
    meanwhile, the client was never told it is connected, and on_disconnect was called for it."""
    broker = MemoryBroker()
    deciding: list[Deferred[None]] = []
    broker.hooks.on_will(lambda client, message: deciding.append(Deferred()) or deciding[-1])
    disconnected: list[str] = []
    broker.hooks.on_disconnect(lambda client, graceful: disconnected.append(client.peer))
    first = broker.connect("c", will=Will(topic="status/c", payload=b"offline"))
    held = broker.client()
    assert held.connect("c") is None and deciding
    held.drop()
    deciding[0].callback(None)
    assert not [p for p in held.received() if isinstance(p, Connack)]
    assert disconnected == [first.protocol.peer]  # type: ignore[union-attr]


@pytest.mark.parametrize("hook_timeout", [5.0, 0.0])
def test_a_client_connecting_again_waits_for_its_old_will_no_longer_than_a_hook_may_take(hook_timeout: float) -> None:
    """A will hook that never answers holds c's next connection hook_timeout at most
    (TAKEOVER_WAIT without one, when the hook may hold the will for ever, not the client):
    then it is accepted."""
    broker = MemoryBroker(hook_timeout=hook_timeout)
    pending: list[Deferred[None]] = []
    broker.hooks.on_will(lambda client, message: pending.append(Deferred()) or pending[-1])
    broker.connect("c", will=Will(topic="status/c", payload=b"offline", retain=True)).drop()
    new = broker.client()
    assert new.connect("c", keep_alive=60) is None
    wait = hook_timeout or TAKEOVER_WAIT
    broker.reactor.advance(wait - 0.1)
    assert new.received() == []
    broker.reactor.advance(0.1)
    assert [p.reason_code for p in new.received()] == [0]  # type: ignore[attr-defined]
    assert not new.closed


@pytest.mark.parametrize("ending", ["stop", "kick"])
@pytest.mark.parametrize("reason", [0, 0x04])
def test_what_a_client_sent_after_a_packet_a_hook_decides_on_is_not_handled_if_the_broker_ends_first(
        ending: str, reason: int) -> None:
    """As above, but the broker ends the connection before the hook decides (the broker
    stopping, a kick): what the client sent after that packet is not handled, a DISCONNECT
    among it neither, and the will goes as for any connection the broker ends
    (docs/embedding.md)."""
    broker = MemoryBroker()
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    watcher = broker.connect("watcher")
    watcher.subscribe("#")
    client = broker.client()
    client.send(Connect(client_id="c", protocol_level=5, protocol_name="MQTT",
                        will=Will(topic="wills/c", payload=b"gone")))
    client.send(Publish(topic="data", payload=b"last reading"), Publish(topic="data", payload=b"after it"),
                Disconnect(reason_code=reason))
    client.drop()
    if ending == "stop":
        broker.service.stopService()
    else:
        client.protocol.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")
    for decision in pending:
        if not decision.called:
            decision.callback(None)
    assert broker.service.stats.wills_published == 1
    if ending != "stop":  # (stopping, the broker may close the watcher's connection first)
        assert [(m.topic, m.payload) for m in watcher.messages()] == [("wills/c", b"gone")]


# A DISCONNECT malformed or refused when handled is no normal one: handled in its turn, it
# closes the connection with the will published [MQTT-3.1.2-8], the client connecting again
# meanwhile or not.
NOT_A_NORMAL_DISCONNECT = {
    "reserved flags set": b"\xe2\x00",
    "session expiry after 0 at CONNECT": encode(
        Disconnect(reason_code=0, properties={"session_expiry_interval": 60}), MQTT_5),
    "malformed packet before it": b"\x00\x00" + encode(Disconnect(), MQTT_5),  # (packet type 0: reserved)
    "illegal packet before it": encode(Connect(client_id="c"), MQTT_5) + encode(Disconnect(), MQTT_5),
}


@pytest.mark.parametrize("ending", ["hook decides", "taken over"])
@pytest.mark.parametrize("tail", list(NOT_A_NORMAL_DISCONNECT))
def test_a_held_disconnect_that_is_not_a_normal_one_keeps_the_will(tail: str, ending: str) -> None:
    broker = MemoryBroker()
    watcher = broker.connect("watcher")
    watcher.subscribe("wills/#")
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    client = broker.client()
    client.send(Connect(client_id="c", protocol_level=5, protocol_name="MQTT",
                        will=Will(topic="wills/c", payload=b"gone")))
    client._write(encode(Publish(topic="data", payload=b"x"), MQTT_5) + NOT_A_NORMAL_DISCONNECT[tail])
    broker.flush()
    if ending == "taken over":
        broker.client().send(Connect(client_id="c", protocol_level=5, protocol_name="MQTT"))
    for decision in pending:
        if not decision.called:
            decision.callback(None)
    assert [(m.topic, m.payload) for m in watcher.messages()] == [("wills/c", b"gone")]


@pytest.mark.parametrize("hooked", [False, True])
def test_a_connection_closed_for_a_packet_before_its_disconnect_publishes_the_will(hooked: bool) -> None:
    """The SUBACK is larger than the client's Maximum Packet Size: the broker closes the
    connection (0x95) before it handles the DISCONNECT 0x00 that follows [MQTT-3.1.2-8], with a
    subscribe hook deciding as without one."""
    broker = MemoryBroker()
    watcher = broker.connect("watcher")
    watcher.subscribe("wills/#")
    pending: list[Deferred[Any]] = []
    if hooked:
        broker.hooks.on_subscribe(lambda client, subscription: pending.append(Deferred()) or pending[-1])
    client = broker.client()
    client.send(Connect(client_id="c", protocol_level=5, protocol_name="MQTT",
                        will=Will(topic="wills/c", payload=b"gone"), properties={"maximum_packet_size": 20}))
    client.send(Subscribe(packet_id=1, subscriptions=tuple(SubscriptionRequest(topic_filter=f"f/{n}", qos=0)
                                                          for n in range(30))), Disconnect(reason_code=0))
    for decision in pending:
        if not decision.called:
            decision.callback(None)
    assert [(m.topic, m.payload) for m in watcher.messages()] == [("wills/c", b"gone")]


def test_a_retained_message_that_expires_while_its_hook_decides_still_replaces_the_old_one() -> None:
    """[MQTT-3.3.1-5]: a retained PUBLISH replaces the topic's retained message; this one then
    expired [MQTT-3.3.2-5], which left the old one to new subscribers."""
    broker = MemoryBroker()
    publisher = broker.connect("p")
    publisher.publish("t", b"old", retain=True)
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    publisher.send(Publish(topic="t", payload=b"new", retain=True, properties={"message_expiry_interval": 1}))
    broker.reactor.advance(2)
    pending[0].callback(None)
    late = broker.connect("late")
    late.subscribe("t")
    assert late.messages() == [] and "t" not in broker.service.retained


def test_a_client_gone_while_hooks_decide_on_two_of_its_packets_in_turn_has_both_handled() -> None:
    """The connection ends once what it read before its socket closed is handled, the second
    PUBLISH's decision coming after the first's: the compiled build took ``_blocked`` for None
    still after the first answer and failed there."""
    broker = make_broker()
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    subscriber = connected(broker, "sub")
    subscriber.subscribe("t", qos=1)
    publisher = connected(broker, "pub")
    publisher.send(Publish(topic="t", payload=b"1", qos=1, packet_id=1),
                   Publish(topic="t", payload=b"2", qos=1, packet_id=2))
    publisher.lose()
    pending[0].callback(None)
    assert len(pending) == 2 and "pub" in broker.sessions  # (not ended yet: "2" is being decided)
    pending[1].callback(None)
    assert [p.payload for p in subscriber.received() if isinstance(p, Publish)] == [b"1", b"2"]
    assert "pub" not in broker.sessions and broker.ending == 0


class TickingClock(MemoryReactorClock):
    """A reactor whose time moves on a microsecond each time it is read, as a real one's does."""

    def seconds(self) -> float:
        self.rightNow += 1e-6
        return self.rightNow


def test_a_message_of_expiry_interval_0_is_sent_on_at_once_through_a_publish_hook_too() -> None:
    """[MQTT-3.3.2-5]: a message whose interval is 0 reaches the subscribers connected now, as it
    does without a hook. A hook that answers at once took no time, but a real clock moves on
    between the PUBLISH's reading and the answer: such messages were all taken for expired
    while the hook decided (PUBACK 0x10, not routed)."""
    broker = make_broker(TickingClock())
    broker.hooks.on_publish(lambda client, message: None)
    subscriber = connected(broker, "sub", version=5)
    subscriber.subscribe("t", qos=1)
    publisher = connected(broker, "pub", version=5)
    acks = publisher.publish("t", b"now", qos=1, properties={"message_expiry_interval": 0})
    assert acks == [Puback(packet_id=1)]
    assert [(p.payload, p.properties.get("message_expiry_interval")) for p in subscriber.received()
            if isinstance(p, Publish)] == [(b"now", 0)]
    assert broker.stats.messages_expired == 0


def test_a_subscribe_hook_changes_what_is_granted_by_its_answer_only() -> None:
    """The hook was handed the subscription that is granted: changed in place, a QoS above the
    one asked for, and above max_qos, was granted unchecked (MQTT 5 3.8.4: a server may grant a
    lower QoS than asked, never a higher one)."""
    broker = MemoryBroker(max_qos=1)

    @broker.hooks.on_subscribe
    def upgrade(client: Client, subscription: Subscription) -> None:
        subscription.qos = 2
        subscription.topic_filter = "other"

    subscriber = broker.connect("s")
    subscriber.subscribe("a", qos=0)
    assert [(s.topic_filter, s.qos) for s in broker.service.subscriptions_of("s")] == [("a", 0)]


def test_a_connection_gone_while_a_hook_decides_takes_no_place_of_max_connections() -> None:
    """It ends once the hook has decided (see the test above), without its socket meanwhile: a
    client connecting again in the meantime was refused for max_connections."""
    broker = MemoryBroker(max_connections=2)
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    broker.connect("watcher")
    client = broker.connect("c")
    client.send(Publish(topic="data", payload=b"x"))
    client.drop()
    assert pending and broker.client().protocol is not None
    assert broker.client().protocol is None  # (two now, besides the one that ends)
    pending[0].callback(None)
    assert broker.service.ending == 0


def test_connections_gone_while_a_hook_decides_take_places_of_max_connections_past_as_many_again() -> None:
    """Each keeps its session and what it read (up to READ_WHILE_DECIDING, and a read more) until
    the hook answers (hook_timeout, or never with 0): a client that connected, published, sent
    64 KiB and closed, again and again under new client ids, had 200 held with max_connections 2."""
    broker = MemoryBroker(max_connections=2)
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    for n in range(10):
        client = broker.client()
        if client.protocol is None:
            break
        client.connect(f"c{n}")
        client.send(Publish(topic="data", payload=b"x"))
        client.drop()
    assert len(broker.service.connections) == broker.service.ending == 4
    for decision in pending:
        decision.callback(None)
    assert broker.service.connections == set()
    broker.connect("again")


def test_a_connect_hook_whose_client_left_is_cancelled(logged: Sequence[LogEvent]) -> None:
    """No one waits for its answer any more: the handler's Deferred is cancelled, and its client
    not held until hook_timeout."""
    broker = MemoryBroker(hook_timeout=30)
    cancelled: list[Deferred[None]] = []
    broker.hooks.on_connect(lambda client: Deferred(cancelled.append))
    client = broker.client(version=MQTT_3_1_1)
    client.send(Connect(client_id="leaving", protocol_level=MQTT_3_1_1, protocol_name="MQTT", keep_alive=0))
    client.drop()
    assert len(cancelled) == 1 and broker.service.connections == set()
    assert failures_logged(logged) == []


def test_a_hook_that_never_answers_refuses_after_hook_timeout(logged: Sequence[LogEvent]) -> None:
    """Its client is not held for ever, reading nothing: the handler is cancelled, and the
    operation refused as when a handler fails."""
    broker = MemoryBroker(hook_timeout=5)
    cancelled = []
    broker.hooks.on_connect(lambda client: Deferred(cancelled.append) if client.client_id == "stuck" else None)
    client = broker.client(version=MQTT_3_1_1)
    client.send(Connect(client_id="stuck", protocol_level=MQTT_3_1_1, protocol_name="MQTT", keep_alive=0))
    broker.advance(4.9)
    assert client.received() == []
    broker.advance(0.1)
    assert client.received() == [Connack(reason_code=3)] and len(cancelled) == 1  # 0x80: "server unavailable" in 3.1.1
    assert any(event.get("event") == "connect" and "failed; refusing" in event.get("log_format", "")
               for event in logged)
    assert broker.connect("free", version=MQTT_3_1_1)  # the others go on


def test_stopping_the_broker_stops_waiting_for_hooks(logged: Sequence[LogEvent]) -> None:
    """No timer of a hook's wait is left in the reactor (trial calls that a dirty reactor), and
    an answer that comes after the stop routes nothing (the store is closed then)."""
    broker = MemoryBroker(hook_timeout=30)
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    sub = broker.connect("sub", version=MQTT_3_1_1)
    sub.subscribe("t")
    broker.connect("pub", version=MQTT_3_1_1).send(Publish(topic="t", payload=b"late"))
    assert broker.reactor.getDelayedCalls()
    broker.service.stopService()
    broker.advance(broker.service.config.close_linger)  # the connections' closes are done
    assert pending[0].called and not broker.reactor.getDelayedCalls()
    assert sub.received() == [] and not [event for event in logged if "log_failure" in event]


def test_a_slow_hook_does_not_count_as_the_clients_silence() -> None:
    """While a hook decides, nothing is read from the client, its PINGREQs neither: its keepalive
    does not lapse for that."""
    broker = MemoryBroker(hook_timeout=60)
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    client = broker.connect("c", version=MQTT_3_1_1, keep_alive=10)
    client.send(Publish(topic="t", payload=b"slow"))
    for _ in range(4):
        broker.advance(10)
        client.send(Pingreq())
    assert not client.closed
    pending[0].callback(None)
    assert [type(p) for p in client.received()] == [Pingresp] * 4


def test_a_client_is_not_timed_out_just_after_a_slow_connect_hook_accepts_it() -> None:
    """A connect hook takes 29 s; the client (keepalive 10) waits for its CONNACK. Its silence
    counts from then, not from its CONNECT: it was closed 1 s after the CONNACK [MQTT-3.1.2-24]."""
    broker = MemoryBroker()
    pending: list[Deferred[Any]] = []
    broker.hooks.on_connect(lambda client: pending.append(Deferred()) or pending[-1])
    client = broker.client()
    assert client.connect("c", keep_alive=10) is None
    broker.advance(29)
    pending[0].callback(True)
    [connack] = client.received()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    broker.advance(14)
    assert not client.closed, client.received()
    broker.advance(1)
    assert client.closed


def test_a_client_is_not_timed_out_as_its_hook_times_out() -> None:
    """Keepalive 10 and hook_timeout 30: the hook times out in the turn the keepalive fell due
    (1.5 x 10 x 2), before the PINGREQs held in the paused socket could be read: the client was
    closed for 30 s of "silence"."""
    broker = make_broker(hook_timeout=30)
    broker.startService()
    broker.hooks.on_publish(lambda client, message: Deferred())  # never answers
    client = FakeClient(broker, version=MQTT_5)
    client.connect("c", keep_alive=10)
    client.send(Publish(topic="t", payload=b"x", qos=1, packet_id=1))
    held = 0  # PINGREQs sent and left in the socket while the broker reads nothing
    for second in range(1, 41):
        broker.clock.advance(1)
        if second % 10 == 0:
            held += 1
        if held and client.transport.producerState != "paused" and not client.closed:
            client.send(*[Pingreq()] * held)
            held = 0
    assert not client.closed, client.received()
    assert [type(p) for p in client.received()] == [Puback] + [Pingresp] * 4


def test_an_unsubscribe_hook_is_shown_the_filter_a_replay_name_ends() -> None:
    """Unsubscribing from $replay/last:1/alerts/# ends alerts/#, which the hook keeps: it was
    shown the $replay/ name, and the subscription went."""
    broker = MemoryBroker()
    shown: list[str] = []
    broker.hooks.on_unsubscribe(lambda client, topic_filter: shown.append(topic_filter) or topic_filter != "alerts/#")
    client = broker.connect("c")
    assert client.subscribe("alerts/#").reason_codes == (0,)
    assert client.unsubscribe("$replay/last:1/alerts/#").reason_codes == (0x87,)
    assert shown == ["alerts/#"] and "alerts/#" in broker.service.sessions["c"].subscriptions


@pytest.mark.parametrize("answer", [-1, 3])
def test_a_subscribe_hook_answering_an_int_that_is_no_qos_refuses(answer: int) -> None:
    """-1 granted the QoS asked for (3 was refused)."""
    broker = MemoryBroker()
    broker.hooks.on_subscribe(lambda client, subscription: answer)
    client = broker.connect("c")
    assert client.subscribe("a", qos=1).reason_codes == (0x80,)
    assert "a" not in broker.service.sessions["c"].subscriptions


def test_subscribe_hook_refuses_and_downgrades() -> None:
    broker = MemoryBroker()
    broker.hooks.on_subscribe(lambda client, sub: False if sub.topic_filter == "secret" else 1)
    sub = broker.connect("sub", version=MQTT_3_1_1)
    sub.send(Subscribe(packet_id=3, subscriptions=(
        SubscriptionRequest(topic_filter="secret", qos=1), SubscriptionRequest(topic_filter="open", qos=2))))
    assert sub.received() == [Suback(packet_id=3, reason_codes=(0x80, 1))]


def test_failing_hook_is_contained(logged: Sequence[LogEvent]) -> None:
    broker = MemoryBroker()
    error = Boom("boom")

    def broken(client: Client, message: Message) -> None:
        raise error

    broker.hooks.on_publish(broken)
    sub = broker.connect("sub", version=MQTT_3_1_1)
    sub.subscribe("t")
    pub = broker.connect("pub", version=MQTT_3_1_1)
    assert pub.publish("t", b"x", qos=1) == Puback(packet_id=1)
    assert pub.received() == []
    assert sub.received() == [] and not pub.closed
    assert failures_logged(logged) == [error]


def test_disconnect_and_will_hooks() -> None:
    broker = MemoryBroker()
    events: list[tuple[str, bool]] = []
    broker.hooks.on_disconnect(lambda client, graceful: events.append((client.client_id, graceful)))
    broker.hooks.on_will(lambda client, message: False)
    watcher = broker.connect("w", version=MQTT_3_1_1)
    watcher.subscribe("will")
    broker.connect("a", version=MQTT_3_1_1, will=Will(topic="will", payload=b"x")).drop()
    broker.connect("b", version=MQTT_3_1_1).disconnect()
    assert events == [("a", False), ("b", True)]
    assert watcher.received() == []


@pytest.mark.parametrize("code", [ReasonCode.SUCCESS, ReasonCode.GRANTED_QOS_1, ReasonCode.BANNED])
def test_a_refusal_with_a_code_the_answer_cannot_carry_gets_the_default(code: ReasonCode) -> None:
    """A SUBACK may not say 0x8A, nor a success for a filter it refuses (the client would take
    it as granted); a CONNACK may not say 0 and close."""
    broker = MemoryBroker()
    broker.hooks.on_subscribe(lambda client, subscription: Refused(code))
    broker.hooks.on_unsubscribe(lambda client, topic_filter: Refused(code))
    client = broker.connect("c")
    assert client.subscribe("t").reason_codes == (ReasonCode.UNSPECIFIED_ERROR,)  # type: ignore[union-attr]
    assert broker.service.subscriptions_of("c") == []
    assert client.unsubscribe("t").reason_codes == (ReasonCode.NOT_AUTHORIZED,)  # type: ignore[union-attr]
    broker.hooks.on_connect(lambda client: Refused(code) if client.client_id == "other" else None)
    other = broker.client()
    connack = other.connect("other")
    assert connack is not None and connack.reason_code == (ReasonCode.BANNED if code == ReasonCode.BANNED else ReasonCode.NOT_AUTHORIZED)
    assert other.closed


def test_a_refusal_with_a_code_the_answer_cannot_carry_is_warned_of_once() -> None:
    broker = MemoryBroker()
    broker.hooks.on_subscribe(lambda client, subscription: Refused(ReasonCode.SERVER_MOVED))
    client = broker.connect("c")
    hooks_module._SAID.clear()  # (another test may have had the same said)
    with capturedLogs() as events:
        for _ in range(3):
            assert client.subscribe("t").reason_codes == (ReasonCode.UNSPECIFIED_ERROR,)  # type: ignore[union-attr]
    assert len([e for e in events if "cannot carry" in e.get("log_format", "")]) == 1


def test_a_message_changed_in_place_goes_out_changed_to_every_kind_of_subscriber() -> None:
    """Subscribers of the publisher's protocol and QoS got the bytes as received, the others the
    change: one message, two payloads."""
    broker = MemoryBroker()
    subscribers = [broker.connect(f"{version}-{qos}", version=version) for version in (MQTT_3_1_1, 5) for qos in (0, 1)]
    for subscriber, qos in zip(subscribers, (0, 1, 0, 1)):
        subscriber.subscribe("t", qos=qos)

    def shout(client: Client, message: Message) -> None:
        message.payload = message.payload.upper()

    broker.hooks.on_publish(shout)
    broker.connect("pub", version=MQTT_3_1_1).publish("t", b"quiet", qos=1)
    assert [[m.payload for m in s.messages()] for s in subscribers] == [[b"QUIET"]] * 4


@pytest.mark.parametrize("change", ["topic", "payload"])
def test_a_message_changed_in_place_into_one_that_cannot_be_sent_is_refused(change: str,
                                                                           logged: Sequence[LogEvent]) -> None:
    broker = MemoryBroker()
    watcher = broker.connect("watcher")
    watcher.subscribe("#")

    def spoil(client: Client, message: Message) -> None:
        if change == "topic":
            message.topic = "t/+"
        else:
            message.payload = "str"  # type: ignore[assignment]

    broker.hooks.on_publish(spoil)
    answer = broker.connect("pub").publish("t", b"x", qos=1)
    assert answer is not None and answer.reason_code == ReasonCode.UNSPECIFIED_ERROR
    assert watcher.messages() == []


@pytest.mark.parametrize("fields", [
    {"topic": "t/+/x"}, {"topic": ""}, {"topic": "$SYS/broker/x"}, {"topic": "t/\ud800"}, {"payload": "str"},
    {"qos": 3}, {"properties": {"no_such": 1}}, {"properties": {"topic_alias": 2}},
], ids=["wildcard", "empty", "sys", "surrogate", "str-payload", "qos-3", "unknown-property", "topic-alias"])
@pytest.mark.parametrize("qos", [0, 1])
def test_a_replacement_that_cannot_be_sent_is_refused(fields: dict[str, Any], qos: int,
                                                      logged: Sequence[LogEvent]) -> None:
    """Checked as a client's PUBLISH is: it went to subscribers with a wildcard in its topic, or
    into $SYS, or failed midway with the publisher left without an answer. (Compiled, a Message
    with a str payload cannot be made: the hook fails, which refuses too.)"""
    broker = MemoryBroker()
    watcher = broker.connect("watcher")
    watcher.subscribe("#")
    watcher.subscribe("$SYS/broker/x")
    handler = broker.hooks.on_publish(lambda client, message: Message(**{"topic": "t", "payload": b"x", **fields}))
    publisher = broker.connect("pub")
    answer = publisher.publish("t", b"original", qos=qos)
    assert (answer.reason_code if qos else answer) == (ReasonCode.UNSPECIFIED_ERROR if qos else None)  # type: ignore[union-attr]
    assert watcher.messages() == [] and not publisher.closed
    import mqtt_broker
    made = not (mqtt_broker.compiled and fields.get("payload") == "str")
    assert any(("cannot be sent" if made else "failed; refusing") in event.get("log_format", "") for event in logged)
    broker.hooks.remove("publish", handler)
    assert publisher.publish("t", b"fine", qos=1).reason_code == ReasonCode.SUCCESS  # type: ignore[union-attr]


def test_a_refusals_reason_string_goes_in_the_suback_and_the_unsuback() -> None:
    broker = MemoryBroker()
    broker.hooks.on_subscribe(lambda client, subscription: Refused(ReasonCode.NOT_AUTHORIZED, "not yours"))
    broker.hooks.on_unsubscribe(lambda client, topic_filter: Refused(reason_string="keep it"))
    client = broker.connect("c")
    suback = client.subscribe("a", "b")
    assert suback is not None and suback.properties == {"reason_string": "not yours"}
    unsuback = client.unsubscribe("a")
    assert unsuback is not None and unsuback.properties == {"reason_string": "keep it"}
    quiet = broker.connect("quiet", properties={"request_problem_information": 0})  # [MQTT-3.1.2-29]
    assert quiet.subscribe("a").properties == {}  # type: ignore[union-attr]


def test_a_packet_sent_right_after_connect_waits_for_two_decisions_in_turn() -> None:
    """The CONNECT waits for one decision (an auth hook here; the password file's check in the
    thread pool, or a cluster's claim, alike), then for the connect hook's: the SUBSCRIBE the
    client sent without waiting for its CONNACK (allowed, §3.1.4) is read once both have
    answered. It was read as soon as the first had, while the CONNECT was still being decided,
    and the client was closed without a CONNACK."""
    broker = MemoryBroker()
    auth: list[Deferred[None]] = []
    connect: list[Deferred[None]] = []
    broker.hooks.on_auth(lambda client, method, data, again: auth.append(Deferred()) or auth[-1])
    broker.hooks.on_connect(lambda client: connect.append(Deferred()) or connect[-1])
    client = broker.client()
    client.send(Connect(protocol_level=5, client_id="c", properties={"authentication_method": "m"}),
                Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
    auth[0].callback(None)
    broker.flush()
    assert connect and not client.closed and client.received() == []
    connect[0].callback(None)
    assert [type(p) for p in client.received()] == [Connack, Suback]


def test_a_message_a_publish_hook_makes_is_still_its_publishers() -> None:
    """A Message the hook returns in place of the PUBLISH is the client's: a No Local
    subscription of the publisher does not get it [MQTT-3.8.3-3]."""
    broker = MemoryBroker()
    broker.hooks.on_publish(lambda client, message: Message(topic=message.topic, payload=message.payload.upper()))
    me = broker.connect("me")
    me.subscribe("t", qos=1, no_local=True)
    other = broker.connect("other")
    other.subscribe("t", qos=1)
    me.publish("t", b"abc", qos=1)
    assert [m.payload for m in other.messages()] == [b"ABC"]
    assert me.messages() == []


def test_a_will_a_will_hook_makes_is_still_its_clients() -> None:
    """Taken over, a connection's will goes: not to its own session's No Local subscription,
    whichever message the will hook answers with [MQTT-3.8.3-3]."""
    broker = MemoryBroker()
    broker.hooks.on_will(lambda client, message: Message(topic=message.topic, payload=b"made", qos=1))
    first = broker.connect("c", clean_start=False, properties={"session_expiry_interval": 60},
                           will=Will(topic="w", payload=b"gone", qos=1))
    first.subscribe("w", qos=1, no_local=True)
    watcher = broker.connect("watcher")
    watcher.subscribe("w", qos=1)
    again = broker.client()
    again.connect("c", clean_start=False, properties={"session_expiry_interval": 60})
    assert first.closed
    assert [m.payload for m in watcher.messages()] == [b"made"]
    assert again.messages() == []


def test_a_message_a_publish_hook_answers_with_each_time_goes_out_each_time() -> None:
    """A hook may answer with one Message it keeps (a constant "redacted" one): the broker routes
    a copy, and writes nothing of one publish on it. It wrote its routing on the hook's Message:
    the expiry time the first publish gave it dropped every publish 60 s later as expired (0x10),
    and a queue that once turned it away had every later publish told 0x97."""
    redacted = Message("alerts/redacted", b"-", qos=1, properties={"message_expiry_interval": 60})
    broker = MemoryBroker(sys_interval=0, max_queued_messages=1)
    broker.hooks.on_publish(lambda client, message: redacted if message.topic.startswith("secret/") else None)
    slow = broker.connect("slow", clean_start=False, properties={"session_expiry_interval": 600})
    slow.subscribe("alerts/#", qos=1)
    slow.drop()
    sensor = broker.connect("sensor")
    sensor.publish("alerts/x", b"fills the queue of slow", qos=1)
    full = sensor.publish("secret/a", b"1", qos=1)
    assert full is not None and full.reason_code == ReasonCode.QUOTA_EXCEEDED, full
    slow = broker.connect("slow", clean_start=False, properties={"session_expiry_interval": 600})
    assert [m.payload for m in slow.messages()] == [b"fills the queue of slow"]
    for seconds in (0, 120):
        broker.advance(seconds)
        later = sensor.publish("secret/b", b"2", qos=1)
        assert later is not None and later.reason_code == ReasonCode.SUCCESS, (seconds, later)
        assert [(m.topic, m.properties.get("message_expiry_interval")) for m in slow.messages()] == [
            ("alerts/redacted", 60)]
    assert (redacted.sender, redacted.expires_at, redacted.refused, redacted.encoded) == (None, None, 0, None)
    assert redacted.properties == {"message_expiry_interval": 60}


def test_a_will_a_will_hook_answers_with_each_time_goes_out_each_time_with_its_expiry() -> None:
    """The expiry time the first will was given stayed on the hook's Message: a later will went
    out with a Message Expiry Interval of 0, or not at all."""
    offline = Message("status/offline", b"gone", qos=1, properties={"message_expiry_interval": 60})
    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_will(lambda client, message: offline)
    watcher = broker.connect("watcher")
    watcher.subscribe("status/#", qos=1)
    for n in range(2):
        broker.connect(f"device{n}", will=Will(topic=f"will/device{n}", payload=b"x")).drop()
        assert [(m.topic, m.properties.get("message_expiry_interval")) for m in watcher.messages()] == [
            ("status/offline", 60)], n
        broker.advance(120)
    assert (offline.sender, offline.expires_at, offline.encoded) == (None, None, None)


def test_stopping_while_a_publish_hook_decides_acknowledges_nothing() -> None:
    """MQTT 3.1.1 has no refusal: a PUBACK says the broker took the message over, and the client
    would not send it again. The stop leaves the message unacknowledged instead, for the client
    to send again when it reconnects [MQTT-4.4.0-1]."""
    broker = MemoryBroker()
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    publisher = broker.connect("pub", version=MQTT_3_1_1, clean_start=False)
    assert publisher.publish("t", b"x", qos=1) is None  # the hook decides
    broker.service.stopService()
    assert [p for p in publisher.received() if isinstance(p, Puback)] == []


def test_a_will_hook_the_stop_calls_is_not_waited_for_past_the_stop() -> None:
    """Closing the connections at the stop calls the will hooks: their waits end with the stop
    (no timer of theirs left, and no will routed into the sessions or the store after it)."""
    broker = MemoryBroker(hook_timeout=30)
    pending: list[Deferred[None]] = []
    broker.hooks.on_will(lambda client, message: pending.append(Deferred()) or pending[-1])
    watcher = broker.connect("watcher", properties={"session_expiry_interval": 100})
    watcher.subscribe("w", qos=1)
    broker.connect("c", will=Will(topic="w", payload=b"gone", qos=1))
    stopped = broker.service.stopService()
    broker.advance(broker.service.config.close_linger)
    assert stopped.called and pending
    assert not broker.reactor.getDelayedCalls()
    assert all(d.called for d in pending)  # (cancelled)
    assert not broker.service.sessions["watcher"].queue


# --- what a publish or will hook makes, checked as a PUBLISH ------------------------------------

def _add_unknown_property(client: Client, message: Message) -> None:
    """A change in place that no PUBLISH can carry."""
    message.properties["no_such"] = 1  # type: ignore[index]


def test_a_property_added_in_place_that_cannot_be_sent_is_refused_not_an_internal_error() -> None:
    """Not checked, it was routed, and encoding it for the MQTT 5 subscriber failed: the publisher
    was disconnected (0x83), and sent it again on reconnecting, to be disconnected again."""
    broker = MemoryBroker()
    subscriber = broker.connect("sub")
    subscriber.subscribe("t", qos=1)
    pending: list[Deferred[None]] = []

    def hook(client: Client, message: Message) -> Deferred[None]:
        _add_unknown_property(client, message)
        pending.append(Deferred())
        return pending[-1]

    broker.hooks.on_publish(hook)
    publisher = broker.connect("pub")
    with capturedLogs():
        assert publisher.publish("t", b"x", qos=1, properties={"user_property": [("k", "v")]}) is None
        pending[0].callback(None)
        answers = publisher.received()
    assert not any(isinstance(p, Disconnect) for p in answers), answers
    assert answers == [Puback(packet_id=1, reason_code=ReasonCode.UNSPECIFIED_ERROR)]
    assert not publisher.closed
    assert subscriber.messages() == []


def test_a_property_added_in_place_does_not_leave_a_retained_message_no_subscriber_can_get() -> None:
    """Kept retained, it failed every SUBSCRIBE that matched it."""
    broker = MemoryBroker()
    broker.hooks.on_publish(_add_unknown_property)
    publisher = broker.connect("pub")
    with capturedLogs():
        answer = publisher.publish("t", b"x", qos=1, retain=True, properties={"user_property": [("k", "v")]})
    assert answer is not None and answer.reason_code == ReasonCode.UNSPECIFIED_ERROR, answer
    assert broker.service.retained.get("t") is None
    subscriber = broker.connect("sub")
    try:
        suback = subscriber.subscribe("t", qos=1)
    except KeyError as e:  # (the memory transport hands the exception back; TCP closes the connection)
        raise AssertionError(f"subscribing to the topic fails: {e!r}") from e
    assert suback is not None and suback.reason_codes == (1,)
    assert not subscriber.closed


def test_a_publish_hook_rewriting_to_a_share_topic_is_refused_as_a_clients_publish_is() -> None:
    """Retained, it was kept under a topic no subscription can match."""
    broker = MemoryBroker()
    broker.hooks.on_publish(lambda client, message: dataclasses.replace(message, topic="$share/g/t"))
    publisher = broker.connect("pub")
    with capturedLogs():
        answer = publisher.publish("x", b"v", qos=1, retain=True)
    assert answer is not None and answer.reason_code == ReasonCode.UNSPECIFIED_ERROR, answer
    assert broker.service.retained.get("$share/g/t") is None


def test_a_will_hook_rewriting_to_a_share_topic_publishes_nothing() -> None:
    broker = MemoryBroker()
    broker.hooks.on_will(lambda client, message: dataclasses.replace(message, topic="$share/g/w"))
    client = broker.connect("c", will=Will(topic="w", payload=b"gone", retain=True))
    with capturedLogs():
        client.drop()
    stats: Any = broker.service.stats
    assert broker.service.retained.get("$share/g/w") is None
    assert stats.wills_published == 0


def _set_qos_in_place(client: Any, message: Message) -> None:
    message.qos = 3  # a change in place that no PUBLISH can carry


def test_a_qos_changed_in_place_that_no_publish_can_carry_is_refused() -> None:
    """Checked again only when its topic, payload or properties changed, a message of QoS 3 was
    routed and retained."""
    broker = MemoryBroker()
    subscriber = broker.connect("sub")
    subscriber.subscribe("t", qos=2)
    broker.hooks.on_publish(_set_qos_in_place)
    publisher = broker.connect("pub")
    with capturedLogs():
        answer = publisher.publish("t", b"x", qos=1, retain=True)
    assert answer is not None and answer.reason_code == ReasonCode.UNSPECIFIED_ERROR, answer
    assert broker.service.retained.get("t") is None


@pytest.mark.parametrize("reason", ["no\x00pe", "a\udc80b", "not allowed: {}"])
def test_a_hooks_reason_string_that_cannot_be_sent_as_it_is_is_made_sendable(reason: str) -> None:
    """Three refused 25,000-byte filters quoted in their reasons: the joined reason string, over
    65,535 bytes, failed to encode, and the client was dropped (0x83, "internal error") without
    its SUBACK; a U+0000 went out as it was (a malformed SUBACK), a lone surrogate dropped it."""
    broker = MemoryBroker()
    broker.hooks.on_subscribe(lambda client, subscription: Refused(
        ReasonCode.NOT_AUTHORIZED, reason.format(subscription.topic_filter)))
    client = broker.connect("c")
    suback = client.subscribe(*[f"{i}/" + "x" * 25_000 for i in range(3)])
    assert isinstance(suback, Suback) and suback.reason_codes == (0x87, 0x87, 0x87)
    said = suback.properties["reason_string"]
    assert "\0" not in said and len(said.encode()) <= 65535 and not client.closed


# --- hooks: Refused with an error code written as an int ----------------------------------------

@pytest.mark.parametrize("version, expected", [(4, 3), (5, 0x97)])
def test_a_connect_hook_refusing_with_an_int_code_is_answered_with_a_connack(version: int, expected: int) -> None:
    """docs/embedding.md: "an error code (a ReasonCode or an int of 0x80 or more) refuses with it"
    and "a mistake in a hook lets no one in" (refused, 0x80, logged). ``Refused(0x97, ...)`` is
    taken by the publish, subscribe and unsubscribe hooks (0x97 in the PUBACK, SUBACK, UNSUBACK);
    from a connect hook, connecting._refuse calls ``reason.name`` on the int: AttributeError out
    of dataReceived (with a Deferred: "error handling a packet", closed without a CONNACK)."""
    from mqtt_broker import Refused
    from mqtt_broker.testing import MemoryBroker

    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_connect(lambda client: Refused(0x97, "quota"))
    client = broker.client(version)
    try:
        connack = client.connect("c")
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the CONNECT was not answered: {type(e).__name__}: {e}")
    assert connack is not None and connack.reason_code == expected


def test_an_auth_hook_refusing_a_re_authentication_with_an_int_code_disconnects_with_it() -> None:
    """The same for a re-authentication: MQTTProtocol.drop tallies ``reason.name``."""
    from mqtt_broker import Refused
    from mqtt_broker.testing import MemoryBroker
    from mqtt_broker.wire import Auth, Disconnect

    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_auth(lambda client, method, data, again: Refused(0x87, "no") if again else None)
    client = broker.client()
    client.connect("c", properties={"authentication_method": "M"})
    try:
        client.send(Auth(reason_code=0x19, properties={"authentication_method": "M"}))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the re-authentication was not answered: {type(e).__name__}: {e}")
    assert [p.reason_code for p in client.received() if isinstance(p, Disconnect)] == [0x87]


@pytest.mark.parametrize("event", ["publish", "subscribe"])
def test_a_refusal_whose_reason_string_is_not_a_str_refuses_and_keeps_the_connection(event: str) -> None:
    """docs/embedding.md: an answer the hook may not give "refuses too, with 0x80, and is logged,
    as a handler that raises is: a mistake in a hook lets no one in". A ``Refused`` whose reason
    string is not a str (an int, bytes) reaches ``sendable(reason_string)``: AttributeError or
    TypeError out of dataReceived (publish, connect) or "error handling a packet" and the
    connection dropped as an internal error (subscribe, unsubscribe) -- a QoS 1 publisher then
    resends the same PUBLISH after every reconnect, and is dropped every time."""
    from mqtt_broker import Refused, ReasonCode
    from mqtt_broker.testing import MemoryBroker

    broker = MemoryBroker(sys_interval=0)
    getattr(broker.hooks, "on_" + event)(lambda *args: Refused(ReasonCode.NOT_AUTHORIZED, 42))
    client = broker.connect("c")
    try:
        answer = client.publish("t", b"x", qos=1) if event == "publish" else client.subscribe("t")
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the {event.upper()} was not answered: {type(e).__name__}: {e}")
    assert answer is not None
    codes = [answer.reason_code] if event == "publish" else list(answer.reason_codes)  # type: ignore[union-attr]
    assert all(code >= 0x80 for code in codes) and not client.closed


# --- hooks: a message a publish hook made that no PUBLISH can carry -----------------------------

def _topic_an_int(message: object) -> object:
    import dataclasses
    return dataclasses.replace(message, topic=5)  # type: ignore[type-var]


def _properties_a_list(message: object) -> object:
    import dataclasses
    return dataclasses.replace(message, properties=[("content_type", "x")])  # type: ignore[type-var]


def _topic_an_int_in_place(message: object) -> None:
    message.topic = 5  # type: ignore[attr-defined]


@pytest.mark.parametrize("hook", [_topic_an_int, _properties_a_list, _topic_an_int_in_place])
def test_a_made_message_no_publish_can_carry_is_refused_not_an_error(hook: object) -> None:
    """docs/embedding.md, on_publish: "a message that no PUBLISH can carry (...), made or changed
    in place, is logged and refused (0x80)". message.unsendable checks the payload's and the
    QoS's types but calls valid_topic_name(topic) and properties.get(...) outside its try: a
    topic that is not a str, or properties that are not a mapping, raise TypeError or
    AttributeError out of dataReceived (pure-Python build; compiled, the hook itself raises
    TypeError, which refuses)."""
    from mqtt_broker.testing import MemoryBroker

    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_publish(lambda client, message: hook(message))  # type: ignore[operator]
    client = broker.connect("c")
    try:
        puback = client.publish("t", b"x", qos=1)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the PUBLISH was not answered: {type(e).__name__}: {e}")
    assert puback is not None and puback.reason_code == 0x80 and not client.closed


def test_an_auth_hooks_identity_with_an_expiry_that_is_not_a_number_refuses() -> None:
    """on_auth: "an Identity authenticates as it, its rules and expires_at replacing the
    connection's"; a mistake in a hook "lets no one in" (refused, logged). An Identity whose
    expires_at is not a number reaches ``expires_at - clock.seconds()`` in _watch_expiry:
    TypeError out of dataReceived, the CONNECT never answered."""
    from mqtt_broker.auth import Identity
    from mqtt_broker.testing import MemoryBroker

    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_auth(lambda client, method, data, again: Identity(client_id="c", username=None,
                                                                      expires_at="tomorrow"))  # type: ignore[arg-type]
    client = broker.client()
    try:
        connack = client.connect("c", properties={"authentication_method": "M"})
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the CONNECT was not answered: {type(e).__name__}: {e}")
    assert connack is not None and connack.reason_code >= 0x80


@pytest.mark.parametrize("expires_at", [10**400, -10**400])
def test_an_auth_hooks_identity_with_an_expiry_no_float_can_hold_refuses(expires_at: int,
                                                                        logged: Sequence[LogEvent]) -> None:
    """An int is a time an Identity may give, but one too large for a float raised OverflowError
    out of the check of the answer (math.isfinite), and so out of the connection's dataReceived."""
    from mqtt_broker.auth import Identity

    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_auth(lambda client, method, data, again: Identity(client_id="c", username=None,
                                                                      expires_at=expires_at))
    connack = broker.client().connect("c", properties={"authentication_method": "M"})
    assert connack is not None and connack.reason_code == ReasonCode.UNSPECIFIED_ERROR
    assert any("not an answer it may give" in event.get("log_format", "") for event in logged)


def test_an_auth_hooks_identity_with_a_lone_surrogate_refuses(logged: Sequence[LogEvent]) -> None:
    """A user name a hook took from JSON ("\\ud800") is no MQTT string [MQTT-1.5.4-1], and the
    store could not write it (a delayed will's row), which held up every write after it."""
    from mqtt_broker.auth import Identity

    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_auth(lambda client, method, data, again: Identity(client_id="c", username="\ud800"))
    connack = broker.client().connect("c", properties={"authentication_method": "M"})
    assert connack is not None and connack.reason_code == ReasonCode.UNSPECIFIED_ERROR
    assert any("not an answer it may give" in event.get("log_format", "") for event in logged)


# --- docs/embedding.md, the on_publish row of the hooks table ----------------------------------

def _publish_through(change: Any) -> tuple[Any, list[Any]]:
    """A QoS 1 PUBLISH of an MQTT 5 client whose publish hook changes the message in place with
    ``change``: (the PUBACK's reason code, or the exception the publish raised; what a subscriber got)."""
    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_publish(lambda client, message: change(message))
    subscriber = broker.connect("subscriber")
    subscriber.subscribe("t", qos=2)
    publisher = broker.connect("publisher")
    try:
        answer: Any = publisher.publish("t", b"x", qos=1).reason_code  # type: ignore[union-attr]
    except Exception as e:  # (an exception out of the broker's dataReceived)
        answer = e
    return answer, subscriber.messages()


def test_a_publish_hook_setting_a_float_qos_in_place_is_refused_with_0x80() -> None:
    """docs/embedding.md: a message that no PUBLISH can carry, "made or changed in place, is
    logged and refused (0x80)" (``unsendable`` says "QoS 1.0" of it). Set in place to 1.0, equal
    to the QoS received, the change is not seen (``message.qos != qos_received``): the message is
    routed unchecked and its delivery raises TypeError out of the publisher's dataReceived (in
    the pure-Python build; the compiled Message refuses the float at once)."""
    answer, delivered = _publish_through(lambda message: setattr(message, "qos", 1.0))
    assert answer == 0x80, f"expected PUBACK 0x80, got {answer!r} (delivered: {delivered!r})"


def test_a_publish_hook_setting_an_int_retain_flag_in_place_is_refused_with_0x80() -> None:
    """The same for ``message.retain = 1``, which the page names (compiled: TypeError, which
    refuses; ``unsendable``: "retain flag not of its type"). The publish path does not look at
    ``retain`` when it decides whether the hook changed the message: the pure build routes it
    and keeps it as the topic's retained message."""
    answer, delivered = _publish_through(lambda message: setattr(message, "retain", 1))
    assert answer == 0x80, f"expected PUBACK 0x80, got {answer!r} (delivered: {delivered!r})"


def test_a_publish_hook_setting_an_int_dup_flag_in_place_is_refused_with_0x80() -> None:
    """As an int retain flag is, in both builds: the compiled Message takes only a bool (TypeError,
    which refuses); the pure-Python build routed the message."""
    answer, delivered = _publish_through(lambda message: setattr(message, "dup", 1))
    assert answer == 0x80, f"expected PUBACK 0x80, got {answer!r} (delivered: {delivered!r})"


@pytest.mark.parametrize("field, value", [("sender", 5), ("sender", b"publisher"), ("cluster_id", "id"),
                                          ("packet_id", None), ("frame", "s"), ("refused", 1.5), ("encoded", 5)])
def test_a_publish_hook_setting_another_field_to_a_value_not_of_its_type_is_refused_with_0x80(field: str,
                                                                                               value: Any) -> None:
    """docs/embedding.md: the fields of a hook's Message "take only the types they are declared
    with" (compiled: TypeError as it is set, which refuses), and "the pure-Python build refuses
    such a message too (0x80, logged)". It did for the topic, payload, QoS, flags, properties and
    expiry only: a sender, cluster id, packet id, frame or count of a wrong type was routed (a
    refused count of 1.5 answered 0x97), and a non-dict ``encoded`` raised AttributeError out of
    the publisher's dataReceived."""
    answer, delivered = _publish_through(lambda message: setattr(message, field, value))
    assert answer == 0x80, f"expected PUBACK 0x80, got {answer!r} (delivered: {delivered!r})"


@pytest.mark.parametrize("field, value", [("sender", 5), ("cluster_id", "id"), ("refused", None)])
def test_a_will_hook_setting_a_field_to_a_value_not_of_its_type_publishes_nothing(field: str, value: Any) -> None:
    """The same of a will: the pure-Python build published it."""
    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_will(lambda client, message: setattr(message, field, value))
    subscriber = broker.connect("subscriber")
    subscriber.subscribe("w")
    client = broker.connect("c", will=Will(topic="w", payload=b"gone"))
    with capturedLogs():
        client.drop()
    assert subscriber.messages() == []


class _QoS(enum.IntEnum):
    AT_MOST_ONCE = 0
    EXACTLY_ONCE = 2


@pytest.mark.parametrize("qos, expected", [(True, 1), (_QoS.EXACTLY_ONCE, 2), (_QoS.AT_MOST_ONCE, 0)],
                         ids=["True", "IntEnum-2", "IntEnum-0"])
def test_a_publish_hook_setting_a_bool_or_int_enum_qos_has_the_message_go_at_its_int(qos: Any, expected: int) -> None:
    """docs/embedding.md: as the compiled Message makes it when it is set; the pure-Python build
    refused the message (0x80)."""
    answer, delivered = _publish_through(lambda message: setattr(message, "qos", qos))
    assert answer == ReasonCode.SUCCESS, f"expected PUBACK 0, got {answer!r}"
    assert [(m.payload, m.qos) for m in delivered] == [(b"x", expected)]


def _correlation_data_in_place(data: Any) -> Any:
    def hook(client: Client, message: Message) -> None:
        message.properties["correlation_data"] = data
    return hook


def _correlation_data_replaced(data: Any) -> Any:
    return lambda client, message: dataclasses.replace(message, properties={"correlation_data": data})


@pytest.mark.parametrize("event", ["publish", "will"])
@pytest.mark.parametrize("answer", [_correlation_data_in_place, _correlation_data_replaced], ids=["in-place", "replaced"])
@pytest.mark.parametrize("data", [lambda given: given, memoryview], ids=["bytearray", "memoryview"])
def test_a_hooks_correlation_data_of_another_bytes_type_goes_out_as_bytes_of_its_own(
        event: str, answer: Any, data: Any) -> None:
    """docs/embedding.md. Compiled, the message was refused ("bytes object expected"); pure, it
    went out, and the retained message kept the hook's bytearray, which a change after changed."""
    broker = MemoryBroker(sys_interval=0)
    given = bytearray(b"id-1")
    getattr(broker.hooks, "on_" + event)(answer(data(given)))
    subscriber = broker.connect("subscriber")
    subscriber.subscribe("t", qos=1)
    properties = {"content_type": "a"}
    if event == "publish":
        ack = broker.connect("publisher").publish("t", b"x", qos=1, retain=True, properties=properties)
        assert ack is not None and ack.reason_code == ReasonCode.SUCCESS, ack
    else:
        broker.connect("dying", will=Will(topic="t", payload=b"x", qos=1, retain=True, properties=properties)).drop()
    assert [m.properties["correlation_data"] for m in subscriber.messages()] == [b"id-1"]
    given[:] = b"gone"
    late = broker.connect("late")
    late.subscribe("t", qos=1)
    assert [m.properties["correlation_data"] for m in late.messages()] == [b"id-1"]


@pytest.mark.parametrize("expires_at", [lambda now: now * 1000, lambda now: now + 2**32, lambda now: 10**400,
                                        lambda now: math.inf, lambda now: -math.inf, lambda now: math.nan,
                                        lambda now: str(now + 10)],
                         ids=["milliseconds", "past-interval", "huge-int", "inf", "-inf", "nan", "str"])
@pytest.mark.parametrize("event", ["publish", "will"])
def test_a_hooks_expiry_no_message_expiry_interval_can_carry_is_refused(expires_at: Any, event: str,
                                                                        logged: Sequence[LogEvent]) -> None:
    """docs/embedding.md: a message that no PUBLISH can carry is logged and refused (0x80). Its
    delivery to an MQTT 5 subscriber raised struct.error (or OverflowError, ValueError) out of the
    publisher's dataReceived: no PUBACK, the subscribers after it not reached; retained, out of
    every SUBSCRIBE that matched it after, which dropped the subscriber."""
    broker = MemoryBroker(sys_interval=0)

    def expire(client: Client, message: Message) -> None:
        message.expires_at = expires_at(broker.reactor.seconds())

    getattr(broker.hooks, "on_" + event)(expire)
    subscriber = broker.connect("subscriber")
    subscriber.subscribe("t", qos=1)
    with capturedLogs():  # (compiled, a str is refused as it is set: the hook fails)
        if event == "publish":
            ack = broker.connect("publisher").publish("t", b"x", qos=1, retain=True)
            assert ack is not None and ack.reason_code == ReasonCode.UNSPECIFIED_ERROR, ack
        else:
            broker.connect("dying", will=Will(topic="t", payload=b"x", qos=1, retain=True)).drop()
    assert subscriber.messages() == [] and not subscriber.closed
    assert broker.service.retained.get("t") is None
    late = broker.connect("late")
    late.subscribe("t", qos=1)
    assert late.messages() == [] and not late.closed


@pytest.mark.parametrize("event", ["publish", "will"])
def test_a_hooks_expiry_as_far_ahead_as_an_interval_can_carry_goes_out_with_the_time_left(event: str) -> None:
    broker = MemoryBroker(sys_interval=0)

    def expire(client: Client, message: Message) -> None:
        message.expires_at = broker.reactor.seconds() + 0xFFFFFFFF

    getattr(broker.hooks, "on_" + event)(expire)
    subscriber = broker.connect("subscriber")
    subscriber.subscribe("t", qos=1)
    if event == "publish":
        ack = broker.connect("publisher").publish("t", b"x", qos=1, retain=True)
        assert ack is not None and ack.reason_code == ReasonCode.SUCCESS, ack
    else:
        broker.connect("dying", will=Will(topic="t", payload=b"x", qos=1, retain=True)).drop()
    assert [m.properties["message_expiry_interval"] for m in subscriber.messages()] == [0xFFFFFFFF]
    broker.advance(10)
    late = broker.connect("late")
    late.subscribe("t", qos=1)
    assert [m.properties["message_expiry_interval"] for m in late.messages()] == [0xFFFFFFFF - 10]


@pytest.mark.parametrize("interval", [None, 100])
def test_a_publish_hooks_expiry_holds_whatever_interval_the_client_gave(interval: int | None) -> None:
    """The client's Message Expiry Interval was worked out again after the hook, over the expiry
    time the hook had set: a message the hook gave 5 s went out 10 s later."""
    broker = MemoryBroker(sys_interval=0)

    def shorten(client: Client, message: Message) -> None:
        message.expires_at = broker.reactor.seconds() + 5

    broker.hooks.on_publish(shorten)
    subscriber = broker.connect("subscriber", clean_start=False, properties={"session_expiry_interval": 600})
    subscriber.subscribe("t", qos=1)
    subscriber.disconnect()
    publisher = broker.connect("publisher")
    publisher.publish("t", b"lives 5 s", qos=1, properties={"message_expiry_interval": interval} if interval else None)
    publisher.publish("t", b"lives 5 s too", qos=1)
    broker.advance(4)
    subscriber = broker.connect("subscriber", clean_start=False, properties={"session_expiry_interval": 600})
    assert [m.properties["message_expiry_interval"] for m in subscriber.messages()] == [1, 1]
    subscriber.disconnect()
    publisher.publish("t", b"x", qos=1, properties={"message_expiry_interval": interval} if interval else None)
    broker.advance(6)
    subscriber = broker.connect("subscriber", clean_start=False, properties={"session_expiry_interval": 600})
    assert subscriber.messages() == []


@pytest.mark.parametrize("interval", [None, 10])
def test_a_publish_hooks_expiry_past_goes_nowhere_and_a_later_one_is_what_subscribers_are_told(
        interval: int | None) -> None:
    """A time already past went out (an interval of 0) when the client gave no interval; a time
    later than the client's interval was held, but subscribers were told the client's."""
    broker = MemoryBroker(sys_interval=0)
    hooked: list[float] = []
    broker.hooks.on_publish(lambda client, message: setattr(message, "expires_at", broker.reactor.seconds() + hooked.pop()))
    subscriber = broker.connect("subscriber", clean_start=False, properties={"session_expiry_interval": 600})
    subscriber.subscribe("t", qos=1)
    publisher = broker.connect("publisher")
    properties = {"message_expiry_interval": interval} if interval else None
    hooked.append(-10)
    ack = publisher.publish("t", b"expired", qos=1, properties=properties)
    assert ack is not None and ack.reason_code == ReasonCode.NO_MATCHING_SUBSCRIBERS, ack
    assert subscriber.messages() == []
    subscriber.disconnect()
    hooked.append(100)
    publisher.publish("t", b"lives 100 s", qos=1, properties=properties)
    broker.advance(50)
    subscriber = broker.connect("subscriber", clean_start=False, properties={"session_expiry_interval": 600})
    assert [m.properties["message_expiry_interval"] for m in subscriber.messages()] == [50]


def test_a_publish_hook_adding_a_property_in_place_has_it_go_out() -> None:
    """docs/embedding.md: "a `Message` replaces it (`dataclasses.replace(message, payload=...)`;
    a change in place goes out too)". A hook that adds a user property in place to a PUBLISH that
    came without properties (every MQTT 3 one) fails instead: the message's ``properties`` is the
    shared, immutable NO_PROPERTIES ("TypeError: NO_PROPERTIES is immutable"), so the hook
    counts as failed and the message is refused with 0x80."""
    def tag(client: Any, message: Any) -> None:
        message.properties["user_property"] = [("checked-by", "hook")]

    broker = MemoryBroker(sys_interval=0)
    broker.hooks.on_publish(tag)
    subscriber = broker.connect("subscriber")
    subscriber.subscribe("t", qos=1)
    publisher = broker.connect("publisher")
    answer = publisher.publish("t", b"x", qos=1)
    assert answer is not None and answer.reason_code == 0, answer
    assert [m.properties.get("user_property") for m in subscriber.messages()] == [[("checked-by", "hook")]]


@pytest.mark.parametrize("rewritten", [False, True])
def test_a_will_hook_adding_a_property_in_place_has_it_go_out(rewritten: bool) -> None:
    """A will hook is given a message whose properties it may add to in place, as a publish hook
    is, an MQTT 3 will or the Message an earlier hook answered with (made with Message(...)):
    their properties were the shared, immutable empty mapping, the hook failed and the will was
    not published at all."""
    broker = make_broker(sys_interval=0)
    if rewritten:
        broker.hooks.on_will(lambda client, message: Message(topic=message.topic, payload=b"rewritten", qos=0))

    def tag(client: Any, message: Any) -> None:
        message.properties["user_property"] = [("checked-by", "hook")]

    broker.hooks.on_will(tag)
    subscriber = connected(broker, "sub", version=5)
    subscriber.subscribe("will/#")
    dying = connected(broker, "dying", will=Will(topic="will/dying", payload=b"gone"))
    dying.lose()
    broker.reactor.advance(0)
    got = [p for p in subscriber.received() if isinstance(p, Publish)]
    assert [(p.payload, p.properties.get("user_property")) for p in got] == [
        (b"rewritten" if rewritten else b"gone", [("checked-by", "hook")])], got
