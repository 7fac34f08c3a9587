"""The terms of a connection (mqtt_broker.connect)."""

from __future__ import annotations

from mqtt_broker.config import BrokerConfig
from mqtt_broker.connect import Terms, negotiate
from mqtt_broker.wire import MQTT_3_1_1, MQTT_5, Connect, ReasonCode

from conftest import assert_every_field_set
from protocol_helpers import FakeClient, make_broker


def test_terms_set_every_field() -> None:
    terms = Terms(ReasonCode.SUCCESS, "c", 30, 0, 20, 1000, 0)
    assert_every_field_set(terms, reason=ReasonCode.SUCCESS, client_id="c", keep_alive=30, session_expiry=0,
                           send_quota=20, max_send_size=1000, alias_maximum=0)


def test_negotiated_terms_of_an_mqtt_5_client() -> None:
    config = BrokerConfig()
    terms = negotiate(config, Connect(protocol_level=MQTT_5, client_id="c", keep_alive=30,
                                      properties={"receive_maximum": 5, "session_expiry_interval": 60}))
    assert (terms.reason, terms.client_id, terms.keep_alive, terms.send_quota, terms.session_expiry) == (
        ReasonCode.SUCCESS, "c", 30, 5, 60)
    assert terms.connack_properties["receive_maximum"] == config.max_inflight_messages


def test_a_keepalive_of_0_is_refused_or_capped_only_below_a_max_keepalive_of_65535() -> None:
    """max_keepalive's help: an MQTT 3 client asking for no keepalive (0) is refused with
    'identifier rejected' when max_keepalive is below 65535, an MQTT 5 one is given it; with
    65535 (the default) or 0 (no limit), 0 is no keepalive."""
    def negotiated(max_keepalive: int, level: int) -> tuple[ReasonCode, int]:
        terms = negotiate(BrokerConfig(max_keepalive=max_keepalive),
                          Connect(protocol_level=level, client_id="c", keep_alive=0))
        return terms.reason, terms.keep_alive

    assert negotiated(65535, MQTT_3_1_1) == negotiated(0, MQTT_3_1_1) == (ReasonCode.SUCCESS, 0)
    assert negotiated(65535, MQTT_5) == negotiated(0, MQTT_5) == (ReasonCode.SUCCESS, 0)
    assert negotiated(65534, MQTT_3_1_1)[0] == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID
    assert negotiated(60, MQTT_5) == (ReasonCode.SUCCESS, 60)


def test_an_mqtt3_keepalive_above_max_keepalive_is_logged_as_such() -> None:
    """max_keepalive: an MQTT 3 client asking for more is refused with 'identifier rejected' (the
    wire's code, as Mosquitto's); the log says why (its keepalive), where it said only
    CLIENT_IDENTIFIER_NOT_VALID and sent the operator looking for a client id problem."""
    from twisted.logger import capturedLogs, formatEvent
    broker = make_broker(max_keepalive=30, sys_interval=0)
    with capturedLogs() as events:
        connack = FakeClient(broker, 4).connect("sensor-1", keep_alive=31)
    assert connack.reason_code == 2
    lines = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("mqtt_broker")]
    assert any("keepalive" in line or "max_keepalive" in line for line in lines), lines
