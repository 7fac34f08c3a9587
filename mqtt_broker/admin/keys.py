"""Admin API keys: only their SHA-256 hashes are in the configuration.

Keys are long random strings, so an unsalted hash is enough (there is nothing to guess a
dictionary word from). A request gives its key as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``; the key's name (or the first 8 hex digits of its hash) is what the logs say
made a change.

Make a key and the line for the configuration::

    python -m mqtt_broker.admin.keys ops
    # key:    0b1f...   (give this to the client; it is not stored anywhere)
    # config: http_api_keys = ["ops:sha256:5e88..."]

Hash a key you already have::

    python -c 'import hashlib,sys; print("sha256:" + hashlib.sha256(sys.argv[1].encode()).hexdigest())' KEY
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    digest: bytes


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of a key, as it goes in ``http_api_keys``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse(entries: Iterable[str]) -> list[ApiKey]:
    """``[name:]sha256:<hex>`` entries (validated by BrokerConfig) as ApiKeys."""
    keys = []
    for entry in entries:
        name, _, hexdigest = entry.rpartition("sha256:")
        name = name.rstrip(":")
        keys.append(ApiKey(name or hexdigest[:8], bytes.fromhex(hexdigest)))
    return keys


class KeyRing:
    """The keys a site accepts."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.keys = parse(entries)

    def identify(self, presented: str) -> str | None:
        """The id of the key ``presented``, or None if it is not one of ours (constant time per key)."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()  # (the bytes sent)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.key_id
        return found


def presented_key(request: Any) -> str | None:
    """The key a twisted.web request carries, or None. Read as UTF-8, as keys are hashed; bytes
    that are not UTF-8 make a key that matches none (a lone surrogate, which no key holds)."""
    authorization = request.getHeader(b"authorization")
    if authorization:
        scheme, _, token = authorization.decode("utf-8", "surrogateescape").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    header = request.getHeader(b"x-api-key")
    if header:
        return header.decode("utf-8", "surrogateescape").strip() or None
    return None


USAGE = """usage: python -m mqtt_broker.admin.keys [NAME]
Makes an admin API key: prints the key, and the http_api_keys entry (its hash, named NAME) for
the configuration."""


def main(argv: list[str]) -> int:
    name = argv[1] if len(argv) > 1 else ""
    if name.startswith("-"):
        asked = name in ("-h", "--help")
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if name and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        print("a key name has only ASCII letters, digits, '_', '.' and '-'", file=sys.stderr)
        return 2
    key = secrets.token_urlsafe(32)
    entry = (name + ":" if name else "") + hash_key(key)
    print(f"key:    {key}")
    print(f'config: http_api_keys = ["{entry}"]')
    print(f"flag:   --http-api-key {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


__all__ = ["ApiKey", "KeyRing", "hash_key", "parse", "presented_key"]
