"""Topic names, filters and the subscription trie (MQTT 3.1.1 / 5.0 section 4.7)."""

from __future__ import annotations

from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from topic_helpers import LEVELS, matched, topic_filters, topic_names

from mqtt_broker.topics import (
    MAX_CACHED_TOPIC_LENGTH, MAX_SHARE_TURNS, MAX_TOPIC_LEVELS, Match, Subscription, SubscriptionTree, filter_intersection, filters_overlap, has_wildcard,
    matches, Turns, split_shared, valid_topic_filter, valid_topic_name,
)


def sub(client_id: str, topic_filter: str, **options: object) -> Subscription:
    group, _ = split_shared(topic_filter)
    return Subscription(client_id=client_id, topic_filter=topic_filter, share_group=group,
                        **options)  # type: ignore[arg-type]


def by_client(result: Match) -> dict[str, list[str]]:
    """client id -> the filters it matched with, in the order the tree listed them."""
    return {client_id: [s.topic_filter for s in subs] for client_id, subs, *_ in result[0]}


def by_group(result: Match) -> dict[tuple[str, str], set[str]]:
    """(group, shared filter) -> member client ids; every list holds one filter of one group."""
    groups: dict[tuple[str, str], set[str]] = {}
    for key, group in result[1]:
        subs = list(group.members.values())
        filters = {s.topic_filter for s in subs}
        assert len(filters) == 1, f"one group entry mixes filters {filters}"
        topic_filter = filters.pop()
        group, _ = split_shared(topic_filter)
        assert group is not None
        assert key == (group, topic_filter)
        assert (group, topic_filter) not in groups, "a group is listed twice"
        members = [s.client_id for s in subs]
        assert len(members) == len(set(members)), "a group member is listed twice"
        groups[(group, topic_filter)] = set(members)
    return groups


# --- validation [MQTT-4.7.1-1..3], [MQTT-4.7.3-1] --------------------------------------------

@pytest.mark.parametrize("topic_filter", [
    "#", "sport/tennis/#", "sport/tennis/player1/#", "+", "+/tennis/#", "sport/+/player1",
    "sport/+", "+/+", "/+", "/finance", "sport", "$SYS/#", "$SYS/monitor/+", "a//b", "/",
    "Accounts payable", "$share/g/a/#", "$share/g/+", "$share/g/#", "$share/group/a/b",
])
def test_valid_topic_filter(topic_filter: str) -> None:
    assert valid_topic_filter(topic_filter)


@pytest.mark.parametrize("topic_filter", [
    "",  # [MQTT-4.7.3-1] at least one character
    "sport/tennis#",  # "#" must be a whole level [MQTT-4.7.1-2]
    "sport/tennis/#/ranking",  # "#" must be the last level [MQTT-4.7.1-2]
    "sport/#/x",
    "#/",
    "##",
    "sport+",  # "+" must be a whole level [MQTT-4.7.1-3]
    "sport/+tennis",
    "+/a+",
    "++",
    "$share//a",  # empty share name
    "$share/g",  # no filter after the share name
    "$share/g/",  # an empty filter
    "$share/g+/a",  # wildcard in the share name
    "$share/#/a",
    "$share/g/a#",  # the inner filter is validated too
    "$share/g/#/a",
    "$share/g/a+",
])
def test_invalid_topic_filter(topic_filter: str) -> None:
    assert not valid_topic_filter(topic_filter)


@pytest.mark.parametrize("topic", [
    "sport/tennis/player1", "/finance", "finance", "/", "a//b", "$SYS/monitor/Clients",
    "Accounts payable", "ACCOUNTS",
])
def test_valid_topic_name(topic: str) -> None:
    assert valid_topic_name(topic)


@pytest.mark.parametrize("topic", ["", "#", "+", "sport/#", "sport/+/x", "sport+", "a#b"])
def test_invalid_topic_name(topic: str) -> None:  # [MQTT-3.3.2-2], [MQTT-4.7.3-1]
    assert not valid_topic_name(topic)


def test_at_most_max_topic_levels() -> None:
    deepest = "/".join(["a"] * MAX_TOPIC_LEVELS)
    assert valid_topic_name(deepest) and valid_topic_filter(deepest) and valid_topic_filter(deepest[:-1] + "#")
    assert valid_topic_name("/" * (MAX_TOPIC_LEVELS - 1))  # empty levels count too
    for too_deep in (deepest + "/a", "/" * MAX_TOPIC_LEVELS, "/".join(["+"] * (MAX_TOPIC_LEVELS + 1))):
        assert not valid_topic_filter(too_deep)
        assert "+" in too_deep or not valid_topic_name(too_deep)


