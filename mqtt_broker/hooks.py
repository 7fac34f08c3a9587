"""Event hooks: handlers for connect, publish, subscribe, unsubscribe, ping, disconnect and will.

Every handler may return a plain value, a Deferred or a coroutine; they run one after another
in registration order. Events nobody listens to cost the broker nothing: it checks
``hooks.has_publish`` (a plain attribute) before building anything for a hook.

Two kinds of events:

- deciders (connect, publish, subscribe, unsubscribe, ping, will) combine their handlers'
  answers: ``None`` or ``True`` lets the next handler decide, ``False`` refuses, and a few
  events take a richer answer (see each ``on_*``); an error code (a ReasonCode or an int of
  0x80 or more) refuses with it. The first refusal wins and later handlers are not called. A
  handler that raises or fails, or gives an answer its event does not take, refuses too (fail
  closed), and is logged.
- notifications (disconnect) only observe; every handler is called, failures are logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Callable, TypeVar
from weakref import WeakKeyDictionary

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .auth import Identity, lone_surrogate_in
from .auth.acl import AccessRules
from .message import Client, Message, is_time
from .topics import Subscription
from .wire.codes import DISCONNECT_CODES, PUBACK_CODES, ReasonCode
from .wire.packets import NO_PROPERTIES

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger()

Handler = TypeVar("Handler", bound=Callable[..., Any])

EVENTS = ("connect", "auth", "publish", "subscribe", "unsubscribe", "ping", "disconnect", "will")


@dataclass(frozen=True, slots=True)
class Refused:
    """A decider's refusal. A handler may return one to choose the reason code and the MQTT 5
    reason string the client is told; a plain False is ``Refused()``, and the event's default
    code applies (see each ``on_*``)."""

    reason_code: ReasonCode | None = None
    reason_string: str | None = None

    def code(self, default: ReasonCode, allowed: frozenset[int] | None = None) -> ReasonCode:
        """The code to refuse with, in a packet that may carry the ``allowed`` ones: a code it
        cannot carry (a success among them: the client would take it as one) gives ``default``."""
        code = self.reason_code
        if code is None:
            return default
        if allowed is not None and code not in allowed:
            said = (code, default, allowed)
            if said not in _SAID:  # once: a hook refuses the same way every time
                _SAID.add(said)
                log.warn("a hook refused with {code!r}, which this answer cannot carry; {default!r} instead "
                         "(said once)", code=code, default=default)
            return default
        return code


@dataclass(frozen=True, slots=True)
class Authenticated:
    """An auth hook's answer: authenticated, with Authentication Data for the client's last step
    (a SCRAM server-final message, MQTT 5 §4.12), sent in the CONNACK, or in the AUTH 0x00 that
    ends a re-authentication; with an ``identity``, as that one (as an Identity answer)."""

    data: bytes
    identity: Identity | None = None


_SAID: set[tuple[int, int, frozenset[int]]] = set()
"""What :meth:`Refused.code` has warned of, in this process: (code, default, the codes the
answer allows)."""


# The refusals each MQTT 5 answer may carry (MQTT 5.0 3.2.2.2, 3.4.2.1, 3.9.3, 3.11.3, 3.14.2.1).
CONNACK_REFUSALS: frozenset[int] = frozenset({*range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, *range(0x99, 0x9E), 0x9F})
PUBACK_REFUSALS: frozenset[int] = frozenset(code for code in PUBACK_CODES if code >= 0x80)
SUBACK_REFUSALS: frozenset[int] = frozenset({0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
UNSUBACK_REFUSALS: frozenset[int] = frozenset({0x80, 0x83, 0x87, 0x8F, 0x91})
DISCONNECT_REFUSALS: frozenset[int] = frozenset(code for code in DISCONNECT_CODES if code >= 0x80)


class Hooks:
    """The registry of event handlers of one broker."""

    def __init__(self, clock: IReactorTime | None = None, timeout: float = 0) -> None:
        self._handlers: dict[str, list[Callable[..., Any]]] = {event: [] for event in EVENTS}
        self._clock = clock
        self.timeout = timeout
        """Seconds a handler's Deferred may take (0: no limit, or no ``clock``); past it, it is
        cancelled, and refuses as a failed handler does."""
        self.has_connect = self.has_auth = self.has_publish = self.has_subscribe = False
        self.has_unsubscribe = self.has_ping = self.has_disconnect = self.has_will = False
        self._pending: set[Deferred[Any]] = set()
        """The broker's waits for handlers' Deferreds, cancelled when it stops."""
        self._waits: dict[Deferred[Any], dict[Deferred[Any], None]] = {}
        """Handlers' Deferreds not yet fired, with the waits on each, in the order they came (kept
        apart, not looked up in ``_pending``: a stop, or a slow authenticator's timeouts, gives
        up thousands at once)."""
        self._failures: WeakKeyDictionary[Deferred[Any], Failure] = WeakKeyDictionary()
        """Handlers' Deferreds that failed, with the failure (a wait took it from the Deferred)."""

    def _register(self, event: str, handler: Handler) -> Handler:
        self._handlers[event].append(handler)
        setattr(self, "has_" + event, True)
        return handler

    def remove(self, event: str, handler: Callable[..., Any]) -> None:
        """Call ``handler`` no more for ``event``, decisions under way included."""
        handlers = self._handlers[event]
        handlers.remove(handler)
        setattr(self, "has_" + event, bool(handlers))

    def on_connect(self, handler: Handler) -> Handler:
        """``handler(client) -> None | bool | ReasonCode | Refused``: a CONNECT that passed the
        protocol's checks (``client.properties`` has an MQTT 5 client's CONNECT properties): a
        decision, not yet a connection (the broker may still refuse it, and then no disconnect
        follows: ``on_disconnect`` comes only after a CONNACK that accepted it). False refuses
        with CONNACK "not authorized" (3.x: 5, 5.0: 0x87); a ReasonCode refuses with that code
        (3.x: the nearest return code)."""
        return self._register("connect", handler)

    def on_auth(self, handler: Handler) -> Handler:
        """``handler(client, method, data, reauthenticating) -> None | bool | Identity | bytes |
        Authenticated | Refused``:
        MQTT 5 enhanced authentication. Called with the Authentication Method and Data of the
        CONNECT and of every AUTH packet. None or True: authenticated. An
        :class:`~mqtt_broker.auth.Identity`: authenticated as that identity (for this client
        id), which replaces the connection's: its ``rules`` from the next operation on (``%c`` and
        ``%u`` in them replaced as in ``acl_file`` patterns), its ``expires_at`` for the timer
        that disconnects the client (re-authentication moves it; expired already, it refuses).
        Bytes (or a bytearray, a memoryview): continue, sending them to the client in an AUTH
        packet (0x18) and waiting for its answer. :class:`Authenticated`: authenticated, with
        data for the client's last step. False refuses (CONNACK 0x87, or DISCONNECT 0x87
        when re-authenticating). Without a handler, a CONNECT with an Authentication Method is
        refused with 0x8C."""
        return self._register("auth", handler)

    def on_publish(self, handler: Handler) -> Handler:
        """``handler(client, message) -> None | bool | Message | Refused``: a PUBLISH from a
        client, before it is routed. False drops it (it is still acknowledged, as MQTT 3 has no
        way to say no; MQTT 5 gets reason code 0x87); a Message replaces it for routing and
        later handlers (one no PUBLISH can carry is logged and refused, 0x80). The broker routes
        a copy of a Message of the hook's own, which it may answer with again."""
        return self._register("publish", handler)

    def on_subscribe(self, handler: Handler) -> Handler:
        """``handler(client, subscription) -> None | bool | int | Refused``: one filter of a
        SUBSCRIBE. False refuses the filter (SUBACK 0x80); a ReasonCode or Refused refuses with
        that code in MQTT 5 (0x80 in 3.x); an int 0..2 grants at most that QoS (the lowest of
        several handlers' answers). A shared subscription's ``topic_filter`` keeps its
        ``$share/{group}/`` prefix (``share_group`` is set): :func:`mqtt_broker.topics.split_shared`
        gives the filter it matches topics with."""
        return self._register("subscribe", handler)

    def on_unsubscribe(self, handler: Handler) -> Handler:
        """``handler(client, topic_filter) -> None | bool``: one filter of an UNSUBSCRIBE.
        False keeps the subscription (5.0: UNSUBACK 0x87 for that filter)."""
        return self._register("unsubscribe", handler)

    def on_ping(self, handler: Handler) -> Handler:
        """``handler(client) -> None | bool``: a PINGREQ. False sends no PINGRESP."""
        return self._register("ping", handler)

    def on_disconnect(self, handler: Handler) -> Handler:
        """``handler(client, graceful) -> None``: the connection ended, after the CONNACK that
        accepted it went (see ``on_connect``); ``graceful`` is True after
        a DISCONNECT packet that ends it without its will (reason code 0x00: not MQTT 5's 0x04,
        Disconnect with Will Message). A notification: the result is ignored, failures are logged."""
        return self._register("disconnect", handler)

    def on_will(self, handler: Handler) -> Handler:
        """``handler(client, message) -> None | bool | Message``: a will about to be published.
        False suppresses it; a Message replaces it (the broker routes a copy of one of the
        hook's own, which it may answer with again)."""
        return self._register("will", handler)

    # --- firing -------------------------------------------------------------------------

    def decide(self, event: str, *args: Any) -> Deferred[Any]:
        """Run a decider's handlers; fires with the last answer that was neither None nor True
        (of subscribe's QoS caps, the lowest), or with ``Refused`` at the first refusal. A
        handler's failure is logged and refuses."""
        result = self.resolve(event, *args)
        return result if isinstance(result, Deferred) else succeed(result)

    def resolve(self, event: str, *args: Any) -> Any:
        """:meth:`decide`, without a Deferred while every handler answers at once: the answer
        itself, or a Deferred from the first handler that answered with one (or a coroutine)."""
        transforms = event in _TRANSFORMING
        if transforms and isinstance(args[1], Message):
            own_properties(args[1])
        answer: Any = None
        current = self._handlers[event]
        handlers = tuple(current)  # a handler may remove itself, or add one
        for index, handler in enumerate(handlers):
            if handler not in current:  # (removed by an earlier one)
                continue
            call_args = (args[0], own_properties(answer)) if transforms and isinstance(answer, Message) else args
            try:
                value = handler(*call_args)
            except Exception:
                return _failed(Failure(), event, handler)  # type: ignore[no-untyped-call]
            if isinstance(value, (Deferred, CoroutineType)):
                pending = self._wait_for(value).addErrback(_failed, event, handler)
                return pending.addCallback(self._resume, event, args, handler, list(handlers[index + 1:]), answer)
            verdict = _judge(value, event, handler)
            if isinstance(verdict, Refused):
                return verdict
            if verdict is not None:
                answer = _together(event, answer, verdict)
        return answer

    def _resume(self, value: Any, event: str, args: tuple[Any, ...], answered: Callable[..., Any],
                rest: list[Callable[..., Any]], answer: Any) -> Any:
        """Go on with the handlers after one (``answered``) that answered with a Deferred."""
        verdict = _judge(value, event, answered)
        if isinstance(verdict, Refused):
            return verdict
        if verdict is not None:
            answer = _together(event, answer, verdict)
        handlers = self._handlers[event]
        rest = [h for h in rest if h in handlers]  # (removed meanwhile: not called)
        if not rest:
            return answer
        call_args = (args[0], own_properties(answer)) if event in _TRANSFORMING and isinstance(answer, Message) else args
        handler = rest[0]
        try:
            value = handler(*call_args)
        except Exception:
            return _failed(Failure(), event, handler)  # type: ignore[no-untyped-call]
        return self._wait_for(value).addCallbacks(
            self._resume, _failed, callbackArgs=(event, args, handler, rest[1:], answer), errbackArgs=(event, handler))

    def _wait_for(self, value: Any) -> Deferred[Any]:
        """A Deferred of the broker's own for a handler's answer. The handler's Deferred may be
        shared (one "ready" Deferred returned to every call): what it fires with reaches every
        wait, those that come after it fired too, and a value stays the handler's (a failure is
        taken from it, and each wait logs it). A handler that never answers would hold its client
        for ever, handling nothing of it: past ``timeout`` the wait is cancelled, and the
        handler's Deferred too once no other wait is on it."""
        theirs = maybeDeferred(lambda: value)
        failure = self._failures.get(theirs)
        if failure is not None:  # it failed, and the waits then took the failure
            return fail(failure)
        mine: Deferred[Any] = Deferred(partial(self._give_up, theirs))
        self._pending.add(mine)
        waits = self._waits.get(theirs)
        if waits is None:
            # One callback on theirs, however many waits come and give up before it fires.
            self._waits[theirs] = {mine: None}
            theirs.addBoth(self._answered, theirs)
        else:
            waits[mine] = None
        mine.addBoth(self._done, mine)
        if self.timeout and self._clock is not None and not mine.called:
            mine.addTimeout(self.timeout, self._clock)
        return mine

    def _answered(self, result: Any, theirs: Deferred[Any]) -> Any:
        waits = self._waits.pop(theirs, {})
        failed = isinstance(result, Failure)
        if failed:
            # Taken, or the Deferred would log it again when collected. Kept before the waits
            # hear of it: a wait their callbacks start on theirs finds it here too.
            self._failures[theirs] = result
        for mine in waits:
            if not mine.called:  # (one wait's answer may end another: its client gone with it)
                (mine.errback if failed else mine.callback)(result)
        if failed:
            # Heard (and logged) whole, it is kept without the frames it was raised through:
            # they hold theirs, the key it is weakly kept by, and with it the connection and what
            # its handler was asked about, for ever.
            _forget_frames(result.value)
            self._failures[theirs] = Failure(result.value, result.type)  # type: ignore[no-untyped-call]
        return None if failed else result

    def _give_up(self, theirs: Deferred[Any], mine: Deferred[Any]) -> None:
        waits = self._waits.get(theirs)
        if waits is not None:
            waits.pop(mine, None)
            if not waits:  # (the other waits keep theirs going)
                theirs.cancel()

    def _done(self, result: Any, mine: Deferred[Any]) -> Any:
        self._pending.discard(mine)
        return result

    def cancel_pending(self) -> None:
        """Stop waiting for handlers (the broker stops): each wait refuses what it was for."""
        for pending in list(self._pending):
            pending.cancel()

    def notify(self, event: str, *args: Any) -> None:
        """Call every handler of a notification; results are ignored, failures logged."""
        def failed(failure: Failure, handler: Callable[..., Any]) -> None:
            log.failure("{event} hook {handler!r} failed", failure, event=event, handler=handler)

        for handler in list(self._handlers[event]):
            maybeDeferred(handler, *args).addErrback(failed, handler)


