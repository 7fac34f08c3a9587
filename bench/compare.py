#!/usr/bin/env python3
"""Mosquitto and this broker in one mqttbench run, over MQTT 3.1.1 and MQTT 5, and QoS 1 and 2 with
persistence on in both, into docs/performance.md.

    .venv/bin/python bench/compare.py [--repeat 3] [--scenario NAME ...] [--json DIR] [MQTTBENCH OPTIONS]

mqttbench starts both brokers itself, a fresh process for every run, Mosquitto first (the base of
the ratios). Our broker is run by the interpreter that runs this script, so what is measured is
the mqtt_broker installed in that environment (`pip install .` after a change). The full run takes
about 25 minutes on two cores; other options go to mqttbench as they are (`--count 1000
--duration 2` for a quick check of the tooling). Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["throughput-qos0", "throughput-qos1", "throughput-qos2", "fanout", "fanin", "latency",
             "connections", "subscriptions"]
MOSQUITTO = "mosquitto -c {conf:anchors/mosquitto.conf}"
PROTOCOLS = {"MQTT 3.1.1": [], "MQTT 5": ["--mqtt5"]}
DURABLE = "MQTT 3.1.1, persistence on"
"""A third run: QoS 1 and 2 with the SQLite store (acknowledge after commit) against Mosquitto
with ``persistence true``."""
DURABLE_SCENARIOS = ["throughput-qos1", "throughput-qos2"]
MOSQUITTO_DURABLE = "mosquitto -c {conf:bench/mosquitto-persistent.conf}"


@dataclass
class Result:
    """One mqttbench run: what was run and what it printed."""

    protocol: str
    command: list[str]
    status: int
    stdout: str
    stderr_tail: str = ""


@dataclass
class Blocks:
    figures: str
    resources: str
    problems: str


def broker_command(python: str, durable: bool = False) -> str:
    persistence = "sqlite --data-dir {dir}" if durable else "memory"
    return (f"{shlex.quote(python)} -m twisted mqttbroker --persistence {persistence} "
            "--max-queued-messages 1000000 --endpoint tcp:{port}:interface=127.0.0.1")


def mqttbench_command(mqttbench: Path, repeat: int, scenarios: list[str], extra: list[str],
                      json_file: Path | None, durable: bool = False) -> list[str]:
    """``extra``: options for this protocol and any the user passed through."""
    command = [sys.executable, str(mqttbench), "compare", "--repeat", str(repeat),
               "--scenario", *scenarios, *extra,
               "--broker", f"mosquitto={MOSQUITTO_DURABLE if durable else MOSQUITTO}",
               "--broker", f"mqtt_broker={broker_command(sys.executable, durable)}"]
    return command + (["--json", str(json_file)] if json_file else [])


def run(protocol: str, command: list[str]) -> Result:
    """Run mqttbench, passing its progress (stderr) through and keeping the end of it."""
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    # stdout to a file, not a pipe: only stderr is read as it comes, so neither can block.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        # cwd: {conf:anchors/...} is looked up here first, then beside mqttbench.
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.PIPE,
                                text=True, encoding="utf-8", errors="replace")
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)
        status = proc.wait()
        out.seek(0)
        return Result(protocol, command, status, out.read(), "".join(tail))


def split_blocks(stdout: str) -> Blocks | None:
    """mqttbench's figures, resources and problems blocks, or None when they are not all there.

    Found by the tables' header rows, not by blank lines: a problem may span several lines,
    blank ones included (the tail of a broker's log)."""
    lines = stdout.splitlines()

    def table(header: str, start: int = 0) -> tuple[int, list[str]]:
        begin = next(i for i in range(start, len(lines)) if lines[i].startswith(header))
        end = begin
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        return end, lines[begin:end]

    try:
        after_figures, figures = table("| scenario | figure |")
        after_resources, resources = table("| scenario | broker |", after_figures)
    except StopIteration:
        return None
    problems = "\n".join(lines[after_resources:]).strip()
    if not problems:
        return None
    return Blocks("\n".join(figures), "\n".join(resources), problems)


def environment() -> list[str]:
    """What was measured and on what, as Markdown list items."""
    import mqtt_broker  # the interpreter's own copy, the one the broker processes run

    try:
        mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True,
                                   timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        mosquitto = "not found"
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo()
                  if line.startswith("model name")), platform.processor() or "unknown")
    return [
        f"mqtt_broker {mqtt_broker.__version__} ({Path(mqtt_broker.__file__).parent})",
        f"Python {platform.python_version()}, Twisted {metadata.version('twisted')}",
        f"Mosquitto: {mosquitto}",
        f"Machine: {os.cpu_count()} CPUs, {model}; {platform.platform()}",
    ]


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def render(results: list[Result], date: datetime, facts: list[str], invocation: str) -> str:
    out = [
        "# Performance: Mosquitto and mqtt_broker in the same run", "",
        f"Measured {date:%Y-%m-%d %H:%M} UTC with the shared `mqttbench`, made by `{invocation}`. "
        "Each broker is started afresh for every run and the two take turns; figures are medians "
        "over the runs, ratios are mqtt_broker over Mosquitto (above 1 is better for rates, worse "
        "for latency and memory). `>=` and `<=` mark figures the load generator or a busy machine "
        "may have held back (see mqttbench's README). A cluster's figures, node to node, are in "
        "[performance-cluster.md](performance-cluster.md) (`bench/cluster.py`).", "",
        *(f"- {fact}" for fact in facts),
    ]
    for result in results:
        out += ["", f"## {result.protocol}", "", "```sh", shlex.join(result.command), "```", ""]
        blocks = split_blocks(result.stdout) if result.status == 0 else None
        if blocks is None:
            why = (f"exited with status {result.status}" if result.status
                   else "printed no complete report")
            printed = (result.stdout.rstrip() + "\n" + result.stderr_tail.rstrip()).strip()
            out += [f"**mqttbench {why}.** What it printed (the end of its progress output last):",
                    "", "```text", printed or "(nothing)", "```"]
            continue
        out += ["### Figures", "", blocks.figures, "", "### Resources", "", blocks.resources, "",
                "### Problems", "", blocks.problems]
    return "\n".join(out) + "\n"


