"""Reading the security files (password file, ACL file) as text."""

from __future__ import annotations

from pathlib import Path

BLANKS = " \t\n\v\f\r"
"""What Mosquitto trims around its files' lines and words (C's isspace): ASCII alone, where
Python's ``strip()`` takes any Unicode space too, which a user name may hold."""


def lines_of(text: str) -> list[str]:
    """The lines of a security file as Mosquitto reads them (fgets): ended by a newline alone,
    where ``splitlines()`` ends one at ``\v``, ``\f``, U+2028 and others, which a user name may
    hold: a rule would then fall under another user."""
    return text.split("\n")


def read_utf8(path: str | Path, error: type[ValueError]) -> str:
    """The file's text; raises ``error`` naming the file (and line) when it cannot be read or a
    line other than a comment is not UTF-8. A comment may be in any encoding, as Mosquitto reads
    bytes: one that is not UTF-8 is read as ``#``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            if not line.lstrip().startswith(b"#"):
                raise error(f"{path}:{number}: not UTF-8 (byte {e.start + 1})") from None
            lines[number - 1] = b"#"
    return b"\n".join(lines).decode("utf-8")
