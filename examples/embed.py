"""Run the broker inside your own Twisted program, with hooks and server-side publishing.

    python examples/embed.py [PORT]
"""

from __future__ import annotations

import sys

from twisted.internet import reactor

from mqtt_broker import BrokerService, Client, Message


def main(port: int = 1883) -> None:
    broker = BrokerService(endpoints=[f"tcp:{port}:interface=127.0.0.1"], max_queued_messages=500)

    @broker.hooks.on_connect
    def greet(client: Client) -> None:  # (a decision: None lets it in, unless the broker refuses it still)
        print(f"connecting: {client.client_id} from {client.peer}", flush=True)

    @broker.hooks.on_publish
    def no_secrets(client: Client, message: Message) -> bool:
        return not message.topic.startswith("secret/")  # False drops the message

    broker.startService()
    broker.publish("status/app", b"up", qos=1, retain=True)
    reactor.addSystemEventTrigger("before", "shutdown", broker.stopService)
    print(f"listening on {port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1883)