def failed(result: Result) -> bool:
    return result.status != 0 or split_blocks(result.stdout) is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other options go to mqttbench as they are.")
    parser.add_argument("--mqttbench", type=Path, default=ROOT.parent / "shared" / "bench" / "mqttbench",
                        help="the mqttbench script (default: shared/bench/mqttbench beside the project)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario per broker (3)")
    parser.add_argument("--scenario", nargs="+", default=SCENARIOS, metavar="NAME",
                        help="scenarios to run (default: all of them)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--json", type=Path, metavar="DIR", help="keep mqttbench's JSON here")
    args, passed_on = parser.parse_known_args(argv)
    if not args.mqttbench.is_file():
        parser.error(f"mqttbench not found at {args.mqttbench}; give its path with --mqttbench")
    if args.json:
        args.json.mkdir(parents=True, exist_ok=True)

    date = datetime.now(timezone.utc)
    results = []
    for protocol, extra in PROTOCOLS.items():
        name = "mqtt5.json" if extra else "mqtt311.json"
        command = mqttbench_command(args.mqttbench.resolve(), args.repeat, args.scenario,
                                    [*extra, *passed_on],
                                    args.json.resolve() / name if args.json else None)
        results.append(run(protocol, command))
    durable = [name for name in args.scenario if name in DURABLE_SCENARIOS]
    if durable:
        command = mqttbench_command(args.mqttbench.resolve(), args.repeat, durable, passed_on,
                                    args.json.resolve() / "durable.json" if args.json else None, durable=True)
        results.append(run(DURABLE, command))
    invocation = shlex.join(["bench/compare.py", *(argv if argv is not None else sys.argv[1:])])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(results, date, environment(), invocation), encoding="utf-8")
    bad = [r.protocol for r in results if failed(r)]
    if bad:
        print(f"compare: mqttbench failed for {', '.join(bad)}; see {args.output}", file=sys.stderr)
        return 1
    print(f"compare: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
