"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) against a broker process on loopback with paho clients connected.

The page loads without console errors, shows a client the test connects, filters by search, shows
its subscriptions and the topic tree with a retained message, its charts move, and its kick
button disconnects the client (MQTT 5: DISCONNECT 0x98). A screenshot is saved to
test-artifacts/dashboard.png (git-ignored). Its cluster panel stays hidden, and on a node of a
cluster (two broker processes on a real redis-server) it lists the nodes (screenshot:
dashboard-cluster.png). Every wait is bounded.

The page re-renders its clients table and topic tree on every refresh (every 300 ms here), so
rows and tree items are found inside the wait that reads or clicks them (tests/browser_helpers.py),
never kept across a refresh.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from admin_http import KEY, start_admin
from browser_helpers import WAIT, click, text_of, wait_for
from cluster_helpers import Cluster, wait_until
from conftest import ROOT, free_port, wait_for_port
from paho_helpers import PahoClient
from selenium import webdriver
from selenium.webdriver.chrome.options import Options as ChromeOptions
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By

from mqtt_broker.admin.keys import hash_key

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1100")


def _installed(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(path).exists(), f"{name} is missing: ./scripts/test installs it"
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = ChromeOptions()
    options.binary_location = _installed("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium then never tries to download a driver or a browser.
    service = ChromeService(executable_path=_installed("chromedriver"), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def chart(driver: webdriver.Chrome, name: str) -> tuple[int, dict[str, float]]:
    """How many points a chart shows, and the highest value of each of its lines."""
    canvas = driver.find_element(By.ID, f"chart-{name}")
    return int(canvas.get_attribute("data-points") or 0), json.loads(canvas.get_attribute("data-peak") or "{}")


def test_dashboard(broker_process: Any, browser: webdriver.Chrome) -> None:
    admin = start_admin(broker_process)
    events: queue.Queue[Any] = queue.Queue()
    # Kicked, it stays away: paho's loop would connect it again a second later, and the page would
    # list it again before a test slowed down by a busy machine had looked for it gone.
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dash-sensor-1", protocol=mqtt.MQTTv5,
                         reconnect_on_failure=False)
    client.on_connect = lambda c, u, flags, rc, props: events.put(("connect", rc))
    client.on_disconnect = lambda c, u, flags, rc, props: events.put(("disconnect", rc))
    client.connect("127.0.0.1", admin.broker.port, keepalive=60)
    client.loop_start()
    assert events.get(timeout=WAIT) == ("connect", 0)
    client.subscribe("dash/commands/#", qos=1)
    other = PahoClient(admin.broker.port, "dash-other")
    publisher = PahoClient(admin.broker.port, "dash-publisher")
    publisher.publish("dash/status/line-1", b"running", qos=1, retain=True)
    try:
        browser.get(f"{admin.base}/?interval=300")
        assert browser.title == "mqtt_broker"
        wait_for(browser, lambda d: "ready" in d.find_element(By.ID, "health").text, "health never shown")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "save-key").click()

        # The client connected by the test appears, with its address.
        row = text_of(browser, 'tr[data-client-id="dash-sensor-1"]', "the connected client never appeared")
        assert "127.0.0.1:" in row and "5" in row
        assert not browser.find_element(By.ID, "cluster-panel").is_displayed()   # not a node of a cluster

        # The charts move: points are added and the message rate follows the traffic.
        points, _ = chart(browser, "messages")
        for n in range(50):
            publisher.publish(f"dash/readings/{n % 5}", b"21.5")
        wait_for(browser, lambda d: chart(d, "messages")[0] >= points + 3, "the message chart did not move")
        wait_for(browser, lambda d: chart(d, "messages")[1].get("in", 0) > 0, "the message chart never showed the traffic")
        assert chart(browser, "connections")[0] >= 2
        assert int(browser.find_element(By.ID, "fig-connected").text) == 3

        # Search narrows the list; a click shows the client's subscriptions.
        search = browser.find_element(By.ID, "client-search")
        search.send_keys("sensor")
        wait_for(browser, lambda d: [r.get_attribute("data-client-id")
                                     for r in d.find_elements(By.CSS_SELECTOR, "#clients tbody tr")] == ["dash-sensor-1"],
                 "search did not narrow the list")
        click(browser, 'tr[data-client-id="dash-sensor-1"] td', "the client's row could not be clicked")
        wait_for(browser, lambda d: "dash/commands/#" in d.find_element(By.ID, "subscriptions").text,
                 "the client's subscriptions were not shown")

        # The topic tree, with the retained message.
        line = text_of(browser, 'li[data-topic="dash/status/line-1"]', "the retained topic is not in the tree")
        assert "running" in line

        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

        # Kick from the page: the client is told 0x98 and leaves the list.
        click(browser, 'tr[data-client-id="dash-sensor-1"] button.kick', "the kick button could not be clicked")
        kind, reason = events.get(timeout=WAIT)
        assert kind == "disconnect" and reason.value == 0x98
        wait_for(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, 'tr[data-client-id="dash-sensor-1"] button.kick'),
                 "the kicked client still shows as connected")

        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        client.loop_stop()
        client.disconnect()
        other.close()
        publisher.close()


