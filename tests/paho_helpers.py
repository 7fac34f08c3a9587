"""paho-mqtt clients for end-to-end tests, with bounded waits instead of sleeps."""

from __future__ import annotations

import queue
from typing import Any

import paho.mqtt.client as mqtt

WAIT = 10.0


class PahoClient:
    def __init__(self, port: int, client_id: str = "", clean: bool = True, version: int = mqtt.MQTTv311,
                 will: tuple[str, bytes, int, bool] | None = None, properties: Any = None,
                 username: str | None = None, password: str | None = None, **tls: Any) -> None:
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": version}
        if version != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", (flags, rc)))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.events.put(("subscribe", rcs))
        self.client.on_unsubscribe = lambda c, u, mid, rcs, props: self.events.put(("unsubscribe", rcs))
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc))
        self.client.on_publish = lambda c, u, mid, rc, props: self.events.put(("publish", rc))
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(*will)
        if tls:
            self.client.tls_set(**tls)
        v5 = {"clean_start": clean, "properties": properties} if version == mqtt.MQTTv5 else {}
        self.client.connect("127.0.0.1" if not tls else "localhost", port, keepalive=60, **v5)
        self.client.loop_start()
        kind, (self.flags, self.reason) = self.event("connect")

    def event(self, kind: str) -> tuple[str, Any]:
        while True:
            got = self.events.get(timeout=WAIT)
            if got[0] == kind:
                return got

    def subscribe(self, topic: str, qos: int = 0, options: Any = None, properties: Any = None) -> Any:
        if options is not None:
            self.client.subscribe(topic, options=options, properties=properties)
        else:
            self.client.subscribe(topic, qos, properties=properties)
        return self.event("subscribe")[1]

    def unsubscribe(self, topic: str) -> Any:
        self.client.unsubscribe(topic)
        return self.event("unsubscribe")[1]

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, properties: Any = None) -> None:
        info = self.client.publish(topic, payload, qos, retain, properties=properties)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()

    def message(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT)

    def no_message(self, within: float = 0.3) -> bool:
        try:
            self.messages.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
