"""Topic filters drawn by hypothesis from a small alphabet of levels, and a brute-force reference
for what a filter matches: every topic name over that alphabet, long enough to decide any
question about two drawn filters (overlap, cover)."""

from __future__ import annotations

from functools import lru_cache
from itertools import product

from hypothesis import strategies as st

from mqtt_broker.topics import matches

LEVELS = ["a", "b", "$x", ""]
"""Level names of drawn topics and filters: plain ones, a "$" one (which matters at the first
level only [MQTT-4.7.2-1]) and the empty level (a level like any other)."""

MAX_FILTER_LEVELS = 4

FRESH = "c"
"""A level name no drawn filter uses."""

UNIVERSE = tuple(sorted({"/".join(levels) for n in range(1, MAX_FILTER_LEVELS + 2)
                         for levels in product(LEVELS + [FRESH], repeat=n)} - {""}))
"""Every topic name of one to MAX_FILTER_LEVELS + 1 levels over LEVELS and FRESH ("" alone is
no topic name [MQTT-4.7.3-1]). Enough for an exact answer about two drawn filters: take a topic
that tells them apart or that both match. Where a filter has a literal level, the topic has
that name; where both have a wildcard, the name is free, and FRESH (no "$", so allowed even
first) does as well as any. Past the longer filter's levels only a "#" matches, and one level
there shows what it allows; the rest can be cut off without changing the answer. So one such
topic lies in UNIVERSE, and ``any(... for topic in UNIVERSE)`` is exact."""

topic_names = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=MAX_FILTER_LEVELS).map("/".join).filter(
    lambda topic: topic != "")


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    """A valid, non-shared filter of up to MAX_FILTER_LEVELS levels over LEVELS, "+" and "#"."""
    levels = draw(st.lists(st.sampled_from(LEVELS + ["+"]), min_size=0, max_size=MAX_FILTER_LEVELS - 1))
    if not levels or draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    return topic_filter if topic_filter else "+"  # "" is no filter [MQTT-4.7.3-1]


@lru_cache(maxsize=None)
def matched(topic_filter: str) -> frozenset[str]:
    """The topics of UNIVERSE the filter matches (by ``topics.matches``)."""
    return frozenset(topic for topic in UNIVERSE if matches(topic_filter, topic))
