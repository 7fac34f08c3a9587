"""``mqttbroker-passwd``: create and update Mosquitto password files, as ``mosquitto_passwd`` does.

::

    mqttbroker-passwd [-H sha512-pbkdf2|sha512] [-I ITERATIONS] [-c | -D] passwordfile username
    mqttbroker-passwd [-H ...] [-I ITERATIONS] [-c] -b passwordfile username password
    mqttbroker-passwd [-H ...] [-I ITERATIONS] -U passwordfile

Also ``python -m mqtt_broker.passwd``. Files it writes verify in Mosquitto, and Mosquitto's in
the broker. Differences from ``mosquitto_passwd``: ``-U`` leaves lines that already hold a hash
alone (instead of hashing the hash), an empty username is refused, and the file is replaced
atomically, keeping its permissions (a new file is readable by its owner only).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence, TextIO

from .auth.files import BLANKS, lines_of, read_utf8
from .auth.passwords import (ALGORITHMS, DEFAULT_ITERATIONS, MAX_ITERATIONS, PBKDF2, PasswordFile,
                             PasswordFileError, PasswordHash)


class CommandError(Exception):
    """Something the user must fix; printed as "Error: ..." with exit status 1."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqttbroker-passwd",
        description="Manage Mosquitto password files (username:$7$... lines) for mqttbroker and Mosquitto.")
    parser.add_argument("-H", dest="algorithm", choices=ALGORITHMS, default=PBKDF2,
                        help=f"hash algorithm (default {PBKDF2}, which is recommended; sha512 is Mosquitto 1.x's)")
    parser.add_argument("-I", dest="iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"PBKDF2 iterations (default {DEFAULT_ITERATIONS}, as mosquitto_passwd); more "
                        "is slower to guess, and slower for every connection attempt")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-c", dest="create", action="store_true",
                      help="create a new password file, overwriting an existing one")
    mode.add_argument("-D", dest="delete", action="store_true", help="delete the user")
    mode.add_argument("-U", dest="upgrade", action="store_true",
                      help="hash every plain-text password of the file")
    parser.add_argument("-b", dest="batch", action="store_true",
                        help="batch mode: the password is given on the command line")
    parser.add_argument("passwordfile")
    parser.add_argument("username", nargs="?")
    parser.add_argument("password", nargs="?")
    return parser


def _read_text(path: Path) -> str:
    """The file's text to edit. A comment that is not UTF-8, which the broker reads (as Mosquitto
    reads bytes), is kept byte for byte (``surrogateescape``); another line refuses the file."""
    try:
        data = path.read_bytes()
        read_utf8(path, PasswordFileError)
    except OSError as e:
        raise CommandError(f"unable to open password file {path}: {e.strerror}") from None
    except PasswordFileError as e:
        raise CommandError(str(e)) from None
    return data.decode("utf-8", "surrogateescape")


def _load(path: Path) -> PasswordFile:
    try:
        return PasswordFile.parse(_read_text(path), str(path))
    except PasswordFileError as e:
        raise CommandError(str(e)) from None


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one, which
    keeps the old one's mode and owner (a broker running as its own user must still read it).
    A symbolic link stays one: the file it names is replaced. Raises CommandError naming
    ``path`` when it cannot be written."""
    given, path = path, Path(os.path.realpath(path))
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    try:
        _write_beside(path, text, old)
    except OSError as e:  # (its file name is the temporary file's, a name the user never gave)
        raise CommandError(f"unable to write password file {given}: {e.strerror or e}") from None


def _write_beside(path: Path, text: str, old: os.stat_result | None) -> None:
    """Write ``text`` to a new file beside ``path``, with ``old``'s mode and owner, then put it
    in ``path``'s place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent or Path("."), prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", errors="surrogateescape") as file:
            file.write(text)
            file.flush()
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(file.fileno(), old.st_uid, old.st_gid)
                except PermissionError:
                    raise CommandError(f"{path} belongs to another user or group, which it must keep: run this as "
                                       f"that user or as root") from None
            os.fsync(file.fileno())
        os.chmod(temporary, old.st_mode & 0o7777 if old is not None else 0o600)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _ask_password(stdin: TextIO) -> bytes:
    if stdin.isatty():
        first, again = getpass.getpass("Password: "), getpass.getpass("Reenter password: ")
    else:  # piped, twice, as mosquitto_passwd reads it: kept out of the command line (and ps)
        lines = [stdin.readline() for _ in range(2)]
        if not lines[1]:  # (end of input: an empty password is an empty line)
            raise CommandError("no password on standard input (give it twice, a line each)")
        first, again = (line.removesuffix("\n").removesuffix("\r") for line in lines)
    if first != again:
        raise CommandError("passwords do not match")
    return os.fsencode(first)


