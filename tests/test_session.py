"""Session state: packet ids [MQTT-2.3.1-2] and the bounded offline queue."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Any

import pytest

from mqtt_broker.message import Client, Message
from mqtt_broker.session import Outgoing, Queued, Session
from mqtt_broker.topics import Subscription

from conftest import assert_every_field_set


def message(payload: bytes = b"x", topic: str = "t") -> Message:
    return Message(topic=topic, payload=payload, qos=1)


def queued(payload: bytes = b"x", qos: int = 1) -> Queued:
    return Queued(message=message(payload), qos=qos, retain=False)


def in_flight(session: Session, *packet_ids: int) -> None:
    for packet_id in packet_ids:
        session.track(packet_id, Outgoing(message=message(), qos=1, retain=False))


# --- packet ids -------------------------------------------------------------------------------

def test_packet_ids_start_at_one_and_count_up() -> None:
    session = Session("c1")
    assert [session.allocate_packet_id() for _ in range(3)] == [1, 2, 3]


def test_packet_id_skips_ids_in_flight() -> None:  # [MQTT-2.3.1-2]
    session = Session("c1")
    in_flight(session, 1, 2, 4)
    assert session.allocate_packet_id() == 3
    assert session.allocate_packet_id() == 5
    session.outgoing.pop(1)
    assert session.allocate_packet_id() == 6  # goes on rather than reusing the freed id at once


def test_packet_ids_wrap_from_65535_to_1_never_0() -> None:
    session = Session("c1")
    ids = [session.allocate_packet_id() for _ in range(65535)]
    assert ids == list(range(1, 65536))
    assert session.allocate_packet_id() == 1
    assert session.allocate_packet_id() == 2


def test_packet_id_wrap_skips_ids_in_flight() -> None:
    session = Session("c1")
    for _ in range(65533):
        session.allocate_packet_id()  # the next would be 65534
    in_flight(session, 65535, 1, 2)
    assert session.allocate_packet_id() == 65534
    assert session.allocate_packet_id() == 3  # past 65535, never 0, past 1 and 2
    assert session.allocate_packet_id() == 4


def test_packet_id_never_in_outgoing_when_nearly_full() -> None:
    session = Session("c1")
    in_flight(session, *(i for i in range(1, 65536) if i != 40000))
    allocated = session.allocate_packet_id()
    assert allocated == 40000
    session.track(allocated, Outgoing(message=message(), qos=1, retain=False))
    session.outgoing.pop(7)
    assert session.allocate_packet_id() == 7


def test_allocated_ids_stay_unique_while_in_flight() -> None:
    session = Session("c1")
    in_flight(session, *range(10, 20), 65535)
    for _ in range(70000):
        packet_id = session.allocate_packet_id()
        assert 1 <= packet_id <= 65535
        assert packet_id not in session.outgoing
        # keep a sliding window of 100 ids in flight
        session.track(packet_id, Outgoing(message=message(), qos=1, retain=False))
        if len(session.outgoing) > 100:
            session.outgoing.pop(next(iter(session.outgoing)))


def test_an_id_acknowledged_in_a_crowded_window_is_taken_when_the_next_in_order_is_in_flight() -> None:
    """The ids acknowledgements free are kept while CROWDED or more are in flight, the newest
    taken first, those in flight again since passed over; with fewer in flight, none is kept."""
    from mqtt_broker.session import CROWDED
    session = Session("c1")
    in_flight(session, *range(1, 65536))
    assert session.untrack(500) is not None and session.untrack(7) is not None
    in_flight(session, 7)  # (taken since by the ids in order)
    assert session.allocate_packet_id() == 500
    in_flight(session, 500)
    session.outgoing.pop(9)  # freed otherwise: found in order
    assert session.allocate_packet_id() == 9
    assert session.untrack(9) is None and session.freed is not None and not session.freed
    session.clear()
    assert session.freed is None
    in_flight(session, *range(1, CROWDED + 1))
    session.untrack(CROWDED)
    assert session.freed is None


# --- the offline queue ------------------------------------------------------------------------

def test_enqueue_bounded_by_message_count() -> None:
    session = Session("c1")
    assert all(session.enqueue(queued(b"ab"), 3, 0) for _ in range(3))
    assert session.enqueue(queued(b"ab"), 3, 0) is False
    assert session.enqueue(queued(b"", qos=0), 3, 0) is False
    assert len(session.queue) == 3
    assert session.dropped == 2
    assert session.queued_bytes == 6
    session.dequeue()
    assert session.enqueue(queued(b"ab"), 3, 0) is True
    assert session.dropped == 2


def test_enqueue_bounded_by_bytes() -> None:
    session = Session("c1")
    assert session.enqueue(queued(b"x" * 6), 0, 10) is True
    assert session.enqueue(queued(b"x" * 5), 0, 10) is False  # 11 > 10
    assert session.dropped == 1
    assert session.enqueue(queued(b"x" * 4), 0, 10) is True  # exactly 10 fits
    assert session.queued_bytes == 10
    assert session.enqueue(queued(b"x"), 0, 10) is False
    assert session.enqueue(queued(b""), 0, 10) is True  # nothing to count
    assert session.dropped == 2
    assert len(session.queue) == 3


def test_a_message_larger_than_the_byte_bound_goes_only_into_an_empty_queue() -> None:
    session = Session("c1")
    assert session.enqueue(queued(b"x" * 11), 0, 10) is True
    assert session.enqueue(queued(b"x"), 0, 10) is False
    assert session.dropped == 1 and len(session.queue) == 1 and session.queued_bytes == 11


def test_zero_bounds_mean_no_limit() -> None:
    session = Session("c1")
    for _ in range(2000):
        assert session.enqueue(queued(b"x" * 100, qos=0), 0, 0)
    assert len(session.queue) == 2000
    assert session.queued_bytes == 200_000
    assert session.dropped == 0


def test_either_bound_refuses() -> None:
    session = Session("c1")
    assert session.enqueue(queued(b"x"), 2, 100)
    assert session.enqueue(queued(b"x"), 2, 100)
    assert not session.enqueue(queued(b"x"), 2, 100)  # count
    session.dequeue()
    assert not session.enqueue(queued(b"x" * 100), 2, 100)  # bytes
    assert session.dropped == 2


def test_dequeue_is_fifo_and_keeps_queued_bytes() -> None:
    session = Session("c1")
    first, second, third = message(b"a"), message(b"bb"), message(b"ccc")
    session.enqueue(Queued(message=first, qos=1, retain=True), 0, 0)
    session.enqueue(Queued(message=second, qos=2, retain=False), 0, 0)
    session.enqueue(Queued(message=third, qos=0, retain=False), 0, 0)
    assert session.queued_bytes == 6
    item = session.dequeue()
    assert (item.message, item.qos, item.retain) == (first, 1, True)
    assert item.message is first
    assert session.queued_bytes == 5
    assert session.dequeue().message is second
    assert session.queued_bytes == 3
    assert session.dequeue().message is third
    assert session.queued_bytes == 0
    assert not session.queue


def test_clear() -> None:
    session = Session("c1", expiry=60)
    session.subscribe(Subscription(client_id="c1", topic_filter="a"))
    in_flight(session, 1, 2)
    session.enqueue(queued(b"abc"), 0, 0)
    session.expect_pubrel(5)
    session.dropped = 3
    session.clear()
    assert session.subscriptions == {}
    assert session.outgoing == {}
    assert not session.queue
    assert session.queued_bytes == 0
    assert session.awaiting_pubrel == set()
    assert session.client_id == "c1" and session.persistent
    # the queue bound starts over after clear()
    assert session.enqueue(queued(b"x" * 10), 1, 10)


def test_an_idle_session_shares_one_empty_set_of_awaited_pubrels() -> None:
    from mqtt_broker.session import NO_PUBRELS
    idle, busy = Session("idle"), Session("busy")
    assert idle.awaiting_pubrel is busy.awaiting_pubrel is NO_PUBRELS
    busy.expect_pubrel(7)
    assert busy.awaiting_pubrel == {7} and idle.awaiting_pubrel == set() and 7 not in NO_PUBRELS
    busy.clear()
    assert busy.awaiting_pubrel is NO_PUBRELS


def test_idle_sessions_share_empty_subscriptions_and_in_flight_messages() -> None:
    from mqtt_broker.session import NO_OUTGOING, NO_SUBSCRIPTIONS
    idle, busy = Session("idle"), Session("busy")
    assert idle.subscriptions is busy.subscriptions is NO_SUBSCRIPTIONS
    assert idle.outgoing is busy.outgoing is NO_OUTGOING
    busy.subscribe(Subscription(client_id="busy", topic_filter="a/#"))
    busy.track(busy.allocate_packet_id(), Outgoing(message=message(), qos=1, retain=False))
    assert list(busy.subscriptions) == ["a/#"] and list(busy.outgoing) == [1]
    assert idle.subscriptions == {} and idle.outgoing == {} and not NO_SUBSCRIPTIONS and not NO_OUTGOING
    assert idle.subscriptions.pop("a/#", None) is None and idle.outgoing.get(1) is None
    for write in (lambda: NO_SUBSCRIPTIONS.__setitem__("x", None), lambda: NO_OUTGOING.setdefault(1),
                  lambda: NO_OUTGOING.update({1: None})):
        with pytest.raises(TypeError):
            write()
    busy.clear()
    assert busy.subscriptions is NO_SUBSCRIPTIONS and busy.outgoing is NO_OUTGOING


def test_the_shared_empty_queue_and_pubrels_refuse_to_be_added_to() -> None:
    from mqtt_broker.session import NO_HELD_BACK, NO_PUBRELS, NO_QUEUE
    item = Queued(message(), 1, False)
    for write in (lambda: NO_QUEUE.append(item), lambda: NO_QUEUE.extend([item]), lambda: NO_PUBRELS.add(1),
                  lambda: NO_PUBRELS.update({1}), lambda: NO_HELD_BACK.append(1)):
        with pytest.raises(TypeError):
            write()
    assert not NO_QUEUE and not NO_PUBRELS and 1 not in NO_PUBRELS and not NO_HELD_BACK


def test_a_session_holding_none_back_shares_the_empty_held_back_ids() -> None:
    from mqtt_broker.session import NO_HELD_BACK
    idle, busy = Session("idle"), Session("busy")
    assert idle.held_back is busy.held_back is NO_HELD_BACK
    for packet_id in (3, 1):
        busy.hold_back(packet_id, Outgoing(message(), 1, False))
    assert list(busy.held_back) == [3, 1] and busy.unsent == 2 and not NO_HELD_BACK
    busy.clear()
    assert busy.held_back is NO_HELD_BACK and busy.unsent == 0


@pytest.mark.parametrize("copy_of", [copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_messages_and_deliveries_copy_and_pickle_with_every_field(copy_of: Any) -> None:
    """Compiled, these classes are made by calling their own __init__, which copy and pickle
    must give every field."""
    sent = Message("a/b", b"x", 2, True, True, 7, {"content_type": "text/plain"}, None, "pub", 12.5, 1, b"id")
    item = Outgoing(sent, 1, True, (4,), ("g", "a/#"), 9, 3.5, True, True)
    client = Client(client_id="c", username="u", peer="127.0.0.1:5000", protocol_version=5, clean_start=False,
                    keep_alive=30, properties={"session_expiry_interval": 60})
    for original in (sent, Queued(sent, 2, False, (1, 2), None, 3), item, client):
        copied = copy_of(original)
        assert type(copied) is type(original) and copied is not original
        assert dataclasses.asdict(copied) == dataclasses.asdict(original)


def test_a_session_copies_with_every_field() -> None:
    """Compiled, copy.copy raised TypeError: it made the copy by calling Session() without its
    client id."""
    session = Session("c", 60)
    session.subscribe(Subscription(client_id="c", topic_filter="a/#", qos=1))
    in_flight(session, session.allocate_packet_id())
    session.expect_pubrel(4)
    for original in (session, Session("idle")):
        copied = copy.copy(original)
        assert type(copied) is Session and copied is not original
        assert [getattr(copied, f.name) for f in dataclasses.fields(Session)] == [
            getattr(original, f.name) for f in dataclasses.fields(Session)]
        # (Shallow: it shares them, the idle one's shared empty ones too.)
        assert copied.subscriptions is original.subscriptions and copied.outgoing is original.outgoing


def test_messages_are_equal_by_what_subscribers_get() -> None:
    """Not by how one came (its packet id, DUP flag, frame) nor where it went since."""
    received = Message("t", b"x", 1, False, True, 5, {"content_type": "a"}, b"frame", "pub")
    assert received == Message("t", b"x", 1, properties={"content_type": "a"})
    assert received != Message("t", b"y", 1, properties={"content_type": "a"})
    assert received != Message("t", b"x", 2, properties={"content_type": "a"})


def test_a_bare_message_has_what_it_is_sent_as_and_nothing_of_how_it_came() -> None:
    from mqtt_broker.message import bare
    received = Message("t", b"x", 2, True, True, 7, {"content_type": "a"}, b"frame", "pub", 12.5, 1, b"id")
    received.encoded = {0: (b"bytes", 0)}
    kept = bare(received)
    assert kept == received and kept.payload is received.payload
    assert (kept.sender, kept.expires_at, kept.cluster_id) == ("pub", 12.5, b"id")
    assert (kept.frame, kept.encoded, kept.packet_id, kept.dup) == (None, None, 0, False)


def test_written_out_inits_set_every_field() -> None:
    sent = Message("t")
    assert_every_field_set(sent, topic="t")
    assert_every_field_set(Queued(sent, 1, True), message=sent, qos=1, retain=True)
    assert_every_field_set(Outgoing(sent, 2, False), message=sent, qos=2, retain=False)
    assert_every_field_set(Session("c"), client_id="c")
    assert_every_field_set(Session("c", 60), client_id="c", expiry=60)
    given = dict(client_id="c", username=None, peer="p", protocol_version=4, clean_start=True, keep_alive=0)
    assert_every_field_set(Client(**given), **given)  # type: ignore[arg-type]


def test_a_client_stays_what_it_was_made() -> None:
    """Hooks are given it: frozen, whichever build."""
    client = Client(client_id="c", username="u", peer="p", protocol_version=4, clean_start=True, keep_alive=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        client.username = "other"  # type: ignore[misc]
    assert client.username == "u"
    assert dataclasses.replace(client, username="v").username == "v"
    assert client == dataclasses.replace(client) and hash(client) == hash(dataclasses.replace(client))
