# twistd -ny examples/broker.tac: the broker as one service of an application.
from twisted.application import service

from mqtt_broker import BrokerService

application = service.Application("mqtt")
broker = BrokerService(endpoints=["tcp:1883"])
broker.hooks.on_disconnect(lambda client, graceful: print("bye", client.client_id))
broker.setServiceParent(application)