def test_at_most_what_an_mqtt_string_carries() -> None:
    """65,535 bytes of UTF-8: a longer topic from an application (the admin API's publish) made a
    retained message that failed every SUBSCRIBE matching it."""
    for longest in ("a" * 65_535, "é" * 32_767 + "a", "€" * 21_845):
        assert len(longest.encode()) == 65_535
        assert valid_topic_name(longest) and valid_topic_filter(longest)
        assert not valid_topic_name(longest + "a") and not valid_topic_filter(longest + "a")
    assert not valid_topic_filter("a/" + "x" * 70_000 + "/#")


def test_split_shared() -> None:
    assert split_shared("$share/g/a/b") == ("g", "a/b")
    assert split_shared("$share/g/#") == ("g", "#")
    assert split_shared("$share/g") == ("g", "")
    assert split_shared("a/b") == (None, "a/b")
    assert split_shared("$SYS/a") == (None, "$SYS/a")


def test_has_wildcard() -> None:
    assert has_wildcard("a/+/b") and has_wildcard("a/#") and has_wildcard("+")
    assert not has_wildcard("a/b") and not has_wildcard("$SYS/x")


# --- matches(): the normative examples of MQTT 3.1.1 section 4.7 -----------------------------

@pytest.mark.parametrize("topic_filter, topic, expected", [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/tennis/player1/#", "sport/tennis", False),
    ("sport/#", "sport", True),
    ("#", "sport/tennis/player1", True),
    ("#", "/finance", True),
    ("#", "/", True),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/tennis/+", "sport/tennis", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("sport/+/player1", "sport/tennis/player2", False),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "finance", True),
    ("+/tennis/#", "sport/tennis", True),
    ("+/tennis/#", "sport/tennis/player1/score", True),
    ("+/tennis/#", "sport/golf", False),
    # 4.7.2 topics beginning with $ [MQTT-4.7.2-1]
    ("#", "$SYS/monitor/Clients", False),
    ("#", "$SYS", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("+", "$SYS", False),
    ("+/#", "$SYS/a", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/Clients", "$SYS/monitor/Clients", True),
    ("a/#", "a/$x", True),  # "$" only matters at the first level
    ("a/+", "a/$x", True),
    # 4.7.3 names are case sensitive; a leading "/" makes a distinct level
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("finance", "/finance", False),
    ("/finance", "finance", False),
    ("/finance", "/finance", True),
    # plain levels
    ("a/b", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
])
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


# --- filters_overlap() and filter_intersection() -----------------------------------------------

@pytest.mark.parametrize("a, b, intersection", [
    ("a/b", "a/b", "a/b"), ("a/b", "a/c", None), ("a/+", "+/b", "a/b"), ("+", "+", "+"),
    ("a/+", "a/b/c", None), ("a", "a/b", None), ("a//b", "a/+/b", "a//b"),
    # "#" matches the parent level too, and any number of levels below [MQTT-4.7.1-2]
    ("#", "a/b", "a/b"), ("a/#", "a", "a"), ("a/#", "a/+", "a/+"), ("a/#", "+/b/#", "a/b/#"),
    ("a/#", "b/#", None), ("+/+", "a/#", "a/+"), ("+", "a/#", "a"), ("a/b/#", "+", None),
    ("#", "#", "#"), ("+/#", "#", "+/#"), ("a/+/c", "+/b/#", "a/b/c"),
    # a filter starting with "+" or "#" matches no topic starting with "$" [MQTT-4.7.2-1]
    ("#", "$SYS/x", None), ("+/x", "$SYS/x", None), ("+/#", "$SYS/#", None), ("+", "$x", None),
    ("$SYS/#", "$SYS/x", "$SYS/x"), ("$SYS/+", "$SYS/#", "$SYS/+"), ("$SYS/#", "$OTHER/#", None),
    ("a/#", "a/$x", "a/$x"), ("+/+", "a/$x", "a/$x"),  # "$" matters at the first level only
    # 4.7.3: names are case sensitive, and a leading "/" makes an empty first level
    ("ACCOUNTS/#", "Accounts/+", None), ("/finance", "+/+", "/finance"), ("/finance", "+", None),
    ("+/+", "/", "/"), ("#", "/", "/"),
    # one empty level would be the empty string, which is no topic name [MQTT-4.7.3-1]
    ("+", "/#", None), ("#", "+", "+"),
])
def test_filter_intersection(a: str, b: str, intersection: str | None) -> None:
    assert filter_intersection(a, b) == intersection
    assert filter_intersection(b, a) == intersection
    assert filters_overlap(a, b) is (intersection is not None)


@settings(max_examples=1000, deadline=None)
@given(a=topic_filters(), b=topic_filters())
def test_filters_overlap_agrees_with_brute_force(a: str, b: str) -> None:
    """Some topic name matches both filters exactly when one in the bounded universe does (see
    topic_helpers.UNIVERSE for why the universe suffices)."""
    assert filters_overlap(a, b) is bool(matched(a) & matched(b))


@settings(max_examples=500, deadline=None)
@given(a=topic_filters(), b=topic_filters())
def test_filter_intersection_matches_what_both_match(a: str, b: str) -> None:
    meet = filter_intersection(a, b)
    if meet is None:
        assert not matched(a) & matched(b)
    else:
        assert valid_topic_filter(meet) and matched(meet) == matched(a) & matched(b)


# --- SubscriptionTree: add / replace / remove -------------------------------------------------

def test_subscribing_again_with_the_same_options_leaves_the_matches_standing() -> None:
    """A client with a session subscribes again to what it holds as it reconnects: the topics
    matched so far stay matched (the cache is emptied only when a subscription changes)."""
    tree = SubscriptionTree()
    assert not tree.add(sub("c", "a/+", qos=1))
    clients, _ = tree.match("a/b")
    assert tree.add(sub("c", "a/+", qos=1))
    assert tree.match("a/b")[0] is clients and tree.count == 1
    assert tree.add(sub("c", "a/+", qos=2))
    assert tree.match("a/b")[0] is not clients and tree.match("a/b")[0][0].qos == 2


def test_turns_count_per_group_and_forget_them_all_past_the_bound() -> None:
    turns = Turns()
    assert [turns.next(("g", "$share/g/t")) for _ in range(3)] == [0, 1, 2]
    assert turns.next(("h", "$share/h/t")) == 0
    for n in range(MAX_SHARE_TURNS - 2):
        turns.next((f"job{n}", "t"))
    assert len(turns) == MAX_SHARE_TURNS
    assert turns.next(("g", "$share/g/t")) == 3  # a group counted already goes on
    turns.next(("new", "t"))
    assert len(turns) == 1


def test_turns_of_more_groups_than_the_bound_still_go_round() -> None:
    """Messages to more groups than are counted, in a cycle: each group is forgotten before its
    next message, and still its members take turns (not the first member every time)."""
    turns = Turns(limit=10)
    groups = [(f"g{n}", "t") for n in range(11)]
    chosen = [[turns.next(share) % 2 for share in groups] for _ in range(60)]
    for n in range(len(groups)):
        assert {round[n] for round in chosen} == {0, 1}, n


def test_add_counts_and_replace() -> None:
    tree = SubscriptionTree()
    assert tree.count == 0
    assert tree.add(sub("c1", "a/b")) is False
    assert tree.add(sub("c2", "a/b")) is False
    assert tree.add(sub("c1", "a/+")) is False
    assert tree.count == 3
    # [MQTT-3.8.4-3] the same filter again replaces the subscription
    assert tree.add(sub("c1", "a/b", qos=2)) is True
    assert tree.count == 3
    assert [s.qos for c, subs, *_ in tree.match("a/b")[0] if c == "c1" for s in subs
            if s.topic_filter == "a/b"] == [2]


def test_shared_subscriptions_count_per_group_and_client() -> None:
    tree = SubscriptionTree()
    assert tree.add(sub("c1", "$share/g/a")) is False
    assert tree.add(sub("c2", "$share/g/a")) is False
    assert tree.add(sub("c1", "$share/h/a")) is False
    assert tree.add(sub("c1", "a")) is False  # an ordinary one on the same filter is separate
    assert tree.add(sub("c1", "$share/g/a", qos=1)) is True
    assert tree.count == 4


def test_remove() -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", "a/b"))
    tree.add(sub("c2", "a/b"))
    tree.add(sub("c1", "$share/g/a/b"))
    assert tree.remove("c3", "a/b") is False  # not that client's
    assert tree.remove("c1", "a/c") is False  # no such filter
    assert tree.remove("c1", "a") is False  # only an inner node of "a/b"
    assert tree.remove("c1", "$share/h/a/b") is False  # other group
    assert tree.remove("c2", "$share/g/a/b") is False  # not a member
    assert tree.count == 3
    assert tree.remove("c1", "a/b") is True
    assert tree.remove("c1", "a/b") is False
    assert tree.count == 2
    assert by_client(tree.match("a/b")) == {"c2": ["a/b"]}
    assert tree.remove("c1", "$share/g/a/b") is True
    assert tree.count == 1
    assert tree.match("a/b")[1] == []


def test_removing_an_inner_filter_keeps_deeper_ones() -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", "a"))
    tree.add(sub("c1", "a/b/c"))
    assert tree.remove("c1", "a") is True
    assert by_client(tree.match("a/b/c")) == {"c1": ["a/b/c"]}
    assert by_client(tree.match("a")) == {}


def members_of(tree: SubscriptionTree, group: str, topic_filter: str) -> list[str]:
    found = tree.shared_group(group, topic_filter)
    return sorted(found.members) if found is not None else []


def test_shared_members() -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", "$share/g/a/+"))
    tree.add(sub("c2", "$share/g/a/+"))
    tree.add(sub("c3", "$share/h/a/+"))
    tree.add(sub("c4", "a/+"))
    assert members_of(tree, "g", "$share/g/a/+") == ["c1", "c2"]
    assert members_of(tree, "h", "$share/h/a/+") == ["c3"]
    assert tree.shared_group("x", "$share/x/a/+") is None
    assert tree.shared_group("g", "$share/g/a/b") is None
    assert tree.shared_group("g", "$share/g/z/y") is None
    tree.remove("c1", "$share/g/a/+")
    assert members_of(tree, "g", "$share/g/a/+") == ["c2"]


def test_a_shared_group_is_one_match_and_keeps_its_connected_members_apart() -> None:
    """A topic's match holds the group itself, counted as one in the cache whatever its size (a
    copy of its members, counted each, left a wildcard group of 5,000 members 20 topics cached);
    the members whose clients are connected are kept up to date as they come and go, subscribe,
    change their options and leave."""
    tree = SubscriptionTree()
    for n in range(5):
        tree.add(sub(f"c{n}", "$share/g/a/+"), connected=n % 2 == 0)
    _, [(share, group)] = tree.match("a/b")
    assert share == ("g", "$share/g/a/+") and group is tree.shared_group(*share)
    assert tree._cached_matches == 1
    connected = lambda: sorted(s.client_id for s in group.connected)  # noqa: E731
    assert connected() == ["c0", "c2", "c4"]
    tree.set_connected(sub("c1", "$share/g/a/+"), True)
    tree.set_connected(sub("c0", "$share/g/a/+"), False)
    tree.set_connected(sub("c0", "$share/g/a/+"), False)
    tree.set_connected(sub("c9", "$share/g/a/+"), True)  # (no member)
    assert connected() == ["c1", "c2", "c4"]
    tree.add(sub("c2", "$share/g/a/+", qos=1), connected=True)
    assert [s.qos for s in group.connected if s.client_id == "c2"] == [1]
    tree.remove("c4", "$share/g/a/+")
    tree.remove("c0", "$share/g/a/+")
    assert connected() == ["c1", "c2"] and sorted(group.members) == ["c1", "c2", "c3"]
    tree.add(sub("c3", "$share/g/a/+"), connected=True)  # the same again, as its client reconnects
    assert connected() == ["c1", "c2", "c3"]


def test_iteration_yields_every_subscription() -> None:
    tree = SubscriptionTree()
    subs = [sub("c1", "a/b"), sub("c2", "a/b"), sub("c1", "#"), sub("c3", "$share/g/a/+"),
            sub("c4", "$share/g/a/+"), sub("c1", "x/+/y")]
    for s in subs:
        tree.add(s)
    assert sorted((s.client_id, s.topic_filter) for s in tree) == sorted(
        (s.client_id, s.topic_filter) for s in subs)
    assert len(list(tree)) == tree.count == len(subs)


# --- SubscriptionTree: matching ---------------------------------------------------------------

def test_match_lists_a_clients_overlapping_subscriptions_together() -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", "sport/tennis/player1"))
    tree.add(sub("c1", "sport/#"))
    tree.add(sub("c1", "sport/+/player1"))
    tree.add(sub("c1", "sport/golf"))
    tree.add(sub("c2", "#"))
    tree.add(sub("c3", "sport/tennis/+/ranking"))
    result = by_client(tree.match("sport/tennis/player1"))
    assert set(result) == {"c1", "c2"}
    assert sorted(result["c1"]) == ["sport/#", "sport/+/player1", "sport/tennis/player1"]
    assert result["c2"] == ["#"]
    # one entry per client, never the same client twice
    assert len(tree.match("sport/tennis/player1")[0]) == 2


def test_match_returns_shared_groups_separately() -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", "a/b"))
    tree.add(sub("c2", "$share/g/a/b"))
    tree.add(sub("c3", "$share/g/a/b"))
    tree.add(sub("c4", "$share/g/a/+"))
    tree.add(sub("c5", "$share/h/a/b"))
    tree.add(sub("c6", "$share/h/x"))
    result = tree.match("a/b")
    assert by_client(result) == {"c1": ["a/b"]}
    assert by_group(result) == {
        ("g", "$share/g/a/b"): {"c2", "c3"},
        ("g", "$share/g/a/+"): {"c4"},
        ("h", "$share/h/a/b"): {"c5"},
    }


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("sport/#", "sport", True),
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+", "/finance", False),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$share/g/#", "$SYS/x", False),  # the $ rule holds inside a shared filter too
    ("$share/g/+/x", "$SYS/x", False),
    ("$share/g/$SYS/#", "$SYS/x", True),
])
def test_tree_matches_spec_examples(topic_filter: str, topic: str, expected: bool) -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", topic_filter))
    result = tree.match(topic)
    found = bool(result[0]) or bool(result[1])
    assert found is expected


