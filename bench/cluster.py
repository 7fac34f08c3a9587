#!/usr/bin/env python3
"""A cluster's cross-node figures against one node's, in one run, with the shared mqttbench.

    .venv/bin/python bench/cluster.py [--repeat 3] [--scenario NAME ...] [--appendfsync always|everysec]

For each scenario and repeat, fresh processes: one broker on its own (``--persistence memory``,
as in bench/compare.py), then a Redis and two nodes of a cluster on it, with mqttbench's
publishers connected to node a and its subscribers to node b (fan-out: subscribers alternate
between a and b), so that every message crosses from one node to the other. mqttbench is
imported and its clients are sent to the right node; everything else is its own (scenarios,
counts, checks). The CPU per message is counted for each node and for Redis, and Redis alone is
timed for the round trip a window of QoS 1 messages waits for. Standard library only, besides
mqttbench; writes docs/performance-cluster.md (``--output``).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import importlib.util
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["throughput-qos0", "throughput-qos1", "fanout", "latency"]
SUBSCRIBER = re.compile(r"-s(\d+)$")


def load_mqttbench(path: Path) -> Any:
    loader = importlib.machinery.SourceFileLoader("mqttbench", str(path))
    spec = importlib.util.spec_from_loader("mqttbench", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mqttbench"] = module  # its dataclasses look their module up
    loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


class Processes:
    """Processes started for one run, each measured on its own, stopped together."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str], port: int) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        # PYTHONSAFEPATH: the installed build (compiled, by default), not this checkout's sources.
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONSAFEPATH": "1"})
        self.started[name] = process
        wait_port(port, process)

    def broker(self, name: str, port: int, *args: str) -> None:
        self.start(name, [sys.executable, "-m", "twisted", "mqttbroker", "--endpoint",
                          f"tcp:{port}:interface=127.0.0.1", "--max-queued-messages", "1000000",
                          "--data-dir", str(self.workdir / name), *args], port)

    def stop(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.terminate()
        for process in self.started.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class Measured:
    """mqttbench's broker: the sum of several processes (its CPU per message is theirs)."""

    def __init__(self, bench: Any, pids: dict[str, int]) -> None:
        self.bench, self.pids = bench, pids
        self.samples: list[dict[str, Any]] = []

    def sample(self) -> Any:
        parts = {name: self.bench.sample_tree(pid) for name, pid in self.pids.items()}
        self.samples.append(parts)
        total = self.bench.ProcSample()
        for part in parts.values():
            total.cpu += part.cpu
            total.rss_kib += part.rss_kib
            total.peak_rss_kib += part.peak_rss_kib
        return total


@dataclass
class Run:
    scenario: str
    setup: str
    figures: dict[str, float | None]
    cpu_us: dict[str, float] = field(default_factory=dict)
    """Microseconds of CPU per unit (message or delivery), per process."""
    problems: list[str] = field(default_factory=list)


def run_one(bench: Any, scenario: Any, options: Any, cluster: bool, appendfsync: str) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix="mqttbench-cluster-"))
    processes = Processes(workdir)
    original = bench.open_client
    try:
        if not cluster:
            port = free_port()
            processes.broker("one", port, "--persistence", "memory")
            measured = Measured(bench, {"one": processes.started["one"].pid})
        else:
            redis_port, port_a, port_b = free_port(), free_port(), free_port()
            processes.start("redis", [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                                      "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
                                      "--appendonly", "yes", "--appendfsync", appendfsync], redis_port)
            url = f"redis://127.0.0.1:{redis_port}/0"
            for name, node_port in (("a", port_a), ("b", port_b)):
                processes.broker(name, node_port, "--cluster", url, "--cluster-node-id", name)
            time.sleep(1.0)  # both joined (a bench, not a test)
            port = port_a
            measured = Measured(bench, {name: processes.started[name].pid for name in ("a", "b", "redis")})
            fanout = scenario.name == "fanout"

            def open_client(host: str, _: int, client_id: str, *rest: Any) -> Any:
                subscriber = SUBSCRIBER.search(client_id)
                to_b = subscriber is not None and (not fanout or int(subscriber.group(1)) % 2 == 1)
                return original(host, port_b if to_b else port_a, client_id, *rest)
            bench.open_client = open_client
        result = bench.run_scenario(scenario, options, "127.0.0.1", port, measured, "cluster" if cluster else "one")
    except bench.BenchError as e:
        result = bench.failed_result(scenario, "cluster" if cluster else "one", e)
    finally:
        bench.open_client = original
        processes.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    run = Run(scenario.name, "cluster" if cluster else "one", result.figures, problems=result.problems)
    units = result.details.get("units")
    if units and len(measured.samples) >= 2:
        before, after = measured.samples[0], measured.samples[1]
        run.cpu_us = {name: (after[name].cpu - before[name].cpu) / units * 1e6 for name in before}
    return run


