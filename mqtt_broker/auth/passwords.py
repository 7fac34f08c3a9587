"""Mosquitto's password hashes and password file, read and written as ``mosquitto_passwd`` 2.0 does.

A password file has one ``username:hash`` line per user. The hash is one of:

- ``$7$<iterations>$<salt>$<digest>``: PBKDF2-HMAC-SHA512 (mosquitto_passwd 2.0's default, 101
  iterations);
- ``$6$<salt>$<digest>``: SHA-512 of the password followed by the salt (Mosquitto 1.x).

The salt is 12 bytes and the digest 64, both in standard base64; Mosquitto refuses other
lengths, and so does this module. Lines starting with ``#`` and blank lines are skipped.

Pure Python (hashlib, hmac): no Twisted, so the ``mqttbroker-passwd`` command and the
broker's password check share it. Hashing is slow on purpose: the broker runs
:meth:`PasswordHash.verify` off the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from .files import BLANKS, lines_of, read_utf8

PBKDF2 = "sha512-pbkdf2"
SHA512 = "sha512"
ALGORITHMS = (PBKDF2, SHA512)
DEFAULT_ITERATIONS = 101
"""What ``mosquitto_passwd`` 2.0 uses. Raise it with ``mqttbroker-passwd -I``: each step costs
about a microsecond per connection attempt (10,000 iterations: about 6 ms)."""
SALT_LENGTH = 12
DIGEST_LENGTH = 64
MAX_ITERATIONS = 2**31 - 1  # Mosquitto reads the count with atoi()


class PasswordFileError(ValueError):
    """A password file or hash that cannot be read; ``str()`` names the file and line."""


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not base64") from None


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One stored password: the algorithm, its parameters and the digest."""

    algorithm: str
    """``sha512-pbkdf2`` ($7$) or ``sha512`` ($6$)."""
    salt: bytes
    digest: bytes = field(repr=False)
    iterations: int = 0
    """PBKDF2 iterations; 0 for ``sha512``."""

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Read ``$7$...`` or ``$6$...``; raises ValueError saying what is wrong."""
        parts = text.split("$")
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            if not parts[2].isdigit() or not 1 <= int(parts[2]) <= MAX_ITERATIONS:
                raise ValueError(f"bad iteration count {parts[2]!r}")
            algorithm, iterations, salt_text, digest_text = PBKDF2, int(parts[2]), parts[3], parts[4]
        elif len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            algorithm, iterations, salt_text, digest_text = SHA512, 0, parts[2], parts[3]
        else:
            raise ValueError("not a $6$ or $7$ hash")
        salt, digest = _b64decode(salt_text), _b64decode(digest_text)
        if len(salt) != SALT_LENGTH:
            raise ValueError(f"the salt is {len(salt)} bytes, not {SALT_LENGTH}")
        if len(digest) != DIGEST_LENGTH:
            raise ValueError(f"the digest is {len(digest)} bytes, not {DIGEST_LENGTH}")
        return cls(algorithm, salt, digest, iterations)

    @classmethod
    def create(cls, password: bytes, algorithm: str = PBKDF2, iterations: int = DEFAULT_ITERATIONS,
               salt: bytes | None = None) -> PasswordHash:
        """Hash a password with a fresh random salt (or the one given)."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        if algorithm == PBKDF2 and not 1 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations must be 1..{MAX_ITERATIONS}")
        salt = os.urandom(SALT_LENGTH) if salt is None else salt
        if len(salt) != SALT_LENGTH:
            raise ValueError(f"the salt must be {SALT_LENGTH} bytes")
        iterations = iterations if algorithm == PBKDF2 else 0
        return cls(algorithm, salt, _digest(password, algorithm, salt, iterations), iterations)

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` is the one stored; compares in constant time. Slow by design.

        A password holding a NUL byte never matches: no password file can store one (Mosquitto
        ends a password at the first NUL), and HMAC, under PBKDF2, pads its key with NULs, so
        ``b"pw\\x00"`` would otherwise pass for ``b"pw"``."""
        matches = hmac.compare_digest(_digest(password, self.algorithm, self.salt, self.iterations), self.digest)
        return matches and b"\x00" not in password

    def __str__(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        if self.algorithm == PBKDF2:
            return f"$7${self.iterations}${salt}${digest}"
        return f"$6${salt}${digest}"


def _digest(password: bytes, algorithm: str, salt: bytes, iterations: int) -> bytes:
    if algorithm == PBKDF2:
        return hashlib.pbkdf2_hmac("sha512", password, salt, iterations, DIGEST_LENGTH)
    return hashlib.sha512(password + salt).digest()


@dataclass(frozen=True, slots=True)
class PasswordFile:
    """The users of a password file, in file order."""

    users: dict[str, PasswordHash]
    source: str = ""
    repeated: tuple[str, ...] = ()
    """What to warn of: each line of a user listed before, and the line it puts out of use."""

    @classmethod
    def parse(cls, text: str, source: str = "") -> PasswordFile:
        """Read the text of a password file; raises PasswordFileError naming the line.

        Stricter than Mosquitto, which drops a bad line with a log message: here a bad line
        refuses the whole file, so that a reload never silently locks a user out. A user listed
        twice has the password of their last line, as in Mosquitto (``repeated`` says so).
        """
        users: dict[str, PasswordHash] = {}
        lines: dict[str, int] = {}
        repeated: list[str] = []
        for number, line in enumerate(lines_of(text), 1):
            stripped = line.strip(BLANKS)
            if not stripped or stripped.startswith("#"):
                continue
            where = f"{source}, line {number}" if source else f"line {number}"
            username, colon, hashed = line.partition(":")
            username, hashed = username.strip(BLANKS), hashed.strip(BLANKS)
            if not colon or not username:
                raise PasswordFileError(f"{where}: expected username:hash")
            try:
                users_hash = PasswordHash.parse(hashed)
            except ValueError as e:
                # The hash is not a secret worth hiding, but a plain-text password put there by
                # mistake would be: never repeat the field.
                raise PasswordFileError(f"{where}: user {username!r}: {e}") from None
            if username in users:
                repeated.append(f"{where}: user {username!r} given again: its line {lines[username]} is not used "
                                f"(the last line counts, as in Mosquitto)")
            users[username], lines[username] = users_hash, number
        return cls(users, source, tuple(repeated))

    @classmethod
    def load(cls, path: str | Path) -> PasswordFile:
        """Read a password file; raises PasswordFileError (a ValueError) naming it."""
        return cls.parse(read_utf8(path, PasswordFileError), str(path))

    def dump(self) -> str:
        """The file's text, as mosquitto_passwd writes it."""
        return "".join(f"{username}:{hashed}\n" for username, hashed in self.users.items())


__all__ = ["PasswordHash", "PasswordFile", "PasswordFileError", "PBKDF2", "SHA512", "ALGORITHMS",
           "DEFAULT_ITERATIONS"]