_TRANSFORMING = frozenset({"publish", "will"})
"""Events whose handlers may replace the message that later handlers see."""


def own_properties(message: Message) -> Message:
    """``message``, with a properties dict of its own in place of the shared empty one, which
    is immutable: a publish or will hook may add to it in place."""
    if message.properties is NO_PROPERTIES:
        message.properties = {}
    return message


_ANSWERS: dict[str, tuple[type, ...]] = {
    "connect": (), "unsubscribe": (), "ping": (),
    "auth": (Identity, Authenticated, bytes, bytearray, memoryview), "publish": (Message,), "will": (Message,),
    "subscribe": (int,),  # (a QoS to grant at most: 0 to 2)
}
"""The answers an event's handlers may give besides None, a bool, a refusal and an error code."""


def _together(event: str, answer: Any, verdict: Any) -> Any:
    """The answer so far with one more handler's: each subscribe answer grants at most a QoS,
    so together they grant the lowest; elsewhere the later answer stands (a replaced message
    is what the next handler was shown)."""
    if event == "subscribe" and answer is not None:
        return min(answer, verdict)
    return verdict


def _judge(value: Any, event: str, handler: Callable[..., Any]) -> Any:
    """A handler's answer: a Refused, or None to let the next one decide, or a value. One it may
    not give (a str, say, where a challenge is to be bytes) refuses, as a failure does."""
    if value is None or value is True:
        return None
    if value is False:
        return Refused()
    if isinstance(value, Refused):
        code, text = value.reason_code, value.reason_string
        if (code is None or type(code) in (int, ReasonCode)) and (text is None or isinstance(text, str)):
            # (a code written as a plain int is the ReasonCode of that value; an unknown one, none)
            return value if code is None or isinstance(code, ReasonCode) else Refused(_code(code), text)
    elif isinstance(value, int) and value >= 0x80:  # (a ReasonCode, or one written as a plain int)
        return Refused(_code(value))
    elif isinstance(value, (bytes, bytearray, memoryview)) and memoryview(value).nbytes > 65535:
        log.error("{event} hook {handler!r} answered {size} bytes, more than Authentication Data carries (65,535); "
                  "refusing", event=event, handler=handler, size=memoryview(value).nbytes)
        return Refused(ReasonCode.UNSPECIFIED_ERROR)
    elif isinstance(value, Identity):
        if event == "auth" and _well_formed(value):
            return value
    elif isinstance(value, Authenticated):
        data, identity = value.data, value.identity
        if event == "auth" and (identity is None or isinstance(identity, Identity) and _well_formed(identity)) \
                and isinstance(data, (bytes, bytearray, memoryview)):
            judged = _judge(data, event, handler)  # (no more than Authentication Data carries)
            return judged if isinstance(judged, Refused) else Authenticated(bytes(data), identity)
    elif isinstance(value, _ANSWERS[event]) and not (isinstance(value, int) and not 0 <= value <= 2):  # (a QoS, or nothing)
        return value
    log.error("{event} hook {handler!r} answered {answer!r}, which is not an answer it may give; refusing",
              event=event, handler=handler, answer=value)
    return Refused(ReasonCode.UNSPECIFIED_ERROR)


