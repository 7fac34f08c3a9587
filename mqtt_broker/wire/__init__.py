"""The MQTT wire format, sans I/O: packets, reason codes, properties, a frame reader and an encoder.

Nothing here imports Twisted or touches a socket, so it can be tested, fuzzed and benchmarked alone.
"""

from .codec import FrameReader, decode, decode_publish, encode, encode_connack, encode_publish, publish_template
from .codes import (
    ConnackCode, MalformedPacket, MQTTError, PacketTooLarge, ProtocolError, ReasonCode,
    UnsupportedProtocolVersion, v3_connack_code,
)
from .packets import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Auth, Connack, Connect, Disconnect, Packet,
    Pingreq, Pingresp, Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe,
    SubscriptionRequest, Unsuback, Unsubscribe, Will,
)

__all__ = [
    "FrameReader", "decode", "decode_publish", "encode", "encode_connack", "encode_publish", "publish_template",
    "ConnackCode", "MalformedPacket", "MQTTError", "PacketTooLarge", "ProtocolError", "ReasonCode",
    "UnsupportedProtocolVersion", "v3_connack_code",
    "MQTT_3_1", "MQTT_3_1_1", "MQTT_5", "NO_PROPERTIES", "Auth", "Connack", "Connect",
    "Disconnect", "Packet", "Pingreq", "Pingresp", "Properties", "Puback", "Pubcomp", "Publish",
    "Pubrec", "Pubrel", "Suback", "Subscribe", "SubscriptionRequest", "Unsuback", "Unsubscribe",
    "Will",
]
