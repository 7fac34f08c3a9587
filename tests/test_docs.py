"""The documentation: it builds without a warning, its examples run, and its generated references
cover every setting, flag and admin API operation.

The two Sphinx builds (html with warnings as errors, doctest) run once, side by side, in a
temporary directory; the rest checks what they made and the examples the pages show.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mqtt_broker.bridge.config import BridgeConfig
from mqtt_broker.config import BrokerConfig, settings
from mqtt_broker.tap import _LIST_FLAGS, Options

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
"""The Markdown pages whose examples are checked: the documentation's and the README."""


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, str]]:
    """{builder: (output directory, exit status, output)} of the html and doctest builds."""
    out = tmp_path_factory.mktemp("docs")
    running = {}
    for builder in ("html", "doctest"):
        command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
                   "-d", str(out / f"doctrees-{builder}"), str(DOCS), str(out / builder)]
        running[builder] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True, cwd=out)
    results = {}
    for builder, process in running.items():
        output, _ = process.communicate(timeout=300)
        results[builder] = (out / builder, process.returncode, output)
    return results


def test_html_builds_without_warnings(builds: dict[str, tuple[Path, int, str]]) -> None:
    _, status, output = builds["html"]
    assert status == 0, output


def test_doctests_pass(builds: dict[str, tuple[Path, int, str]]) -> None:
    out, status, output = builds["doctest"]
    assert status == 0, output + (out / "output.txt").read_text()
    report = (out / "output.txt").read_text()
    assert re.search(r"[1-9]\d* tests", report) and "0 failures in tests" in report, report


def _ids(builds: dict[str, tuple[Path, int, str]], page: str) -> set[str]:
    out, status, output = builds["html"]
    assert status == 0, output
    return set(re.findall(r'id="([^"]+)"', (out / page).read_text()))


def test_every_setting_is_in_the_reference(builds: dict[str, tuple[Path, int, str]]) -> None:
    ids = _ids(builds, "configuration-reference.html")
    for f in settings():
        assert f"confval-{f.name}" in ids, f.name


def test_every_bridge_key_is_in_the_reference(builds: dict[str, tuple[Path, int, str]]) -> None:
    import dataclasses
    ids = _ids(builds, "configuration-reference.html")
    for f in dataclasses.fields(BridgeConfig):
        assert f"confval-bridge.{f.name}" in ids, f.name


def test_every_flag_is_in_the_command_line_reference(builds: dict[str, tuple[Path, int, str]]) -> None:
    ids = _ids(builds, "command-line.html")
    flags = [p[0] for p in Options.optParameters] + list(_LIST_FLAGS.values()) + ["version"]
    for flag in flags:
        assert f"cmdoption-twistd-mqttbroker-{flag}" in ids, flag


def test_every_admin_operation_is_in_the_reference(builds: dict[str, tuple[Path, int, str]]) -> None:
    ids = _ids(builds, "admin-api.html")
    document = json.loads((ROOT / "mqtt_broker" / "admin" / "openapi.json").read_text())
    for item in document["paths"].values():
        for operation in item.values():
            if isinstance(operation, dict) and "operationId" in operation:
                assert f"openapi-{operation['operationId'].lower()}" in ids, operation["operationId"]


def test_the_compiled_classes_are_documented_from_their_docstrings(builds: dict[str, tuple[Path, int, str]]) -> None:
    """Documented from the installed compiled build, Message and Client showed neither text,
    signature nor members: mypyc keeps none of them."""
    out, status, output = builds["html"]
    assert status == 0, output
    page = re.sub(r"<[^>]+>", "", (out / "api" / "hooks.html").read_text())
    for text in ("A published message. One instance is shared by every subscriber", "Client id of the publisher",
                 "Message(topic: str", "A connected (or connecting) client", "Subscription(*, client_id: str"):
        assert text in page, text


def test_what_an_embedder_uses_is_in_the_api_reference(builds: dict[str, tuple[Path, int, str]]) -> None:
    """The broker's page listed stopService, which autodoc left out (it had no docstring), and
    not the hooks nor route_own that docs/embedding.md has embedders use; nothing showed the
    packets the testing kit's clients take and return (a Will's fields, a CONNACK's)."""
    import typing

    from mqtt_broker.testing import MemoryClient
    ids = _ids(builds, "api/broker.html")
    for name in ("startService", "stopService", "hooks", "publish", "route_own", "clients", "subscriptions_of"):
        assert f"mqtt_broker.BrokerService.{name}" in ids, name
    named: set[str] = set()

    def name(hint: Any) -> None:  # (every class a hint names: list[Packet], Connack | None, ...)
        if isinstance(hint, type) and hint.__module__.startswith("mqtt_broker.wire"):
            named.add(hint.__name__)
        for argument in typing.get_args(hint):
            name(argument)

    for method in ("connect", "subscribe", "unsubscribe", "publish", "ping", "send", "messages", "received"):
        for hint in typing.get_type_hints(getattr(MemoryClient, method)).values():
            name(hint)
    assert {"Will", "Connack", "Puback", "Pubrec", "Pubcomp", "Publish", "Auth"} <= named, named
    ids = _ids(builds, "api/testing.html")
    assert [name for name in sorted(named) if f"mqtt_broker.wire.{name}" not in ids] == []