def test_dashboard_of_a_cluster_node(browser: webdriver.Chrome) -> None:
    http_port = free_port()
    cluster = Cluster()
    try:
        node = cluster.add("a", "--http", f"tcp:{http_port}:interface=127.0.0.1", "--http-api-key", "ci:" + hash_key(KEY))
        wait_for_port(http_port, node.process)
        cluster.add("b")
        client = PahoClient(cluster["b"].port, "dash-on-b")
        client.subscribe("dash/b/#", qos=1)
        wait_until(lambda: "dash/b/#" in cluster.routes("b"), "b to hold its client's filter")
        browser.get(f"http://127.0.0.1:{http_port}/?interval=300")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "save-key").click()
        wait_for(browser, lambda d: d.find_element(By.ID, "cluster-panel").is_displayed(), "the cluster panel never showed")
        here = text_of(browser, 'tr[data-node-id="a"]', "node a is not listed")
        assert "this node" in here and "alive" in here
        # b: alive, one client, one filter, nothing waiting in its inbox
        wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-node-id="b"]').text.split()
                 == ["b", "alive", "1", "1", "0", "0"], "node b's row is not right")
        assert "2 of 2 nodes alive" in browser.find_element(By.ID, "cluster-count").text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard-cluster.png"))
        client.close()
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        # Redis stalls: the panel says so, and the rest of the page is not taken for unreachable.
        assert cluster.redis.process is not None
        cluster.redis.process.send_signal(signal.SIGSTOP)
        try:
            wait_for(browser, lambda d: "Redis" in d.find_element(By.ID, "cluster-count").text,
                     "the cluster panel never said Redis was out of reach", timeout=20)
            assert not browser.find_element(By.ID, "message").is_displayed()
        finally:
            cluster.redis.process.send_signal(signal.SIGCONT)
    finally:
        cluster.close()


def _series(driver: webdriver.Chrome) -> dict[str, list[dict[str, float]]]:
    """The points of the page's two charts."""
    return driver.execute_script("return {messages: state.messages, connections: state.connections};")


def test_the_charts_take_no_rate_across_a_restart_of_the_broker(broker_process: Any, browser: webdriver.Chrome) -> None:
    admin = start_admin(broker_process)
    publisher = PahoClient(admin.broker.port, "dash-restart-publisher")
    for n in range(300):
        publisher.publish(f"dash/restart/{n % 5}", b"1")
    browser.get(f"{admin.base}/?interval=300")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "save-key").click()
    wait_for(browser, lambda d: d.execute_script("return state.previous ? state.previous.publish_received_total : -1") >= 300,
             "the page never read the messages published")
    publisher.close()
    admin.broker.stop()
    # The same admin port, a new broker process: its counters start from zero.
    again = broker_process("--persistence", "memory", "--http", f"tcp:{admin.http_port}:interface=127.0.0.1",
                           "--http-api-key", "ci:" + hash_key(KEY))
    wait_for_port(admin.http_port, again.process)
    wait_for(browser, lambda d: d.execute_script("return state.previous.publish_received_total") == 0,
             "the page never read the new broker's figures")
    points = len(_series(browser)["messages"])
    wait_for(browser, lambda d: len(_series(d)["messages"]) >= points + 2, "the charts stopped after the restart")
    series = _series(browser)
    assert [p for p in series["messages"] if p["in"] < 0 or p["out"] < 0] == []
    assert [p for p in series["connections"] if p["rate"] < 0] == []
    assert not browser.find_element(By.ID, "message").is_displayed()


