"""Where a cluster's Redis is: ``redis://``, ``rediss://`` and ``redis+sentinel://`` URLs, parsed
without importing anything of the cluster (the configuration checks them)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

DEFAULT_PORT, DEFAULT_SENTINEL_PORT = 6379, 26379


@dataclass(frozen=True, slots=True)
class RedisAddress:
    hosts: tuple[tuple[str, int], ...]
    """The server, or the Sentinels."""
    service: str | None
    """The Sentinel service whose master is used; None for a plain server."""
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Raises ValueError saying what is wrong with ``url`` (naming it without its password)."""
        from ..config import url_without_password
        # (Shown without a password, nor a query that may hold one.)
        shown = repr(url_without_password(url).partition("?")[0].partition("#")[0])
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("redis", "rediss", "redis+sentinel"):
            raise ValueError(f"{shown}: the scheme must be redis://, rediss:// or redis+sentinel://")
        sentinel = scheme == "redis+sentinel"
        netloc = parts.netloc
        credentials, _, hostlist = netloc.rpartition("@")
        username = password = None
        if credentials:
            user, has_password, secret = credentials.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if has_password else unquote(user)
            if not has_password:
                username = None
        hosts = []
        for host in hostlist.split(","):
            if host.startswith("["):  # [IPv6]:port
                name, _, port = host[1:].partition("]")
                port = port.lstrip(":")
            else:
                name, _, port = host.partition(":")
            if not name:
                raise ValueError(f"{shown}: no host")
            try:
                number = int(port) if port else (DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT)
            except ValueError:
                number = 0
            if not 0 < number < 65536:
                raise ValueError(f"{shown}: a bad port")  # (not shown: it may be part of a password)
            hosts.append((name, number))
        path = [p for p in parts.path.split("/") if p]
        service = None
        if sentinel:
            if not path:
                raise ValueError(f"{shown}: a Sentinel URL names the service: redis+sentinel://host:26379/mymaster/0")
            service = path.pop(0)
        elif len(hosts) != 1:
            raise ValueError(f"{shown}: one host (several only for redis+sentinel://)")
        if path and not path[0].isdigit():
            raise ValueError(f"{shown}: the database must be a number (0 or more)")
        db = int(path[0]) if path else 0
        if len(path) > 1:
            raise ValueError(f"{shown}: an unexpected path")
        if parts.query or parts.fragment:
            raise ValueError(f"{shown}: nothing goes after the database (no ?query: a password goes before "
                             "the host, redis://:password@host)")
        return cls(tuple(hosts), service, db, username, password, scheme == "rediss")

    def __str__(self) -> str:
        where = ",".join(f"{host}:{port}" for host, port in self.hosts)
        return f"{where}/{self.service}/{self.db}" if self.service else f"{where}/{self.db}"


__all__ = ["RedisAddress"]