# --- the examples on the pages ---------------------------------------------------------------

def _blocks(language: str) -> list[tuple[str, str]]:
    """(page name, text) of every fenced block of ``language`` in the Markdown pages."""
    found = []
    for page in PAGES:
        for text in re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.M | re.S):
            found.append((page.name, text))
    return found


def _commands(program: str) -> list[tuple[str, list[str]]]:
    """(page, arguments) of each shell command line of the pages that runs ``program``."""
    found = []
    for page, text in _blocks("sh"):
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == [program] or words[:3] == ["python", "-m", program]:
                found.append((page, words))
    return found



def test_the_pip_commands_that_build_a_release_skip_pips_wheel_cache() -> None:
    """pip keeps the wheel it built from a release's sdist and installs it again for that release:
    a C compiler installed since, or MQTT_BROKER_COMPILE=0, would change nothing."""
    prose = [re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S) for page in PAGES]
    spans = [" ".join(span.split()) for text in prose for span in re.findall(r"`([^`]+)`", text)]
    commands = [span for span in spans if re.match(r"(\S+=\S* )*pip install ", span)]
    commands += [" ".join(words) for _, words in _commands("pip")]
    building = [command for command in commands if "--no-binary" in command]
    assert building and [command for command in building if "--no-cache-dir" not in command] == []


TOML = _blocks("toml")


def test_the_readme_examples_that_need_no_network_run() -> None:
    ran = 0
    for page, text in _blocks("python"):
        if page == "README.md" and "reactor.run()" not in text:
            exec(compile(text, page, "exec"), {})
            ran += 1
    assert ran


def test_the_readme_embedded_example_refuses_what_its_hook_does_not_want() -> None:
    """The README's embedded broker, on a free port and without ``reactor.run()``: its hook keeps
    secret/ messages from the subscribers and lets the rest through."""
    from protocol_helpers import connected
    from mqtt_broker.wire import Publish

    [text] = [text for page, text in _blocks("python") if page == "README.md" and "on_publish" in text]
    assert '"tcp:1883"' in text and text.rstrip().endswith("reactor.run()")
    scope: dict[str, Any] = {}
    exec(compile(text.replace('"tcp:1883"', '"tcp:0:interface=127.0.0.1"').rstrip().removesuffix("reactor.run()"),
                 "README.md", "exec"), scope)
    broker = scope["broker"]
    try:
        subscriber = connected(broker, "sub")
        subscriber.subscribe("#", qos=1)
        publisher = connected(broker, "pub")
        publisher.publish("secret/plans", b"no", qos=1)
        publisher.publish("sensors/kitchen", b"21.5")
        assert [(p.topic, p.payload) for p in subscriber.received() if isinstance(p, Publish)] == [
            ("sensors/kitchen", b"21.5")]
    finally:
        broker.stopService()