def test_a_long_topic_is_matched_each_time_and_not_listed_as_recent() -> None:
    """10,000 topics of 60,000 characters held 600 MB after their publishers had gone."""
    tree = SubscriptionTree()
    tree.add(sub("c1", "a/#"))
    longest_cached = "a/" + "x" * (MAX_CACHED_TOPIC_LENGTH - 2)
    for topic in (longest_cached, longest_cached + "x"):
        assert by_client(tree.match(topic)) == {"c1": ["a/#"]}
    assert list(tree.recent) == [longest_cached]


def test_match_cache_sees_added_subscription() -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", "a/b"))
    assert by_client(tree.match("a/b")) == {"c1": ["a/b"]}
    tree.add(sub("c2", "a/+"))
    assert by_client(tree.match("a/b")) == {"c1": ["a/b"], "c2": ["a/+"]}
    tree.add(sub("c3", "$share/g/#"))
    assert by_group(tree.match("a/b")) == {("g", "$share/g/#"): {"c3"}}


def test_match_cache_sees_removed_subscription() -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", "a/b"))
    tree.add(sub("c2", "a/+"))
    assert set(by_client(tree.match("a/b"))) == {"c1", "c2"}
    tree.remove("c2", "a/+")
    assert by_client(tree.match("a/b")) == {"c1": ["a/b"]}


