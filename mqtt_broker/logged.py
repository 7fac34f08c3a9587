"""A client's own strings (client id, user name, topic) as the log shows them: bounded, so that
a client, before it is authenticated even, does not decide how much a line of the log takes."""

from __future__ import annotations

from typing import Final

LOGGED_LENGTH: Final = 256
"""Characters of a client's string that a log line keeps (MQTT allows 65,535 bytes, which
Twisted's JSON log writes twice, raw and repr'd, and a control character as six bytes)."""


def shortened(text: str | None) -> str | None:
    """``text`` as logged: its first ``LOGGED_LENGTH`` characters, then how long it was."""
    if text is None or len(text) <= LOGGED_LENGTH:
        return text
    return f"{text[:LOGGED_LENGTH]}... ({len(text)} characters)"