def _upgrade(path: Path, algorithm: str, iterations: int) -> None:
    text = _read_text(path)
    out = []
    for line in lines_of(text.removesuffix("\n")) if text else []:
        username, colon, value = line.partition(":")
        if line.lstrip(BLANKS).startswith("#") or not colon:
            out.append(line)
            continue
        try:
            PasswordHash.parse(value.strip(BLANKS))
            out.append(line)  # already hashed
        except ValueError:
            hashed = PasswordHash.create(value.strip(BLANKS).encode("utf-8"), algorithm, iterations)
            out.append(f"{username.strip(BLANKS)}:{hashed}")
    text = "".join(line + "\n" for line in out)
    try:  # (a file the broker would refuse would lock every user out)
        PasswordFile.parse(text, str(path))
    except PasswordFileError as e:
        raise CommandError(f"{e}; the file is left as it was") from None
    write_atomically(path, text)


def run(argv: Sequence[str], stdin: TextIO = sys.stdin) -> None:
    """Carry out one command; raises CommandError."""
    args = _parser().parse_args(argv)
    path = Path(args.passwordfile)
    if args.algorithm == PBKDF2 and not 1 <= args.iterations <= MAX_ITERATIONS:
        raise CommandError(f"the number of iterations must be 1 to {MAX_ITERATIONS}")
    if args.upgrade:
        if args.username is not None:
            raise CommandError("-U takes only the password file")
        _upgrade(path, args.algorithm, args.iterations)
        return
    if args.username is None:
        raise CommandError("a username is required")
    username: str = args.username
    try:
        username.encode("utf-8")
    except UnicodeEncodeError:
        raise CommandError("the username must be UTF-8, as the broker reads the file") from None
    if not username or ":" in username or username != username.strip() or "\n" in username or username[0] == "#":
        raise CommandError("the username must not be empty, contain ':' or a line break, "
                           "start with '#' (a comment) or start or end with a space")
    if args.delete:
        if args.batch or args.password is not None:
            raise CommandError("-D takes no password")
        if not _replace_line(path, username, None):
            raise CommandError(f"user {username} not found in password file")
        return
    if args.batch:
        if args.password is None:
            raise CommandError("-b needs the password on the command line")
        password = os.fsencode(args.password)  # the exact bytes typed, even if not UTF-8
    else:
        if args.password is not None:
            raise CommandError("give the password only with -b")
        password = _ask_password(stdin)
    hashed = PasswordHash.create(password, args.algorithm, args.iterations)
    if args.create:
        write_atomically(path, PasswordFile({username: hashed}).dump())
    elif not _replace_line(path, username, f"{username}:{hashed}"):
        text = _read_text(path)
        write_atomically(path, text + ("" if not text or text.endswith("\n") else "\n") + f"{username}:{hashed}\n")


def _replace_line(path: Path, username: str, line: str | None) -> bool:
    """Replace (or with None, remove) the user's lines, every one as mosquitto_passwd does (the
    broker reads the last), keeping every other line as it is; False when the user has no line.
    Refuses a file the broker could not read."""
    _load(path)
    text = _read_text(path)
    lines = [line + "\n" for line in lines_of(text.removesuffix("\n"))] if text else []
    if text and not text.endswith("\n"):
        lines[-1] = lines[-1][:-1]
    kept, found = [], False
    for old in lines:
        name, colon, _ = old.partition(":")
        if not colon or old.lstrip(BLANKS).startswith("#") or name.strip(BLANKS) != username:
            kept.append(old)
            continue
        found = True
        if line is not None:
            kept.append(line + "\n")
    if found:
        write_atomically(path, "".join(kept))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: exit status 0 on success, 1 on an error (printed), 2 on bad usage."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except CommandError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"Error: {e.filename}: {e.strerror}" if e.filename else f"Error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
