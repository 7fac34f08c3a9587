"""The ``mqtts:`` server endpoint (TLS with verified client certificates) as a Twisted plugin.
Light on purpose: Twisted imports every plugin module when it lists plugins, so the parser's
module imports nothing heavy until an endpoint is parsed."""

from mqtt_broker.auth.endpoint import MQTTSServerParser

mqtts = MQTTSServerParser()
