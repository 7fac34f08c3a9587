"""bench/micro.py runs and prints every case; bench/compare.py turns mqttbench's output into
docs/performance.md, failures included. Nothing here asserts a speed."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import pytest

from conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent

MICRO_CASES = [
    f"{kind}-qos{qos}-{version}" for kind in ("decode", "encode", "template")
    for version in ("v311", "v5") for qos in (0, 1)
] + ["match-cached", "match-uncached-10k", "broker-qos0", "broker-qos1", "broker-qos1-stored"]

# What mqttbench 'compare' printed for two scenarios where the second broker never started: the
# problems hold the (here empty) tail of the broker's log, so blank lines fall inside the block.
FIGURES = """\
| scenario | figure | mosquitto | mqtt_broker | mqtt_broker / mosquitto |
|---|---|--:|--:|--:|
| throughput-qos0 | msg/s | 191,094 | failed | - |
| latency | p50 ms | 0.088 | failed | - |
| latency | p99 ms | 29.7 | failed | - |
| latency | max ms | 39.7 | failed | - |"""
RESOURCES = """\
| scenario | broker | broker CPU (cores) | unit | broker CPU µs / unit | peak RSS MiB | generator CPU (cores) | busiest generator process | background CPU (cores) | runs marked |
|---|---|--:|---|--:|--:|--:|--:|--:|--:|
| throughput-qos0 | mosquitto | 0.00 | msg | 0 | 8.43 | 0.00 | 13% | 1.65 | 0 of 1 |
| throughput-qos0 | mqtt_broker | failed | | | | | | | |
| latency | mosquitto | 0.01 | msg | 5 | 8.43 | 0.09 | 5% | 0.03 | 0 of 1 |
| latency | mqtt_broker | failed | | | | | | | |"""
PROBLEMS = """\
- throughput-qos0, mqtt_broker, run 1: run failed: mqtt_broker exited (1) before listening on 11884:

- latency, mqtt_broker, run 1: run failed: mqtt_broker exited (1) before listening on 11886:"""
STDOUT = f"{FIGURES}\n\n{RESOURCES}\n\n{PROBLEMS}\n\n"


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_micro_quick_prints_every_case() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "micro.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = {m[1]: float(m[2]) for m in re.finditer(r"^(\S+)\s+([0-9.]+)$", done.stdout, re.M)}
    assert sorted(figures) == sorted(MICRO_CASES), done.stdout
    assert all(value > 0 for value in figures.values()), done.stdout


def test_blocks_are_found_by_their_headers(compare: ModuleType) -> None:
    blocks = compare.split_blocks(STDOUT)
    assert (blocks.figures, blocks.resources, blocks.problems) == (FIGURES, RESOURCES, PROBLEMS)


@pytest.mark.parametrize("stdout", ["", FIGURES, f"{FIGURES}\n\n{RESOURCES}\n"])
def test_incomplete_output_has_no_blocks(compare: ModuleType, stdout: str) -> None:
    assert compare.split_blocks(stdout) is None


def test_report(compare: ModuleType) -> None:
    results = [compare.Result("MQTT 3.1.1", ["mqttbench", "compare"], 0, STDOUT),
               compare.Result("MQTT 5", ["mqttbench", "compare", "--mqtt5"], 0, STDOUT)]
    date = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)
    text = compare.render(results, date, ["Python 3.11.7", "Machine: 2 CPUs"], "bench/compare.py")
    assert text.startswith("# Performance")
    assert "2026-01-02 03:04 UTC" in text and "`bench/compare.py`" in text
    assert "- Python 3.11.7\n- Machine: 2 CPUs\n" in text
    for heading, command in (("MQTT 3.1.1", "mqttbench compare"), ("MQTT 5", "mqttbench compare --mqtt5")):
        section = f"## {heading}\n\n```sh\n{command}\n```\n\n### Figures\n\n{FIGURES}\n\n" \
                  f"### Resources\n\n{RESOURCES}\n\n### Problems\n\n{PROBLEMS}\n"
        assert section in text


def test_report_of_a_failed_run(compare: ModuleType) -> None:
    results = [compare.Result("MQTT 3.1.1", ["mqttbench"], 2, "", "mqttbench: no free port\n"),
               compare.Result("MQTT 5", ["mqttbench"], 0, "half a table\n")]
    text = compare.render(results, datetime.now(timezone.utc), [], "bench/compare.py")
    assert "**mqttbench exited with status 2.**" in text
    assert "```text\nmqttbench: no free port\n```" in text
    assert "**mqttbench printed no complete report.**" in text
    assert "```text\nhalf a table\n```" in text
    assert "### Figures" not in text
    assert [compare.failed(r) for r in results] == [True, True]


FAKE_MQTTBENCH = """\
import json, os, sys
with open(os.environ["FAKE_ARGV"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
print("progress line", file=sys.stderr)
sys.stdout.write(open(os.environ["FAKE_STDOUT"]).read())
sys.exit(int(os.environ["FAKE_STATUS"]))
"""


@pytest.mark.parametrize("status", [0, 2])
def test_main_runs_both_protocols_and_writes_the_report(
        compare: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    fake = tmp_path / "mqttbench"
    fake.write_text(FAKE_MQTTBENCH)
    (tmp_path / "stdout").write_text(STDOUT if status == 0 else "")
    monkeypatch.setenv("FAKE_ARGV", str(tmp_path / "argv"))
    monkeypatch.setenv("FAKE_STDOUT", str(tmp_path / "stdout"))
    monkeypatch.setenv("FAKE_STATUS", str(status))
    output = tmp_path / "docs" / "performance.md"

    code = compare.main(["--mqttbench", str(fake), "--output", str(output), "--json",
                         str(tmp_path / "json"), "--repeat", "1", "--scenario", "fanout", "--count", "10"])

    assert code == (1 if status else 0)
    runs = [json.loads(line) for line in (tmp_path / "argv").read_text().splitlines()]
    assert [("--mqtt5" in argv) for argv in runs] == [False, True]
    for argv, name in zip(runs, ("mqtt311.json", "mqtt5.json")):
        assert argv[:5] == ["compare", "--repeat", "1", "--scenario", "fanout"]
        assert "--count" in argv and argv[argv.index("--json") + 1] == str(tmp_path / "json" / name)
        brokers = [argv[i + 1] for i, a in enumerate(argv) if a == "--broker"]
        assert brokers[0] == "mosquitto=mosquitto -c {conf:anchors/mosquitto.conf}"
        assert brokers[1] == (f"mqtt_broker={sys.executable} -m twisted mqttbroker --persistence memory "
                              "--max-queued-messages 1000000 --endpoint tcp:{port}:interface=127.0.0.1")
    text = output.read_text()
    assert "## MQTT 3.1.1" in text and "## MQTT 5" in text and "- Mosquitto: " in text
    if status:
        assert text.count("**mqttbench exited with status 2.**") == 2
        assert "progress line" in text
    else:
        assert text.count(FIGURES) == 2 and "progress line" not in text


def test_missing_mqttbench_is_an_error(compare: ModuleType, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        compare.main(["--mqttbench", str(tmp_path / "nowhere")])
    assert exit.value.code == 2
    assert f"mqttbench not found at {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_the_twisted_floor_answers_a_connect_and_closes_on_disconnect() -> None:
    """bench/twisted_floor.py, the least a Twisted server does in the connections scenario."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "twisted_floor.py"), str(port)])
    try:
        wait_for_port(port, server, timeout=30)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c")  # CONNECT, client id "c"
            assert client.recv(16) == b"\x20\x02\x00\x00"
            client.sendall(b"\xe0\x00")
            assert client.recv(16) == b""  # closed by the server
    finally:
        server.terminate()
        server.wait(15)