def test_the_readme_embedded_broker_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """Run as written (with SQLite, as docs/durability.md has embedders do), Ctrl-C stops the
    broker: its MQTT 5 client is told 0x8B [MQTT-3.14.2-1] and the process ends (the store's
    thread is the broker's stop's to end)."""
    from conftest import free_port, terminate, wait_for_port

    [text] = [text for page, text in _blocks("python") if page == "README.md" and "on_publish" in text]
    port = free_port()
    code = text.replace('BrokerService(endpoints=["tcp:1883"]',
                        f'BrokerService(persistence="sqlite", endpoints=["tcp:{port}:interface=127.0.0.1"]')
    assert str(port) in code
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        wait_for_port(port, process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(bytes.fromhex("101000044d5154540502003c000003763563"))  # CONNECT, MQTT 5, "v5c"
            assert client.recv(1) == b"\x20"  # CONNACK
            client.recv(64)
            process.send_signal(signal.SIGINT)
            said = b""
            while len(said) < 3 and (piece := client.recv(64)):
                said += piece
        assert said[:1] == b"\xe0" and said[2:3] == b"\x8b", said.hex()
        assert process.wait(10) is not None
    finally:
        terminate(process)


@pytest.mark.parametrize("page,text", TOML, ids=[f"{page}-{n}" for n, (page, _) in enumerate(TOML)])
def test_toml_examples_are_valid_settings(page: str, text: str) -> None:
    BrokerConfig.from_mapping(tomllib.loads(text), page)


def _broker_arguments(words: list[str]) -> list[str]:
    """The broker's arguments of a ``twistd ... mqttbroker ...`` command, without the files
    that exist only on the reader's machine."""
    arguments = words[words.index("mqttbroker") + 1:]
    kept = []
    skip = False
    for word in arguments:
        if skip:
            skip = False
        elif word in ("--config", "-c", "--mosquitto-config"):
            skip = True
        else:
            kept.append(word)
    return kept


TWISTD = [(page, words) for page, words in _commands("twistd") + _commands("twisted") if "mqttbroker" in words]


@pytest.mark.parametrize("page,words", TWISTD, ids=[f"{page}-{n}" for n, (page, _) in enumerate(TWISTD)])
def test_twistd_examples_parse(page: str, words: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    arguments = _broker_arguments(words)
    if "--help" in arguments or "--version" in arguments:
        return  # run below, in a twistd of its own
    if any("mqtts:" in word for word in arguments):
        assert _mqtts_installed(), "the mqtts: endpoint plugin comes with the installed build (./scripts/test)"
    options = Options()
    options.parseOptions(arguments)
    assert isinstance(options["broker_config"], BrokerConfig)


def _mqtts_installed() -> bool:
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins
    return any(parser.prefix == "mqtts" for parser in getPlugins(IStreamServerEndpointStringParser))


def test_twistd_help_lists_every_flag() -> None:
    # From the checkout's directory: an installed build's plugin is found (PYTHONSAFEPATH keeps the
    # checkout off sys.path in ./scripts/test), and so is the checkout's own in an editable install.
    help_text = subprocess.run([sys.executable, "-m", "twisted", "mqttbroker", "--help"], capture_output=True,
                               text=True, timeout=60, check=True, cwd=ROOT).stdout
    for flag in [p[0] for p in Options.optParameters] + list(_LIST_FLAGS.values()):
        assert f"--{flag}" in help_text, flag


def test_the_acl_file_example_loads() -> None:
    from mqtt_broker.auth.acl import READ, WRITE, AclFile
    text = (DOCS / "security.md").read_text()
    [example] = re.findall(r"## ACL files\n\n```\n(.*?)```", text, re.DOTALL)
    acl = AclFile.parse(example, "docs/security.md")
    assert acl.check("c", "alice", "alice/notes", WRITE) and not acl.check("c", "alice", "alice/archive/1", READ)
    assert acl.check("c", None, "public/news", READ) and not acl.check("c", None, "alice/notes", READ)


def test_passwd_examples_use_its_flags() -> None:
    help_text = subprocess.run([sys.executable, "-m", "mqtt_broker.passwd", "--help"], capture_output=True,
                               text=True, timeout=60, env={**os.environ, "PYTHONSAFEPATH": "1"}).stdout
    used = {word for _, words in _commands("mqttbroker-passwd") for word in words if word.startswith("-")}
    assert used
    for flag in used:
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", help_text), flag


def test_admin_api_table_names_real_operations() -> None:
    document: dict[str, Any] = json.loads((ROOT / "mqtt_broker" / "admin" / "openapi.json").read_text())
    def shape(path: str) -> str:  # /clients/{client_id} and /clients/{id} are the same path
        return re.sub(r"\{[^}]*\}", "{}", path)

    operations = {(method.upper(), shape(path)) for path, item in document["paths"].items() for method in item}
    table = (DOCS / "operations.md").read_text()
    named = re.findall(r"`((?:GET|POST|DELETE)(?:/(?:GET|POST|DELETE))*) (/[^`?]*)", table)
    assert len(named) > 10
    for methods, path in named:
        for method in methods.split("/"):
            assert (method, shape(path)) in operations, f"{method} {path}"


def test_the_mqtt5_page_lists_the_reason_codes_the_broker_sends() -> None:
    """The rows of reason codes on the MQTT 5 page left codes out: SUBACK 0x97
    (max_subscriptions_per_client), UNSUBACK 0x8F and 0x87, the DISCONNECTs of a PUBLISH the
    broker does not take (0x90, 0x9A, 0x9B) and of a Subscription Identifier while they are turned
    off (0xA1). The codes are the broker's answers here, looked up on the page."""
    from protocol_helpers import connected, make_broker

    from mqtt_broker.wire import Publish, Subscribe, SubscriptionRequest, Unsubscribe

    page = (DOCS / "mqtt5.md").read_text()
    rows = dict(re.findall(r"^\| (reason codes|server DISCONNECT) \| ([^|]*) \|", page, re.M))

    def listed(row: str, packet: str) -> set[int]:
        return {int(code, 16) for codes in re.findall(rf"(?:^|, ){packet} ([0-9A-Fx/]+)", row)
                for code in codes.split("/")}

    broker = make_broker(max_subscriptions_per_client=1, subscription_identifier_available=False, max_qos=1,
                         retain_available=False)
    broker.hooks.on_unsubscribe(lambda client, topic_filter: topic_filter != "kept")
    client = connected(broker, "c", version=5)
    [suback] = client.subscribe("a", "b", "kept")
    client.send(Unsubscribe(packet_id=2, topic_filters=("a/#/b", "kept")))
    [unsuback] = client.received()
    assert set(suback.reason_codes) - {0} <= listed(rows["reason codes"], "SUBACK"), suback
    assert set(unsuback.reason_codes) <= listed(rows["reason codes"], "UNSUBACK"), unsuback
    server = {int(code, 16) for code in re.findall(r"0x[0-9A-F]{2}", rows["server DISCONNECT"])}
    for packet in (Publish(topic="a/+", payload=b"x"), Publish(topic="a", payload=b"x", qos=2, packet_id=1),
                   Publish(topic="a", payload=b"x", retain=True),
                   Subscribe(packet_id=1, properties={"subscription_identifier": 1},
                             subscriptions=(SubscriptionRequest(topic_filter="c"),))):
        client = connected(broker, "c", version=5)
        client.send(packet)
        [disconnect] = client.received()
        assert disconnect.reason_code in server, disconnect



def test_the_mqtt5_page_lists_the_connack_codes_the_broker_refuses_with() -> None:
    """No page named 0x85 (an empty client id the broker does not take) or 0x9F
    (max_connections_per_minute). The codes are the broker's answers here, looked up on the page."""
    from protocol_helpers import FakeClient, make_broker

    from mqtt_broker.wire import Will

    page = (DOCS / "mqtt5.md").read_text()
    [row] = re.findall(r"^\| reason codes \| ([^|]*) \|", page, re.M)
    [codes] = re.findall(r"(?:^|, )CONNACK ([0-9A-Fx/]+)", row)
    listed = {int(code, 16) for code in codes.split("/")}
    broker = make_broker(allow_zero_length_clientid=False, max_connections_per_minute=1, max_qos=1,
                         retain_available=False)
    broker.hooks.on_connect(lambda client: client.client_id != "refused")
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("", {}), ("twice", {}), ("twice", {}), ("refused", {}),
        ("w1", {"will": Will(topic="w", payload=b"", qos=2)}),
        ("w2", {"will": Will(topic="w", payload=b"", retain=True)}),
        ("w3", {"will": Will(topic="w/#", payload=b"")}),
        ("w4", {"will": Will(topic="w", payload=b"\xff", properties={"payload_format_indicator": 1})}),
        ("a", {"properties": {"authentication_method": "SCRAM-SHA-1"}}),
    ]
    refused = set()
    for client_id, options in attempts:
        connack = FakeClient(broker, version=5).connect(client_id, **options)
        if connack.reason_code:
            refused.add(connack.reason_code)
    assert len(refused) == 8, refused
    assert refused <= listed, refused - listed


@pytest.mark.parametrize("qos", [1, 2])
def test_the_mqtt5_page_names_the_publishes_counted_against_the_brokers_receive_maximum(qos: int) -> None:
    """The flow control row said QoS 1 PUBLISHes were not counted: they are, until their PUBACK
    goes (which waits for the store) [MQTT-3.3.4-7]. The QoS the row names are those that take a
    client past the broker's Receive Maximum to DISCONNECT 0x93."""
    from protocol_helpers import connected
    from test_durability import HeldStore
    from twisted.internet.testing import MemoryReactorClock

    from mqtt_broker import BrokerService
    from mqtt_broker.wire import Disconnect, Publish, ReasonCode

    page = (DOCS / "mqtt5.md").read_text()
    [row] = re.findall(r"^\| flow control \| ([^|]*) \|", page, re.M)
    named = re.search(r"a client with more (QoS [12](?: and [12])?) PUBLISHes unacknowledged than ours", row)
    assert named is not None and f"{qos}" in named[1], row
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), store=HeldStore(), max_inflight_messages=2)
    client = connected(broker, "p", 5)
    client.received()
    client.send(*(Publish(topic="t", payload=b"x", qos=qos, packet_id=n) for n in range(1, 4)))
    [disconnect] = client.received()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED


def test_the_spec_statements_cited_are_named_in_full() -> None:
    """A citation is a statement's id (``[MQTT-3.1.2-24]``) or, where the specification numbers
    none, its section: one with a question mark for its number sends the reader nowhere."""
    placeholder = re.compile(r"\[MQTT-[0-9.]+-\?\]")
    files = [*(ROOT / "mqtt_broker").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *PAGES]
    found = [f"{path.relative_to(ROOT)}:{number}" for path in files
             for number, line in enumerate(path.read_text().splitlines(), 1) if placeholder.search(line)]
    assert found == []
