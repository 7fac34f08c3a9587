"""The ``twistd mqttbroker`` plugin: one statement and no reactor import, because ``twistd --help``
imports every plugin. There is deliberately no ``twisted/plugins/__init__.py``: it would shadow
Twisted's own ``twisted.plugins`` package."""

from twisted.application.service import ServiceMaker

mqttbroker = ServiceMaker(
    "MQTT broker", "mqtt_broker.tap", "An MQTT 3.1/3.1.1/5.0 broker.", "mqttbroker")
