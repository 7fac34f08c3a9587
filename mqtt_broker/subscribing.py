"""SUBSCRIBE and UNSUBSCRIBE: each topic filter checked (validity, what the settings allow, the
ACL, the client's quota, a replay of the message history asked for), decided by the hooks,
applied by the broker, and answered once the store holds the change; then the retained
messages of each filter granted.

:class:`Subscribing` is a trait of :class:`~mqtt_broker.protocol.MQTTProtocol`; ``_HANDLERS``
there dispatches to these handlers like to its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from mypy_extensions import trait
from twisted.internet.defer import gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .connecting import NO_SLOTS, tally
from .hooks import SUBACK_REFUSALS, UNSUBACK_REFUSALS, Refused
from .history import MAX_REPLAYS, REPLAY_PREFIX, ReplayError, parse_spec, split_replay_filter
from .lifecycle import State
from .logged import shortened
from .message import Client
from .stats import once_per_thousand
from .store import StoreError
from .topics import Subscription, has_wildcard, split_shared, valid_topic_filter, wildcards_in_place
from .wire import (
    MQTT_5, NO_PROPERTIES, MQTTError, Packet, Properties, ProtocolError, ReasonCode, Suback, Subscribe,
    Unsuback, Unsubscribe,
)
from .wire.properties import sendable

if TYPE_CHECKING:
    from .auth import Identity

log = Logger(__name__)  # compiled, Logger() would not find the module from the stack


@trait
class Subscribing:
    """The SUBSCRIBE and UNSUBSCRIBE handlers of MQTTProtocol. The attributes declared here are
    the connection's state that they use, which lives in ``MQTTProtocol``'s slots and is set up
    by its ``__init__``. A trait of MQTTProtocol only."""

    __slots__ = NO_SLOTS

    broker: Any
    stats: Any
    state: State
    version: int
    client: Client | None
    identity: Identity | None
    session: Any
    problem_information: bool
    bridge: bool
    _own: str
    _client_id: str

    # MQTTProtocol's methods that these use (see Connecting)
    def _when(self, decision: Any, then: Callable[..., None], *args: Any) -> None: ...
    def send(self, packet: Packet) -> None: ...

    def _on_subscribe(self, packet: Subscribe) -> None:
        config = self.broker.config
        client_id = self.client.client_id  # type: ignore[union-attr]
        subscription_id = packet.properties.get("subscription_identifier")
        if subscription_id is not None and not config.subscription_identifier_available:
            raise MQTTError("subscription identifiers are not supported",
                            ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED)
        wanted: list[Subscription | ReasonCode] = []
        security = self.broker.security
        replays: dict[int, str] = {}  # the replay each request asks for, by its place in ``wanted``
        # Without a message log there is nothing to replay: a ``replay`` user property is the
        # application's own then, and asks for nothing.
        logged = self.broker.history is not None
        asked = dict(packet.properties.get("user_property", ())).get("replay") \
            if packet.properties and logged else None
        for request in packet.subscriptions:
            named, topic_filter = split_replay_filter(request.topic_filter)
            spec = named if named is not None else asked
            group, inner = split_shared(topic_filter)
            replay = spec if group is None and logged else None  # (a shared subscription is not replayed)
            # ($replay/{spec}/ is understood, or refused, in any case.)
            if spec is not None and (replay is not None or named is not None):
                try:
                    parse_spec(spec)
                except ReplayError:
                    wanted.append(ReasonCode.UNSPECIFIED_ERROR)
                    continue
            # (A $replay/ name within a replay, or a group's, would be subscribed to as it is.)
            if not valid_topic_filter(topic_filter) or (
                    (spec is not None or group is not None) and inner.startswith(REPLAY_PREFIX)):
                wanted.append(ReasonCode.TOPIC_FILTER_INVALID)
            elif group is not None and not config.shared_subscription_available and not self._own:
                wanted.append(ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
            elif not config.wildcard_subscription_available and has_wildcard(topic_filter) and not self._own:
                wanted.append(ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
            elif group is not None and request.no_local and self.version == MQTT_5:
                raise ProtocolError("No Local on a shared subscription")  # [MQTT-3.8.3-4]
            elif security is not None and self.identity is not None and not security.can_subscribe(self.identity,
                                                                                               topic_filter):
                wanted.append(ReasonCode.NOT_AUTHORIZED)
            elif replay is not None and len(replays) >= MAX_REPLAYS:
                # (Each reads the logs in this turn, a filter repeated too; one refused reads none.)
                wanted.append(ReasonCode.QUOTA_EXCEEDED)
            else:
                if replay is not None:
                    replays[len(wanted)] = replay
                wanted.append(Subscription(
                    client_id=client_id, topic_filter=topic_filter, qos=min(request.qos, config.max_qos),
                    no_local=request.no_local or self.bridge,
                    retain_as_published=request.retain_as_published or self.bridge,
                    retain_handling=request.retain_handling, subscription_id=subscription_id,
                    share_group=group))
        hooks = self.broker.hooks
        if hooks.has_subscribe:
            # Each hook sees a copy: what it may change is its answer's (a refusal, a lower QoS), not
            # the subscription granted (a higher QoS than asked, or than max_qos; another filter).
            decisions = [hooks.decide("subscribe", self.client, replace(w)) if isinstance(w, Subscription)
                         else succeed(w) for w in wanted]
            self._when(gatherResults(decisions), self._subscribe_decided, packet, wanted, replays)
        else:
            self._subscribe_decided([None] * len(wanted), packet, wanted, replays)

    def _subscribe_decided(self, answers: list[Any], packet: Subscribe,
                           wanted: list[Subscription | ReasonCode], replays: dict[int, str]) -> None:
        granted: list[Subscription] = []
        granted_replays: list[str | None] = []
        codes: list[int] = []
        reasons: list[str] = []
        # The quota counts what is granted, in order: a filter held already, or granted earlier in
        # this SUBSCRIBE, is replaced, not added; one a hook refused takes no place.
        quota = 0 if self._own else self.broker.config.max_subscriptions_per_client
        held = self.session.subscriptions
        adding: set[str] = set()
        over_quota: list[str] = []
        for index, (subscription, answer) in enumerate(zip(wanted, answers)):
            if not isinstance(subscription, Subscription):
                codes.append(subscription)
                tally(self.stats.subscriptions_refused, subscription.name)
                continue
            if isinstance(answer, Refused):
                code = answer.code(ReasonCode.UNSPECIFIED_ERROR, SUBACK_REFUSALS)
                codes.append(code)
                tally(self.stats.subscriptions_refused, ReasonCode(code).name)
                if answer.reason_string:
                    reasons.append(answer.reason_string)
                continue
            topic_filter = subscription.topic_filter
            if quota and topic_filter not in held and topic_filter not in adding:
                if len(held) + len(adding) >= quota:
                    over_quota.append(topic_filter)
                    tally(self.stats.subscriptions_refused, "max_subscriptions_per_client")
                    codes.append(ReasonCode.QUOTA_EXCEEDED)
                    continue
                adding.add(topic_filter)
            if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer <= 2:
                subscription.qos = min(subscription.qos, answer)
            granted.append(subscription)
            granted_replays.append(replays.get(index))
            codes.append(subscription.qos)
        if over_quota:
            refused = self.stats.subscriptions_refused["max_subscriptions_per_client"]
            if once_per_thousand(refused, len(over_quota)):  # (one line for a SUBSCRIBE's filters)
                more = f" and {len(over_quota) - 3} more" if len(over_quota) > 3 else ""
                log.info("refused {count} subscription(s) of {client_id!r} to {filters}: max_subscriptions_per_client "
                         "({refused} filters of all clients refused for it so far; logged once per thousand)",
                         count=len(over_quota), client_id=shortened(self._client_id),
                         filters=", ".join([repr(shortened(f)) for f in over_quota[:3]]) + more,
                         refused=refused)
        previous = [self.session.subscriptions.get(subscription.topic_filter) for subscription in granted]
        replaced = [self.broker.subscribe(self.session, subscription) for subscription in granted]
        reason = "; ".join(dict.fromkeys(reasons))  # (the hooks' reason strings, each once)
        store = self.broker.store
        if store is None or not self.session.stored:
            self._subscribed(None, packet, codes, reason)
            self._send_retained(granted, replaced, granted_replays)
        else:
            # SUBACK once the subscriptions are stored, and the retained messages at once: live
            # from now on, the subscriptions would otherwise get a newer message on a topic before
            # its older retained one [MQTT-4.6.0-5] (a PUBLISH may come before the SUBACK, §3.8.4).
            self._send_retained(granted, replaced, granted_replays)
            store.flushed().addCallbacks(self._subscribed, self._not_subscribed, (packet, codes, reason),
                                         None, (packet, codes, granted, previous, reason))

    def _subscribed(self, _: None, packet: Subscribe, codes: list[int], reason: str) -> None:
        if self.state is State.CONNECTED:
            self._suback(packet, codes, reason)

    def _suback(self, packet: Subscribe, codes: list[int], reason: str) -> None:
        if self.version != MQTT_5:
            codes = [code if code < 0x80 else 0x80 for code in codes]  # 3.x knows only 0x80 [MQTT-3.9.3-2]
        self.send(Suback(packet_id=packet.packet_id, reason_codes=tuple(codes), properties=self._reason(reason)))

    def _send_retained(self, granted: list[Subscription], replaced: list[bool], replays: list[str | None]) -> None:
        if self.state is not State.CONNECTED:  # (a SUBACK too large for the client closes it)
            return
        for subscription, existed, replay in zip(granted, replaced, replays):
            if not self.broker.send_retained(self.session, subscription, existed, replay):
                return

    def _not_subscribed(self, failure: Failure, packet: Subscribe, codes: list[int], granted: list[Subscription],
                        previous: list[Subscription | None], reason: str) -> None:
        """The store could not write the subscriptions: refused (0x80), and those they replaced,
        committed before, kept."""
        failure.trap(StoreError)
        if self.state is not State.CONNECTED:
            return
        for subscription, before in zip(granted, previous):
            if self.session.subscriptions.get(subscription.topic_filter) is not subscription:
                continue  # changed since (unsubscribed, subscribed again): that stands
            if before is None:
                self.broker.unsubscribe(self.session, subscription.topic_filter)
            else:
                self.broker.subscribe(self.session, before)
        for _ in granted:
            tally(self.stats.subscriptions_refused, ReasonCode.UNSPECIFIED_ERROR.name)
        self._suback(packet, [0x80 if code < 0x80 else code for code in codes], reason)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        inners = [split_replay_filter(f)[1] for f in packet.topic_filters]  # (a $replay/ name's: the filter it ends)
        if self.version != MQTT_5 and not all(f and wildcards_in_place(inner)
                                              for f, inner in zip(packet.topic_filters, inners)):
            # No UNSUBACK of MQTT 3 can say so: a protocol violation closes [MQTT-4.8.0-1]. (One
            # only over this broker's limits is answered, as its SUBSCRIBE was [MQTT-3.10.4-5].
            # A $replay/since: time's "+01:00" is no wildcard.)
            raise ProtocolError("UNSUBSCRIBE of an invalid topic filter")  # [MQTT-4.7.1-1, -2, 4.7.3-1]
        # The filter each ends, None for one that is not valid.
        filters = [inner if valid_topic_filter(inner) else None for inner in inners]
        hooks = self.broker.hooks
        if hooks.has_unsubscribe:
            # (Shown the filter it ends, as the subscribe hook was.)
            decisions = [hooks.decide("unsubscribe", self.client, f) if f is not None else succeed(None)
                         for f in filters]
            self._when(gatherResults(decisions), self._unsubscribe_decided, packet, filters)
        else:
            self._unsubscribe_decided([None] * len(filters), packet, filters)

    def _unsubscribe_decided(self, answers: list[Any], packet: Unsubscribe, filters: list[str | None]) -> None:
        codes = []
        reasons: list[str] = []
        for topic_filter, answer in zip(filters, answers):
            if topic_filter is None:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
            elif isinstance(answer, Refused):
                codes.append(answer.code(ReasonCode.NOT_AUTHORIZED, UNSUBACK_REFUSALS))
                if answer.reason_string:
                    reasons.append(answer.reason_string)
            elif self.broker.unsubscribe(self.session, topic_filter):
                codes.append(ReasonCode.SUCCESS)
            else:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
        reason = "; ".join(dict.fromkeys(reasons))
        store = self.broker.store
        if store is None or not self.session.stored:
            self._unsubscribed(None, packet, codes, reason)
        else:  # UNSUBACK once the removal is stored: after a crash the subscription stays gone
            store.flushed().addCallbacks(self._unsubscribed, self._not_unsubscribed, (packet, codes, reason), None,
                                         (packet, codes, reason))

    def _unsubscribed(self, _: None, packet: Unsubscribe, codes: list[ReasonCode], reason: str) -> None:
        if self.state is State.CONNECTED:
            self.send(Unsuback(packet_id=packet.packet_id, reason_codes=tuple(codes), properties=self._reason(reason)))

    def _not_unsubscribed(self, failure: Failure, packet: Unsubscribe, codes: list[ReasonCode], reason: str) -> None:
        """The store could not write the removal now: it stands (nothing more is sent for those
        filters), and the store writes it once it can."""
        failure.trap(StoreError)
        self._unsubscribed(None, packet, codes, reason)

    def _reason(self, reason: str) -> Properties:
        """An MQTT 5 answer's properties: a hook's reason string, unless the client asked for
        none [MQTT-3.1.2-29]."""
        if reason and self.version == MQTT_5 and self.problem_information:
            return {"reason_string": sendable(reason)}
        return NO_PROPERTIES


__all__ = ["Subscribing"]