def test_match_cache_sees_replaced_subscription() -> None:
    tree = SubscriptionTree()
    tree.add(sub("c1", "a/b", qos=0))
    assert [s.qos for s in tree.match("a/b")[0][0][1]] == [0]
    tree.add(sub("c1", "a/b", qos=2))
    assert [s.qos for s in tree.match("a/b")[0][0][1]] == [2]


def test_match_with_no_subscriptions() -> None:
    tree = SubscriptionTree()
    assert tree.match("a/b") == ([], [])
    tree.add(sub("c1", "x/y"))
    assert tree.match("a/b") == ([], [])


def test_removing_everything_prunes_the_tree() -> None:
    tree = SubscriptionTree()
    filters = ["a/b/c", "a/b", "a/+/#", "#", "+", "$SYS/x", "/x/", "$share/g/a/b/c",
               "$share/h/q/r"]
    for index, topic_filter in enumerate(filters):
        tree.add(sub(f"c{index % 2}", topic_filter))
    tree.remove("c0", "a/b/c")
    # a sibling branch survives a partial removal
    assert by_client(tree.match("a/b/c")) == {"c1": ["#"], "c0": ["a/+/#"]}
    assert by_group(tree.match("a/b/c")) == {("g", "$share/g/a/b/c"): {"c1"}}
    for index, topic_filter in enumerate(filters):
        if topic_filter != "a/b/c":
            assert tree.remove(f"c{index % 2}", topic_filter) is True, topic_filter
    assert tree.count == 0
    assert list(tree) == []
    assert tree._root.children == {}
    assert tree._root.empty()


