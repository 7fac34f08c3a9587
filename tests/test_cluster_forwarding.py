"""What a node of a cluster does with each message routed on it (``Forwarding``), in-process on a
``Clock``: once to each other node holding a matching filter, QoS 0 records gathered into one
write per node and turn, QoS 1/2 records handed to the store's next batch, and shared
subscriptions given to their members in turn across the cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from mqtt_broker import BrokerService
from mqtt_broker.cluster.codec import FORWARDED, HANDED, pack_forwarded, pack_retained, unpack_records, unpack_retained
from mqtt_broker.cluster.forwarding import ClusterStats, Forwarding
from mqtt_broker.message import Message
from mqtt_broker.topics import Subscription, SubscriptionTree
from mqtt_broker.wire import Publish

from protocol_helpers import connected, make_broker


def taken(forwarding: Forwarding) -> dict[str, list[bytes]]:
    """The records waiting for each node's inbox, handed over (their runs joined)."""
    return {node: [record for run in runs for record in run.records] for node, runs in forwarding.take_outgoing().items()}


class Node:
    """A Forwarding named ``a``, with what it asks of the rest of its node recorded."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.stats = ClusterStats()
        self.shared_here: list[tuple[str, tuple[str, str]]] = []
        self.collects = 0
        self.collected = 0
        """The length of the records collects were told of (which wait in memory for a batch)."""
        self.writes: list[tuple[str, list[Any]]] = []
        self.forwarding = Forwarding("a", self.clock, self.stats, self._deliver_shared, self._collect, self._send)

    def _deliver_shared(self, message: Message, share: tuple[str, str], members: list[Subscription]) -> int:
        self.shared_here.append((message.topic, share))
        return 1

    def _collect(self, made: int) -> None:
        self.collects += 1
        self.collected += made

    def _send(self, node: str, data: bytes) -> None:
        self.writes.append((node, list(unpack_records(data))))

    def holds(self, node: str, topic_filter: str, awake: bool = True) -> None:
        """Another node advertised a filter."""
        self.forwarding.add_route(node, topic_filter, awake)


def test_a_message_goes_once_to_each_node_holding_a_matching_filter() -> None:
    node = Node()
    for topic_filter in ("a/#", "a/+", "a/b"):
        node.holds("b", topic_filter)
    node.holds("c", "x/#")
    node.holds("d", "+/b")
    assert node.forwarding.forward(Message(topic="a/b", payload=b"p"), []) == 2
    assert node.writes == []  # not before the end of the reactor's turn
    node.clock.advance(0)
    assert sorted(target for target, _ in node.writes) == ["b", "d"]
    for _, records in node.writes:
        [(kind, message, shares)] = records
        assert (kind, message.topic, message.payload, message.qos, shares) == (FORWARDED, "a/b", b"p", 0, ())
    assert node.stats.forwarded_out == 2
    assert node.collects == 0


def test_what_matches_no_other_node_is_sent_nowhere() -> None:
    node = Node()
    node.holds("b", "other/#")
    assert node.forwarding.forward(Message(topic="a/b"), []) == 0
    assert node.clock.getDelayedCalls() == []
    assert node.stats.forwarded_out == 0


def test_qos0_records_of_one_turn_go_to_a_node_in_one_write_in_order() -> None:
    node = Node()
    node.holds("b", "#")
    for i in range(3):
        node.forwarding.forward(Message(topic=f"t/{i}", sender="p"), [])
    node.clock.advance(0)
    [(target, records)] = node.writes
    assert target == "b"
    assert [(message.topic, message.sender) for _, message, _ in records] == [("t/0", "p"), ("t/1", "p"), ("t/2", "p")]
    node.forwarding.forward(Message(topic="t/3"), [])
    node.clock.advance(0)
    assert [len(records) for _, records in node.writes] == [3, 1]


def test_qos1_and_2_records_wait_for_the_stores_batch_with_an_id_each() -> None:
    node = Node()
    node.holds("b", "t")
    first, second = Message(topic="t", qos=1), Message(topic="t", qos=2)
    node.forwarding.forward(first, [])
    node.forwarding.forward(second, [])
    node.clock.advance(0)
    assert node.writes == []  # not over pub/sub
    assert node.collects == 2
    assert first.cluster_id is not None and second.cluster_id is not None
    assert len(first.cluster_id) == 14 and first.cluster_id != second.cluster_id
    outgoing = taken(node.forwarding)
    assert list(outgoing) == ["b"]
    assert node.collected == sum(len(record) for record in outgoing["b"])
    assert [next(unpack_records(record))[1].cluster_id for record in outgoing["b"]] == [first.cluster_id,
                                                                                      second.cluster_id]
    assert taken(node.forwarding) == {}


def test_a_message_forwarded_again_keeps_its_id() -> None:
    node = Node()
    node.holds("b", "t")
    message = Message(topic="t", qos=1, cluster_id=b"from elsewhere")
    node.forwarding.forward(message, [])
    assert message.cluster_id == b"from elsewhere"


def test_shared_subscription_members_take_turns_across_the_cluster() -> None:
    node = Node()
    local = SubscriptionTree()
    local.add(Subscription(client_id="x", topic_filter="$share/g/t", share_group="g"))
    node.forwarding.connected_here("$share/g/t", True)
    node.holds("c", "$share/g/t")
    node.holds("b", "$share/g/t")
    share = ("g", "$share/g/t")
    for _ in range(6):
        _, groups = local.match("t")
        assert node.forwarding.forward(Message(topic="t"), groups) == 1
        node.clock.advance(0)
    # This node first, then the others in their order: a, b, c, a, b, c.
    assert node.shared_here == [("t", share), ("t", share)]
    assert [(target, records[0][2]) for target, records in node.writes] == [
        ("b", (share,)), ("c", (share,)), ("b", (share,)), ("c", (share,))]


def test_shared_subscription_members_that_are_connected_come_first_across_the_cluster() -> None:
    """As one broker gives a group's messages to its connected members while any is: here x is
    offline and so are b's members, so c's connected member gets them all; once none is
    connected anywhere, the nodes take turns again (an offline member's session queues it)."""
    node = Node()
    local = SubscriptionTree()
    local.add(Subscription(client_id="x", topic_filter="$share/g/t", share_group="g"))
    node.holds("b", "$share/g/t", awake=False)
    node.holds("c", "$share/g/t")
    share = ("g", "$share/g/t")
    _, groups = local.match("t")
    for _ in range(3):
        node.forwarding.forward(Message(topic="t", qos=1), groups)
    assert {target: len(records) for target, records in taken(node.forwarding).items()} == {"c": 3}
    node.holds("c", "$share/g/t", awake=False)  # its member went offline
    for _ in range(3):
        node.forwarding.forward(Message(topic="t", qos=1), groups)
    assert node.shared_here == [("t", share)]
    assert {target: len(records) for target, records in taken(node.forwarding).items()} == {"b": 1, "c": 1}
    node.forwarding.connected_here("$share/g/t", True)  # x is connected again: here, and c, awake again too
    node.holds("c", "$share/g/t")
    for _ in range(4):
        node.forwarding.forward(Message(topic="t", qos=1), groups)
    assert len(node.shared_here) == 3
    assert {target: len(records) for target, records in taken(node.forwarding).items()} == {"c": 2}
    assert node.forwarding.filters_of("b") == {"$share/g/t": False}
    assert node.forwarding.filters_of("c") == {"$share/g/t": True}


def test_a_routes_state_changes_without_emptying_the_match_cache() -> None:
    """A group's members on another node come and go all the time: each change of its route's
    state leaves the routes matched per topic as they are."""
    node = Node()
    node.holds("b", "$share/g/t")
    _, matched = node.forwarding.routes.match("t")
    node.holds("b", "$share/g/t", awake=False)
    node.holds("b", "$share/g/t")
    assert node.forwarding.routes.match("t")[1] is matched  # (the compiled match makes its tuple anew)
    assert node.forwarding.filters_of("b") == {"$share/g/t": True}


def test_a_nodes_routes_are_replaced_by_its_whole_set() -> None:
    node = Node()
    node.holds("b", "gone/#")
    node.holds("b", "$share/g/t")
    node.holds("c", "gone/#")
    node.forwarding.replace_routes("b", {"$share/g/t": False, "new": True})
    assert node.forwarding.filters_of("b") == {"$share/g/t": False, "new": True}
    assert node.forwarding.filters_of("c") == {"gone/#": True}
    assert node.forwarding.forward(Message(topic="gone/x"), []) == 1  # c only
    node.forwarding.replace_routes("c", {})
    assert node.forwarding.nodes() == {"b"}


def test_a_nodes_routes_are_kept_apart_from_the_other_nodes() -> None:
    """Each node's filters are kept apart (a node joining with 50,000 filters beside others of as
    many held the reactor half a second, every route walked to find its own): they follow each
    filter added, replaced, removed, and a node forgotten."""
    node = Node()
    for n in range(100):
        node.holds("c", f"c/{n}")
        node.holds("b", f"b/{n}")
    node.holds("c", "shared")
    node.holds("b", "shared")
    wanted = {**{f"b/{n}": True for n in range(1, 100)}, "b/0": False, "b/new": True}
    node.forwarding.replace_routes("b", wanted)
    assert node.forwarding.filters_of("b") == wanted
    assert node.forwarding.forward(Message(topic="shared"), []) == 1  # c only: b's went
    node.forwarding.forget("c")
    assert node.forwarding.nodes() == {"b"} and node.forwarding.filters_of("c") == {}
    for topic_filter in wanted:
        node.forwarding.remove_route("b", topic_filter)
    assert node.forwarding.nodes() == set() and node.forwarding.routes.count == 0


def test_a_message_left_unfinished_goes_to_a_node_with_a_connected_member_first() -> None:
    node = Node()
    share = ("g", "$share/g/t")
    node.holds("b", "$share/g/t", awake=False)
    node.holds("c", "$share/g/t")
    for _ in range(2):
        node.forwarding.hand_on(Message(topic="t", qos=1), share)
    assert {target: len(records) for target, records in taken(node.forwarding).items()} == {"c": 2}


def test_a_node_holding_the_filter_and_a_shared_member_gets_one_record_with_the_share() -> None:
    node = Node()
    node.holds("b", "t")
    node.holds("b", "$share/g/t")
    assert node.forwarding.forward(Message(topic="t"), []) == 1
    node.clock.advance(0)
    [(target, [(_, _, shares)])] = node.writes
    assert (target, shares) == ("b", (("g", "$share/g/t"),))


def test_routes_go_with_the_filter_and_with_the_node() -> None:
    node = Node()
    node.holds("b", "t")
    node.holds("b", "u/#")
    node.holds("c", "t")
    node.forwarding.remove_route("b", "t")
    assert node.forwarding.forward(Message(topic="t"), []) == 1  # c only
    node.forwarding.forget("c")
    assert node.forwarding.forward(Message(topic="t"), []) == 0
    assert node.forwarding.forward(Message(topic="u/v"), []) == 1  # b still holds u/#
    node.clock.advance(0)
    assert [(target, [m.topic for _, m, _ in records]) for target, records in node.writes] == [
        ("c", ["t"]), ("b", ["u/v"])]


def test_a_message_left_unfinished_is_handed_to_the_other_nodes_members_in_turn() -> None:
    node = Node()
    share = ("g", "$share/g/t")
    node.holds("c", "$share/g/t")
    node.holds("b", "$share/g/t")
    node.holds("b", "t")  # b's subscribers of t had the message already: not again
    node.holds("d", "$share/other/t")
    messages = [Message(topic="t", qos=1), Message(topic="t", qos=0), Message(topic="t", qos=2)]
    assert [node.forwarding.hand_on(message, share) for message in messages] == [1, 1, 1]
    node.clock.advance(0)
    assert node.writes == []  # through the inboxes, whatever the QoS
    assert node.collects == 3 and node.stats.forwarded_out == 3
    made = taken(node.forwarding)
    assert node.collected == sum(len(record) for records in made.values() for record in records)
    outgoing = {target: [next(unpack_records(record)) for record in records] for target, records in made.items()}
    assert {target: [(kind, message.qos, shares) for kind, message, shares in records]
            for target, records in outgoing.items()} == {
        "b": [(HANDED, 1, ((share,), ("a",))), (HANDED, 2, ((share,), ("a",)))], "c": [(HANDED, 0, ((share,), ("a",)))]}
    assert [message.cluster_id is not None for message in messages] == [True, False, True]
    assert outgoing["b"][0][1].cluster_id == messages[0].cluster_id


def test_a_message_left_unfinished_with_no_member_elsewhere_goes_nowhere() -> None:
    node = Node()
    node.holds("b", "t")
    node.holds("b", "$share/other/t")
    assert node.forwarding.hand_on(Message(topic="t", qos=1), ("g", "$share/g/t")) == 0
    assert taken(node.forwarding) == {} and node.collects == 0


SHARE = ("g", "$share/g/t")


def node_broker() -> tuple[BrokerService, Forwarding]:
    """A broker (no Redis) whose delivery forwards through a Forwarding with no store behind it."""
    broker = make_broker(persistence="memory")
    broker.startService()
    forwarding = Forwarding("a", Clock(), ClusterStats(), broker.delivery.deliver_shared, lambda made: None,
                            lambda node, data: None)
    broker.delivery.forwarding = forwarding
    return broker, forwarding


def test_a_message_chosen_for_a_group_whose_members_here_left_goes_to_a_member_elsewhere() -> None:
    """Another node chose this one for the group as its member here was leaving: a member on a
    third node gets the message rather than none."""
    broker, forwarding = node_broker()
    forwarding.add_route("c", "$share/g/t")
    assert broker.delivery.route(Message(topic="t", payload=b"p", qos=1), (SHARE,)) == 1
    [(target, [record])] = taken(forwarding).items()
    assert target == "c" and next(unpack_records(record))[0::2] == (HANDED, ((SHARE,), ("a",)))


def test_a_message_handed_on_goes_to_each_node_once_at_most_when_no_member_is_here_either() -> None:
    broker, forwarding = node_broker()
    forwarding.add_route("c", "$share/g/t")
    assert broker.delivery.handed(Message(topic="t", payload=b"p", qos=1), (SHARE,), ("b",)) == 1
    [(target, [record])] = taken(forwarding).items()
    assert target == "c" and next(unpack_records(record))[0::2] == (HANDED, ((SHARE,), ("b", "a")))
    assert broker.delivery.handed(Message(topic="t", payload=b"p", qos=1), (SHARE,), ("c", "b")) == 0
    assert taken(forwarding) == {}  # no message goes round between stale routes


def test_a_message_no_member_may_read_goes_round_the_nodes_to_one_whose_member_may(tmp_path: Path) -> None:
    """Three nodes hold $share/g/t/+; the ACL lets the members on a and b not read t/secret, c's
    may. Handed from a to b, a message went back to a (b's first choice in turn), which dropped
    it: an acknowledged message lost while c's member could read it."""
    acl = tmp_path / "acl"
    acl.write_text("topic write #\ntopic read t/open\n")
    nodes = {name: bare_node(name, acl_file=str(acl)) for name in "ab"}
    for name, broker in nodes.items():
        for other in "abc".replace(name, ""):
            broker.delivery.forwarding.add_route(other, "$share/g/t/+")  # type: ignore[union-attr]
        connected(broker, f"member-{name}").subscribe("$share/g/t/+", qos=1)
        broker.delivery.forwarding.connected_here("$share/g/t/+", True)  # type: ignore[union-attr]
    for n in range(3):
        nodes["a"].delivery.route(Message(topic="t/secret", payload=b"%d" % n, qos=1))
    assert sorted(pass_records(nodes)) == [("c", b"0"), ("c", b"1"), ("c", b"2")]


def test_a_message_chosen_for_a_group_goes_to_its_member_here() -> None:
    broker, forwarding = node_broker()
    forwarding.add_route("c", "$share/g/t")
    member = connected(broker, "member")
    member.subscribe("$share/g/t", qos=1)
    for deliver in (broker.delivery.route, broker.delivery.handed):
        assert deliver(Message(topic="t", payload=b"p", qos=1), (SHARE,)) == 1
    assert [(p.topic, p.qos) for p in member.received()] == [("t", 1), ("t", 1)]  # type: ignore[attr-defined]
    assert taken(forwarding) == {}


def test_a_message_from_another_node_keeps_its_expiry_time() -> None:
    broker, _ = node_broker()
    subscriber = connected(broker, "subscriber", version=5)
    subscriber.subscribe("t", qos=1)
    late = Message(topic="t", payload=b"p", qos=1, properties={"message_expiry_interval": 60}, expires_at=42.0)
    broker.delivery.route(late, ())
    [publish] = subscriber.received()
    assert publish.properties["message_expiry_interval"] == 42  # type: ignore[attr-defined]


def test_a_sys_message_is_not_handed_to_another_node() -> None:
    """Every node publishes the same $SYS names about itself: each node's stay its own."""
    broker, forwarding = node_broker()
    forwarding.add_route("c", "$share/g/$SYS/broker/uptime")
    share = ("g", "$share/g/$SYS/broker/uptime")
    assert broker.delivery.hand_on(Message(topic="$SYS/broker/uptime", payload=b"1", qos=1), share, None) == 0
    assert taken(forwarding) == {}


def bare_node(name: str, **settings: Any) -> BrokerService:
    """A broker (no Redis) whose delivery forwards through a Forwarding named ``name``, as Cluster
    wires it (a shared group's message chosen here goes through ``Delivery.to_group``)."""
    broker = make_broker(persistence="memory", **settings)
    broker.startService()
    forwarding = Forwarding(name, Clock(), ClusterStats(), broker.delivery.to_group, lambda made: None,
                            lambda node, data: None)
    broker.delivery.forwarding = forwarding
    return broker


def pass_records(nodes: dict[str, BrokerService]) -> list[tuple[str, bytes]]:
    """The inbox records go from node to node as Cluster._handle_entry would take them (bounded);
    returns (node, payload) of those for nodes not among ``nodes``."""
    elsewhere: list[tuple[str, bytes]] = []
    for _ in range(10):
        moved = False
        for broker in list(nodes.values()):
            forwarding = broker.delivery.forwarding
            assert forwarding is not None
            for target, runs in forwarding.take_outgoing().items():
                for kind, message, second in [r for run in runs for rec in run.records for r in unpack_records(rec)]:
                    moved = True
                    if target not in nodes:
                        elsewhere.append((target, message.payload))
                    elif kind == FORWARDED:
                        nodes[target].delivery.route(message, second)
                    else:
                        nodes[target].delivery.handed(message, *second)
        if not moved:
            break
    return elsewhere


def test_a_message_handed_to_a_connected_member_elsewhere_may_come_back_to_an_offline_one_here() -> None:
    """On node a, member-l (connected, its session ends with the connection) holds an
    unacknowledged QoS 1 message of $share/g/t/+; member-a is a's other member, offline with its
    session kept. As member-l leaves, the message goes to a connected member elsewhere first (b:
    Delivery.to_group). b's member has left by the time b reads the record: b hands it back to
    a, which has not declined it (its member is offline), and member-a's session queues it. It
    was dropped, a counted among the nodes that had declined it."""
    a, b = bare_node("a"), bare_node("b")
    fa, fb = a.delivery.forwarding, b.delivery.forwarding
    assert fa is not None and fb is not None
    member = connected(a, "member-a", clean=False)
    member.subscribe("$share/g/t/+", qos=1)
    member.lose()  # offline, its session kept
    leaving = connected(a, "member-l")
    leaving.subscribe("$share/g/t/+", qos=1)
    fa.connected_here("$share/g/t/+", True)
    fa.add_route("b", "$share/g/t/+", False)
    a.delivery.route(Message(topic="t/x", payload=b"m", qos=1))
    assert [p.payload for p in leaving.received()] == [b"m"]  # member-l has it, unacknowledged
    assert fa.take_outgoing() == {}
    fa.add_route("b", "$share/g/t/+", True)  # b's member connects...
    fa.connected_here("$share/g/t/+", False)
    leaving.lose()  # ...member-l leaves: its message is handed on, to b (connected members first)
    fb.add_route("a", "$share/g/t/+", False)  # (b's member has left meanwhile: b holds none now)
    pass_records({"a": a, "b": b})
    session = a.sessions["member-a"]
    assert [item.message.payload for item in session.queue] == [b"m"], "the QoS 1 message was dropped"


# --- the largest expiry interval, from a node whose clock is a little ahead -------------------

MAX_EXPIRY = 2**32 - 1


def node_b() -> tuple[BrokerService, Forwarding]:
    """A broker (no Redis) whose delivery forwards through a Forwarding named b, on its clock."""
    broker = make_broker(persistence="memory")
    broker.startService()
    forwarding = Forwarding("b", broker.clock, ClusterStats(), broker.delivery.deliver_shared, lambda made: None,
                            lambda node, data: None)
    broker.delivery.forwarding = forwarding
    return broker, forwarding


def longest_lived(a_now: float, retain: bool = False) -> Message:
    return Message(topic="t", payload=b"p", qos=1, retain=retain, sender="pub", cluster_id=b"i" * 14,
                   properties={"message_expiry_interval": MAX_EXPIRY}, expires_at=a_now + MAX_EXPIRY)


def test_the_largest_expiry_from_a_node_whose_clock_is_ahead_goes_on_as_it_came() -> None:
    """The record carries the expiry as node a's clock time; half a second behind, node b sent
    the interval left by its own clock, one more than any PUBLISH can carry: the encoding failed,
    and the message was lost [MQTT-3.3.2-6]."""
    broker, _ = node_b()
    subscriber = connected(broker, "subscriber", version=5)
    subscriber.subscribe("t", qos=1)
    a_now = broker.clock.seconds() + 0.5
    [(_, message, _)] = unpack_records(pack_forwarded(longest_lived(a_now), (), a_now))
    broker.delivery.route(message, ())
    [publish] = subscriber.received()
    assert isinstance(publish, Publish) and publish.properties["message_expiry_interval"] == MAX_EXPIRY


def test_the_largest_expiry_handed_on_by_a_node_whose_clock_is_behind_is_handed_on() -> None:
    """Node b, chosen for a group whose members here have left, hands the message to the member
    on node c: packing it failed the same way, and the group lost it."""
    broker, forwarding = node_b()
    forwarding.add_route("c", "$share/g/t")
    a_now = broker.clock.seconds() + 0.5
    [(_, message, _)] = unpack_records(pack_forwarded(longest_lived(a_now), (), a_now))
    assert broker.delivery.route(message, (("g", "$share/g/t"),)) == 1
    [record] = taken(forwarding)["c"]
    [(kind, handed, _)] = unpack_records(record)
    assert kind == HANDED and handed.properties["message_expiry_interval"] == MAX_EXPIRY


def test_the_largest_expiry_of_a_retained_message_from_a_node_whose_clock_is_ahead() -> None:
    broker, _ = node_b()
    b_now = broker.clock.seconds()
    broker.retained.store(unpack_retained(pack_retained(longest_lived(b_now + 0.5, retain=True), b_now + 0.5), b_now))
    subscriber = connected(broker, "subscriber", version=5)
    [publish] = [p for p in subscriber.subscribe("t", qos=1) if isinstance(p, Publish)]
    assert publish.properties["message_expiry_interval"] == MAX_EXPIRY