def test_a_broker_that_stops_answering_is_shown_unreachable_and_recovers(broker_process: Any,
                                                                         browser: webdriver.Chrome) -> None:
    admin = start_admin(broker_process)
    browser.get(f"{admin.base}/?interval=300")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "save-key").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "fig-connected").text == "0", "the figures were never shown")
    wait_for(browser, lambda d: "ready" in d.find_element(By.ID, "health").text, "health never shown")
    # Its process held (a blocked reactor answers nothing either): the connections stay open, unanswered.
    admin.broker.process.send_signal(signal.SIGSTOP)
    try:
        wait_for(browser, lambda d: d.find_element(By.ID, "health").text == "unreachable",
                 "the page went on showing a broker that answers nothing as healthy", timeout=30)
        wait_for(browser, lambda d: "did not answer" in d.find_element(By.ID, "message").text,
                 "the page never said the API did not answer", timeout=30)
    finally:
        admin.broker.process.send_signal(signal.SIGCONT)
    wait_for(browser, lambda d: "ready" in d.find_element(By.ID, "health").text, "the page did not recover")
    wait_for(browser, lambda d: not d.find_element(By.ID, "message").is_displayed(), "the message stayed")


def test_points_older_than_the_chart_axis_are_not_drawn_or_scaled_to(broker_process: Any,
                                                                     browser: webdriver.Chrome) -> None:
    admin = start_admin(broker_process)
    browser.get(f"{admin.base}/")  # (no key: the page draws no chart of its own meanwhile)
    wait_for(browser, lambda d: "ready" in d.find_element(By.ID, "health").text, "health never shown")
    # A full history of a busy broker's polls, each 2 s apart plus the 0.2 s its answers took: 300
    # points span 658 s, past the axis's 598 s. A burst at the start, 10 minutes of calm since.
    left_edge_blue = browser.execute_script("""
        const points = [];
        for (let i = 0; i < 300; i++) points.push({ t: 1000 + 2.2 * i, in: i < 20 ? 5000 : 10, out: 0 });
        const canvas = $("chart-messages");
        draw(canvas, points, [["in", "--in"], ["out", "--out"]]);
        // The column of pixels on the axis's left edge (x 44), between the grid lines.
        const g = canvas.getContext("2d"), ratio = window.devicePixelRatio || 1;
        const top = 8, bottom = canvas.clientHeight - 18;
        let blue = 0;
        for (let y = top + 2; y < bottom - 2; y++) {
          const [r, gr, b] = g.getImageData(44 * ratio, y * ratio, 1, 1).data;
          if (b > 150 && r < 100) blue++;
        }
        return blue;""")
    points, peak = chart(browser, "messages")
    assert peak["in"] == 10   # the burst is off the axis: it does not set its scale
    assert points == 272      # those within the last 598 s
    assert left_edge_blue == 0  # nor are the points before it piled up on its left edge


def test_a_client_with_more_subscriptions_than_the_panel_lists_is_said_to_have_them(
        broker_process: Any, browser: webdriver.Chrome) -> None:
    admin = start_admin(broker_process)
    client = PahoClient(admin.broker.port, "dash-many")
    client.subscribe([(f"dash/many/{n:04}", 0) for n in range(1001)])  # type: ignore[arg-type]
    try:
        browser.get(f"{admin.base}/?interval=300")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "save-key").click()
        click(browser, 'tr[data-client-id="dash-many"] td', "the client's row could not be clicked")
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#subscriptions tbody tr")) == 1000,
                 "the client's subscriptions were not listed")
        # The last one is not in the list: the panel says the list is not all of them.
        assert "dash/many/1000" not in browser.find_element(By.ID, "subscriptions").text
        wait_for(browser, lambda d: "first 1000 of 1001" in d.find_element(By.ID, "details-client").text,
                 "the panel did not say it lists the first 1000 of the client's 1001 subscriptions")
    finally:
        client.close()


def test_every_retained_topic_in_the_tree_shows_its_payload(broker_process: Any, browser: webdriver.Chrome) -> None:
    admin = start_admin(broker_process)
    publisher = PahoClient(admin.broker.port, "dash-retainer")
    for n in range(1001):
        publisher.publish(f"dash/r/{n:04}", b"v%d" % n, qos=1, retain=True)
    try:
        browser.get(f"{admin.base}/?interval=300")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "save-key").click()
        text_of(browser, 'li[data-topic="dash/r/0000"]', "the first retained topic is not in the tree")
        # The 1,001st in topic order is in the tree too (routed lately), and retained as the others.
        wait_for(browser, lambda d: "= v1000" in d.find_element(By.CSS_SELECTOR, 'li[data-topic="dash/r/1000"]').text,
                 "a retained topic in the tree was shown without its payload")
    finally:
        publisher.close()
