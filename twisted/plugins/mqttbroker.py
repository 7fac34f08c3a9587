from twisted.application.service import ServiceMaker

mqttbroker = ServiceMaker(
    "MQTT broker", "mqtt_broker.tap", "An MQTT 3.1/3.1.1/5.0 broker.", "mqttbroker")
