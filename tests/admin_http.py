"""The admin site of a broker process, called over HTTP with urllib (loopback only)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from conftest import BrokerProcess, free_port, wait_for_port

from mqtt_broker.admin.keys import hash_key

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "another-key-that-is-not-configured"


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Admin:
    broker: BrokerProcess
    http_port: int
    exercised: set[tuple[str, str]] = field(default_factory=set)
    """(method, path template) of every API call made, to check against the OpenAPI document."""
    templates: list[tuple[str, str]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def call(self, method: str, path: str, body: Any = None, key: str | None = KEY, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> Answer:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        self._record(method, path)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, payload, answer_headers = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            status, payload, answer_headers = error.code, error.read(), dict(error.headers)
        content_type = answer_headers.get("Content-Type", "")
        parsed: Any = json.loads(payload) if payload and content_type.startswith("application/json") else payload
        return Answer(status, parsed, {k.lower(): v for k, v in answer_headers.items()})

    def _record(self, method: str, path: str) -> None:
        path = path.split("?", 1)[0]
        if not path.startswith("/api/v1/"):
            return
        path = path[len("/api/v1"):]
        for template_method, template in self.templates:
            pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            # a {topic} or {topic_filter} parameter is the rest of the path
            pattern = pattern.replace(r"[^/]+$", r".+$") if template.endswith(("{topic}", "{topic_filter}")) else pattern
            if template_method == method and re.match(pattern, path):
                self.exercised.add((method, template))
                return


def start_admin(broker_process: Any, *args: str, keys: tuple[str, ...] = (KEY,)) -> Admin:
    http_port = free_port()
    key_flags = [flag for key in keys for flag in ("--http-api-key", "ci:" + hash_key(key))]
    broker = broker_process("--persistence", "memory", "--http", f"tcp:{http_port}:interface=127.0.0.1",
                            *key_flags, *args)
    wait_for_port(http_port, broker.process)
    return Admin(broker, http_port)


__all__ = ["Admin", "Answer", "KEY", "OTHER_KEY", "start_admin"]