# --- property: the trie agrees with matches() -------------------------------------------------

# every topic of up to three levels, checked in each example besides the drawn ones
ALL_SHORT_TOPICS = sorted({"/".join(p) for n in (1, 2, 3) for p in product(LEVELS, repeat=n)}
                          - {""})


@settings(max_examples=200, deadline=None)
@given(filters=st.lists(topic_filters().filter(valid_topic_filter), max_size=8, unique=True),
       topics=st.lists(topic_names, min_size=1, max_size=6),
       removed=st.sets(st.integers(min_value=0, max_value=7)))
def test_tree_agrees_with_matches(filters: list[str], topics: list[str], removed: set[int]) -> None:
    tree = SubscriptionTree()
    topics = topics + ALL_SHORT_TOPICS
    for topic in topics:  # fill the match cache; the adds below must invalidate it
        assert tree.match(topic) == ([], [])
    # three clients share the filters, so one client often holds several overlapping ones
    owners = {f: f"c{i % 3}" for i, f in enumerate(filters)}
    groups = {f: f"g{i % 2}" for i, f in enumerate(filters)}
    for f in filters:
        tree.add(sub(owners[f], f))
        tree.add(sub("s-" + owners[f], f"$share/{groups[f]}/{f}"))
    assert tree.count == 2 * len(filters)

    def check(live: list[str]) -> None:
        for topic in topics:
            expected_clients: dict[str, list[str]] = {}
            expected_groups: dict[tuple[str, str], set[str]] = {}
            for f in live:
                if matches(f, topic):
                    expected_clients.setdefault(owners[f], []).append(f)
                    shared = f"$share/{groups[f]}/{f}"
                    expected_groups[(groups[f], shared)] = {"s-" + owners[f]}
            for _ in range(2):  # the second answer comes from the cache
                result = tree.match(topic)
                assert {c: sorted(fs) for c, fs in by_client(result).items()} == {
                    c: sorted(fs) for c, fs in expected_clients.items()}, topic
                assert by_group(result) == expected_groups, topic

    check(filters)
    gone = [f for i, f in enumerate(filters) if i in removed]
    for f in gone:
        assert tree.remove(owners[f], f) is True
        assert tree.remove("s-" + owners[f], f"$share/{groups[f]}/{f}") is True
    live = [f for f in filters if f not in gone]
    assert tree.count == 2 * len(live)
    check(live)
    for f in live:
        assert tree.remove(owners[f], f) is True
        assert tree.remove("s-" + owners[f], f"$share/{groups[f]}/{f}") is True
    assert tree.count == 0
    assert tree._root.children == {}


