"""A real browser: headless Chromium (Debian's chromium and chromium-driver, driven by selenium)
loads tests/browser/index.html, whose MQTT.js (npm's mqtt, browser bundle) connects over ws://,
subscribes, receives a message published by a TCP client and publishes one that the TCP client
receives. Once against a ``--websocket`` listener of ``twistd mqttbroker`` (the page served by a
plain HTTP server), once through ``WebSocketResource`` in a twisted.web site (page and MQTT on one
port); MQTT 3.1.1 and 5 each.

./scripts/test installs Chromium, its driver, selenium and MQTT.js. Every wait is bounded.
"""

from __future__ import annotations

import functools
import http.server
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, BrokerProcess, free_port, wait_for_port
from paho_helpers import PahoClient
from selenium import webdriver
from selenium.webdriver.chrome.options import Options as ChromeOptions
from selenium.webdriver.chrome.service import Service as ChromeService

WAIT = 20.0
PAGES = ROOT / "tests" / "browser"
MQTT_JS = PAGES / "node_modules" / "mqtt" / "dist" / "mqtt.min.js"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _installed(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(path).exists(), f"{name} is missing: ./scripts/test installs it"
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    assert MQTT_JS.exists(), f"{MQTT_JS} is missing: ./scripts/test installs it (npm's mqtt)"
    options = ChromeOptions()
    options.binary_location = _installed("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium then never tries to download a driver or a browser.
    service = ChromeService(executable_path=_installed("chromedriver"),
                            log_output=str(tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class StaticServer:
    """tests/browser over HTTP on loopback, in a thread."""

    def __init__(self) -> None:
        handler = functools.partial(_QuietHandler, directory=str(PAGES))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def websocket_listener(broker_process: type[BrokerProcess]) -> Iterator[tuple[str, int]]:
    """twistd mqttbroker with --websocket; the page from a separate HTTP server."""
    ws_port = free_port()
    broker = broker_process("--websocket", f"tcp:{ws_port}:interface=127.0.0.1", "--persistence", "memory")
    wait_for_port(ws_port, broker.process)
    pages = StaticServer()
    try:
        yield f"http://127.0.0.1:{pages.port}/index.html?url=ws://127.0.0.1:{ws_port}/mqtt", broker.port
    finally:
        pages.close()


@pytest.fixture
def web_site() -> Iterator[tuple[str, int]]:
    """examples/websocket_site.py: the page and ws://.../mqtt on one port."""
    http_port, mqtt_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "websocket_site.py"), str(http_port),
                                str(mqtt_port), str(PAGES)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(http_port, process)
        wait_for_port(mqtt_port, process)
        yield f"http://127.0.0.1:{http_port}/index.html?url=ws://127.0.0.1:{http_port}/mqtt", mqtt_port
    finally:
        process.terminate()
        process.wait(WAIT)


def page_state(driver: webdriver.Chrome) -> str:
    """What the page noted and logged, for failure messages."""
    events = driver.execute_script("return window.events")
    console = [entry["message"] for entry in driver.get_log("browser")]
    return f"page events: {events}\nconsole: {console}"


def talk_to_the_page(driver: webdriver.Chrome, page: str, tcp_port: int, version: int) -> None:
    client_id = f"chromium-v{version}"
    watcher = PahoClient(tcp_port, f"tcp-watcher-v{version}", version=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311)
    try:
        watcher.subscribe("browser/ready", qos=1)
        watcher.subscribe("browser/out", qos=1)
        driver.get(f"{page}&version={version}&id={client_id}")
        try:
            ready = watcher.message()  # the page is connected and subscribed
        except queue.Empty:
            raise AssertionError("the page never said it was ready\n" + page_state(driver)) from None
        assert (ready.topic, ready.payload) == ("browser/ready", client_id.encode())

        watcher.publish("browser/in", "hello from tcp ✓".encode(), qos=1)
        try:
            echo = watcher.message()
        except queue.Empty:
            raise AssertionError("no echo from the page\n" + page_state(driver)) from None
        assert (echo.topic, echo.payload.decode()) == ("browser/out", "echo: hello from tcp ✓")
        assert driver.execute_script("return window.received") == ["hello from tcp ✓"]
        events = driver.execute_script("return window.events")
        assert events[:2] == ["connected", "subscribed browser/in qos 1"], events
        assert not any(e.startswith(("error", "close")) for e in events), page_state(driver)
    finally:
        watcher.close()
        driver.get("about:blank")  # the page's connection closes with it


@pytest.mark.parametrize("version", [4, 5], ids=["3.1.1", "5"])
def test_browser_over_websocket_listener(browser: webdriver.Chrome, websocket_listener: tuple[str, int],
                                         version: int) -> None:
    talk_to_the_page(browser, *websocket_listener, version)


@pytest.mark.parametrize("version", [4, 5], ids=["3.1.1", "5"])
def test_browser_through_a_twisted_web_site(browser: webdriver.Chrome, web_site: tuple[str, int],
                                            version: int) -> None:
    talk_to_the_page(browser, *web_site, version)