_REASON_CODES = frozenset(int(code) for code in ReasonCode)


def _code(value: int) -> ReasonCode | None:
    return ReasonCode(value) if value in _REASON_CODES else None


def _well_formed(identity: Identity) -> bool:
    """Whether an Identity a hook made holds what the broker will use as its types say, and
    names an MQTT string can hold."""
    expires_at = identity.expires_at
    return isinstance(identity.client_id, str) and isinstance(identity.username, (str, type(None))) \
        and isinstance(identity.rules, (AccessRules, type(None))) \
        and (expires_at is None or is_time(expires_at)) and lone_surrogate_in(identity) is None


def _failed(failure: Failure, event: str, handler: Callable[..., Any]) -> Refused:
    if isinstance(failure.value, CancelledError):  # (its client left, the broker stops, or the handler cancelled it)
        log.info("{event} hook {handler!r} cancelled", event=event, handler=handler)
    else:
        log.failure("{event} hook {handler!r} failed; refusing", failure, event=event, handler=handler)
    return Refused(ReasonCode.UNSPECIFIED_ERROR)


def _forget_frames(error: BaseException) -> None:
    """Drop the tracebacks of ``error`` and of the exceptions it was raised from or during."""
    seen: set[int] = set()
    pending: list[object] = [error]
    while pending:
        each = pending.pop()
        if not isinstance(each, BaseException) or id(each) in seen:  # (a Failure may hold any value)
            continue
        seen.add(id(each))
        each.__traceback__ = None
        pending += (each.__cause__, each.__context__)


__all__ = ["Authenticated", "Hooks", "Refused", "EVENTS", "Client", "Message", "Subscription"]