def test_the_match_cache_is_bounded_by_its_matches_too() -> None:
    """500 clients on sensors/# and messages on 10,000 sensor topics: the cache, bounded at
    10,000 topics, kept 500 matches for each, 850 MB (1.7 GB with 1,000 clients), held until a
    subscription changed, then freed in one go (0.6 s of the reactor for one SUBSCRIBE)."""
    import gc
    import tracemalloc
    tree = SubscriptionTree()
    for n in range(200):
        tree.add(Subscription(client_id=f"dashboard{n}", topic_filter="sensors/#"))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n in range(1200):  # 240,000 matches: about 40 MB kept before
            assert len(tree.match(f"sensors/{n}")[0]) == 200
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 28 * 2**20, f"{held / 2**20:.0f} MiB"
    assert tree.match("sensors/1199")[0] is tree.match("sensors/1199")[0]  # (the latest cached all the same)


def test_a_shared_groups_turns_keep_no_long_filter() -> None:
    """Counted per (group, whole $share filter), up to 10,000 groups: 650 MB of filters of 65,535
    bytes after the groups had gone. The longest are not counted (their turns start at random)."""
    turns = Turns()
    for n in range(100):
        turns.next((f"g{n}", f"$share/g{n}/t/" + "x" * (MAX_CACHED_TOPIC_LENGTH + 1)))
    assert len(turns) == 0
    assert [turns.next(("g", "$share/g/t")) for _ in range(3)] == [0, 1, 2]


def test_a_match_larger_than_the_cache_is_not_cached() -> None:
    from mqtt_broker.topics import MAX_CACHED_MATCHES
    tree = SubscriptionTree()
    for n in range(MAX_CACHED_MATCHES + 1):
        tree.add(Subscription(client_id=f"c{n}", topic_filter="#"))
    first = tree.match("a")[0]
    assert len(first) == MAX_CACHED_MATCHES + 1 and tree.match("a")[0] is not first
