"""Reading the security files (password file, ACL file) as text."""

from __future__ import annotations

from pathlib import Path


def read_utf8(path: str | Path, error: type[ValueError]) -> str:
    """The file's text; raises ``error`` naming the file when it cannot be read or is not UTF-8."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (byte {e.start})") from None