def _command(*args: str | bytes) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"".join([b"*%d\r\n" % len(parts), *(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)])


def _answer(sock: socket.socket) -> None:
    """Read one short answer (a status, an integer or a bulk string under a read's size)."""
    data = b""
    while not data.endswith(b"\r\n") or (data[:1] == b"$" and data.count(b"\r\n") < 2):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        data += chunk
    if data[:1] == b"-":
        raise RuntimeError(data.decode(errors="replace"))


def redis_round_trips(appendfsync: str, count: int = 3000) -> tuple[float, float]:
    """Microseconds a client waits for Redis, alone on the machine, configured as the cluster's
    is (medians of ``count`` commands sent one at a time, from Python): a PING, and an XADD of an
    inbox entry of 20 messages (written, and synced under ``appendfsync always``). What a window
    of QoS 1 messages between two nodes waits for, at least, beside one node's own work."""
    workdir = Path(tempfile.mkdtemp(prefix="mqttbench-redis-"))
    processes = Processes(workdir)
    port = free_port()
    try:
        processes.start("redis", [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                  "127.0.0.1", "--dir", str(workdir), "--save", "", "--appendonly", "yes",
                                  "--appendfsync", appendfsync], port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            figures = []
            for command in (_command("PING"), _command("XADD", "inbox", "MAXLEN", "~", "1000000", "*", "d",
                                                       b"x" * 2000, "e", "1")):
                times = []
                for _ in range(count):
                    started = time.perf_counter()
                    sock.sendall(command)
                    _answer(sock)
                    times.append(time.perf_counter() - started)
                figures.append(statistics.median(times) * 1e6)
        return figures[0], figures[1]
    finally:
        processes.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def report(runs: list[Run], scenarios: list[str], command: str, appendfsync: str,
           round_trips: tuple[float, float] | None = None) -> str:
    lines = [f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: medians of "
             f"each scenario's runs; one node with `--persistence memory`; the cluster is two nodes on one Redis "
             f"(`appendonly yes`, `appendfsync {appendfsync}`), publishers on node a and subscribers on node b "
             "(fan-out: subscribers alternate between a and b).", "",
             "| scenario | figure | one node | cluster, across nodes | ratio |", "|---|---|--:|--:|--:|"]
    for name in scenarios:
        ones = [r for r in runs if r.scenario == name and r.setup == "one"]
        clusters = [r for r in runs if r.scenario == name and r.setup == "cluster"]
        for label in (ones or clusters)[0].figures if (ones or clusters) else []:
            one = median([r.figures.get(label) for r in ones])
            both = median([r.figures.get(label) for r in clusters])
            ratio = f"{both / one:.2f}" if one and both else "-"
            lines.append(f"| {name} | {label} | {_show(one)} | {_show(both)} | {ratio} |")
    lines += ["", "| scenario | CPU µs per unit: one node | node a | node b | Redis | cluster in all |",
              "|---|--:|--:|--:|--:|--:|"]
    for name in scenarios:
        one = median([r.cpu_us.get("one") for r in runs if r.scenario == name and r.setup == "one"])
        parts = {p: median([r.cpu_us.get(p) for r in runs if r.scenario == name and r.setup == "cluster"])
                 for p in ("a", "b", "redis")}
        total = sum(v for v in parts.values() if v is not None) if any(parts.values()) else None
        lines.append(f"| {name} | {_show(one, 1)} | {_show(parts['a'], 1)} | {_show(parts['b'], 1)} | "
                     f"{_show(parts['redis'], 1)} | {_show(total, 1)} |")
    one_qos1 = median([r.figures.get("msg/s") for r in runs if r.scenario == "throughput-qos1" and r.setup == "one"])
    if round_trips is not None:
        ping, xadd = round_trips
        lines += ["", f"Redis alone, one command at a time from Python: a PING {ping:.0f} µs, an XADD of a "
                      f"2,000-byte inbox entry {xadd:.0f} µs (`appendfsync {appendfsync}`)."]
        if one_qos1:
            window = 20 / one_qos1 * 1e6  # µs: a window of mqttbench's 20 QoS 1 messages through one node
            floor = 20 / (window + xadd) * 1e6
            lines[-1] += (f" A window of 20 QoS 1 messages takes one node {window:.0f} µs; across nodes it "
                          f"waits for such an XADD besides, so at best {floor:,.0f} msg/s, "
                          f"{floor / one_qos1:.2f} of one node.")
    problems = [f"- {r.scenario} ({r.setup}): {p}" for r in runs for p in r.problems]
    lines += ["", *(problems or ["- none: every message arrived once"]), "",
              "Reading them: a QoS 0 message between nodes costs each node about what a message costs one "
              "node, plus Redis's pub/sub; two nodes share the machine's two cores with the load generator. "
              "A QoS 1 message is acknowledged only once Redis has written the other node's inbox entry "
              "(with `appendfsync always`, an fsync per batch: one per window of messages, the receiving "
              "node's read riding along), and mqttbench keeps 20 messages unacknowledged, so the rate is "
              "that round trip's; each node's CPU per QoS 1 message is mostly what a window costs (the "
              "Redis round trip, the reactor's turns and system calls around it) shared by the window's "
              "20 messages, where a QoS 0 read carries hundreds."]
    return "\n".join(lines)


def _show(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if digits else (f"{value:,.0f}" if value >= 100 else f"{value:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenario", nargs="+", default=SCENARIOS)
    parser.add_argument("--appendfsync", choices=("always", "everysec"), default="always")
    parser.add_argument("--mqttbench", type=Path, default=ROOT.parent / "shared" / "bench" / "mqttbench")
    parser.add_argument("--count", type=int, help="messages per publisher (mqttbench's)")
    parser.add_argument("--duration", type=float, help="most seconds of publishing (mqttbench's)")
    parser.add_argument("--qos", type=int, choices=(0, 1, 2), help="QoS of fanin, fanout, latency (mqttbench's)")
    parser.add_argument("--publishers", type=int, help="fanin's publishers (mqttbench's)")
    parser.add_argument("--inflight", type=int, help="QoS 1/2 messages a publisher keeps unacknowledged "
                        "(mqttbench's, 20)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance-cluster.md")
    args = parser.parse_args()
    bench = load_mqttbench(args.mqttbench)
    given = {k: v for k in ("count", "duration", "qos", "publishers", "inflight")
             if (v := getattr(args, k)) is not None}
    runs: list[Run] = []
    for name in args.scenario:
        scenario = bench.SCENARIOS[name]
        options = bench.scenario_options(scenario, given)
        for repeat in range(args.repeat):
            for cluster in (False, True):
                run = run_one(bench, scenario, options, cluster, args.appendfsync)
                runs.append(run)
                print(f"{name} {repeat + 1}/{args.repeat} {run.setup}: {run.figures} cpu µs {run.cpu_us} "
                      f"{run.problems or ''}", file=sys.stderr, flush=True)
    round_trips = redis_round_trips(args.appendfsync)
    text = report(runs, args.scenario, "bench/cluster.py " + " ".join(sys.argv[1:]), args.appendfsync, round_trips)
    redis = subprocess.run([shutil.which("redis-server") or "redis-server", "--version"], capture_output=True,
                           text=True).stdout.split(" ")[2]
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    args.output.write_text(f"# Performance: a cluster, node to node, against one node\n\n"
                           f"Redis {redis}; {os.cpu_count()} CPUs, {model}.\n\n{text}\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
