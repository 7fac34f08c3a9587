"""The release as users get it: ``python -m build`` makes an sdist and a wheel that twine accepts;
the sdist holds the tests, documentation and examples and builds the same wheel as the checkout;
the wheel, installed with its dependencies into a fresh virtualenv (not this checkout, not the
tests' own install), runs its commands and a broker; and examples/mqttbroker.service passes
``systemd-analyze verify`` and its command line runs that broker under the unit's restrictions
that a test can apply (no pid file, the state directory as working directory, the umask,
memory that is never writable and executable), with ExecReload's SIGHUP reloading it.

The wheels are pure Python (MQTT_BROKER_COMPILE=0) to keep this quick; test_packaging checks the
compiled one. The brokers are stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, free_port, terminate, wait_for_port
from paho_helpers import PahoClient
from test_packaging import IGNORED, clean_env, run
from test_security_e2e import connect_code
from test_tls import _endpoint_quote, make_certs

UNIT = ROOT / "examples" / "mqttbroker.service"
UNIT_TWISTD = "/opt/mqttbroker/bin/twistd"
UNIT_CONFIG = "/etc/mqttbroker/mqttbroker.toml"
WAIT = 10.0

# What a release's source distribution must hold besides the package.
SDIST_FILES = {"README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in", "setup.py", "setup.cfg", "pyproject.toml",
               "mqttbroker.example.toml", "certs/make-certs.sh", "certs/README.md", "tests/conftest.py",
               "examples/mqttbroker.service", "scripts/test"}
SDIST_TREES = ("tests", "docs", "examples", "scripts", "bench")
# What a developer's checkout may hold besides the sources, none of which a release takes: keys made
# with make-certs.sh, caches, virtualenvs, npm's packages for the browser test, the documents as
# the README builds them, the browser test's screenshots, a broker's state.
UNWANTED = re.compile(r"(^|/)(\.git|\.venv[^/]*|__pycache__|node_modules|build|\.mypy_cache|\.hypothesis|_trial_temp"
                      r"|mqttbroker-data)/|\.py[co]$|^certs/.*\.(pem|key|srl|csr)$|dropin\.cache$|^docs/_build/"
                      r"|^test-artifacts/")
# Some of those, made in the copies the release is built from: a checkout without them shows nothing.
LEFTOVERS = ("docs/_build/html/index.html", "docs/_build/html/.doctrees/environment.pickle",
             "test-artifacts/dashboard.png", "mqttbroker-data/mqttbroker.db")


def source_version() -> str:
    """``__version__`` as mqtt_broker/__init__.py assigns it: the one place the version is written."""
    tree = ast.parse((ROOT / "mqtt_broker" / "__init__.py").read_text())
    [version] = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
                 and isinstance(node.value, ast.Constant)]
    return str(version)


@dataclass
class Release:
    source: Path          # the copy of the checkout the sdist was built from
    sdist: Path
    wheel: Path           # built from the unpacked sdist, as python -m build does by default
    checkout_wheel: Path  # built from the source tree directly


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """``python -m build`` (the sdist, then the wheel from it) and ``python -m build --wheel`` (the
    wheel from the tree), side by side, each in a copy of the checkout of its own: both write
    *.egg-info into the tree they build."""
    tmp = tmp_path_factory.mktemp("release")
    env = clean_env(MQTT_BROKER_COMPILE="0")
    builds = {}
    for name, args in (("release", []), ("checkout", ["--wheel"])):
        source = tmp / f"source-{name}"
        shutil.copytree(ROOT, source, ignore=IGNORED)
        for leftover in LEFTOVERS:
            (source / leftover).parent.mkdir(parents=True, exist_ok=True)
            (source / leftover).write_bytes(b"")
        builds[name] = subprocess.Popen([sys.executable, "-m", "build", *args, "--outdir", str(tmp / name),
                                         str(source)], cwd=tmp, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
    try:
        for name, build in builds.items():
            output, _ = build.communicate(timeout=300)
            assert build.returncode == 0, f"python -m build ({name}) exited {build.returncode}:\n{output}"
    finally:
        for build in builds.values():
            terminate(build)  # type: ignore[arg-type]
    [sdist] = (tmp / "release").glob("*.tar.gz")
    [wheel] = (tmp / "release").glob("*.whl")
    [checkout_wheel] = (tmp / "checkout").glob("*.whl")
    return Release(tmp / "source-release", sdist, wheel, checkout_wheel)


def test_build_names_the_version_once_and_twine_accepts_it(release: Release) -> None:
    version = source_version()
    # (mqtt_broker on PyPI is another project's, which ships a package of that name too.)
    assert release.sdist.name == f"txmqttbroker-{version}.tar.gz"
    assert release.wheel.name == f"txmqttbroker-{version}-py3-none-any.whl"
    with zipfile.ZipFile(release.wheel) as wheel:
        metadata = wheel.read(f"txmqttbroker-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata
    assert "Description-Content-Type: text/markdown" in metadata
    # setup.cfg reads it from the package; nothing else may say it.
    assert re.findall(r"(?m)^version\s*=.*$", (ROOT / "setup.cfg").read_text()) == [
        "version = attr: mqtt_broker.__version__"]
    assert "version" not in (ROOT / "pyproject.toml").read_text()
    result = run([sys.executable, "-m", "twine", "check", "--strict", str(release.sdist), str(release.wheel)],
                 cwd=release.sdist.parent, timeout=120)
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_changelog_has_this_release() -> None:
    """A release's version has its dated section, and nothing is left under Unreleased. Between
    releases the version is the next one's .devN: built from main as 0.1.0, it was taken for the
    release it had moved past (pip would not upgrade 0.1.0 to it)."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "[Keep a Changelog](https://keepachangelog.com/" in changelog
    version = source_version()
    released = re.findall(r"(?m)^## (\d+\.\d+\.\d+) - \d{4}-\d{2}-\d{2}$", changelog)
    unreleased = re.search(r"(?ms)^## Unreleased$(.*?)^## ", changelog)
    if ".dev" not in version:
        assert version in released and (unreleased is None or not unreleased.group(1).strip()), version
        return
    base, _, dev = version.partition(".dev")
    assert dev.isdigit() and unreleased is not None and unreleased.group(1).strip()
    assert all(tuple(map(int, base.split("."))) > tuple(map(int, r.split("."))) for r in released), (version, released)


def test_sdist_holds_the_tests_docs_and_examples(release: Release) -> None:
    prefix = release.sdist.name.removesuffix(".tar.gz") + "/"
    with tarfile.open(release.sdist) as sdist:
        names = {member.name.removeprefix(prefix) for member in sdist.getmembers() if member.isfile()}
        scripts = {member.name.removeprefix(prefix): member.mode for member in sdist.getmembers()
                   if member.name.endswith(("certs/make-certs.sh", "scripts/test", "scripts/run"))}
    missing = SDIST_FILES - names
    assert not missing, f"not in the sdist: {sorted(missing)}"
    for tree in SDIST_TREES:
        # The copy the sdist was built from, less build output and caches (test_packaging.IGNORED)
        # and the leftovers.
        files = {name for path in (release.source / tree).rglob("*") if path.is_file()
                 and not UNWANTED.search(name := path.relative_to(release.source).as_posix())}
        assert files and not files - names, f"{tree}/ files not in the sdist: {sorted(files - names)}"
    assert {path.relative_to(ROOT).as_posix() for path in (ROOT / "mqtt_broker").rglob("*.py")
            if "__pycache__" not in path.parts} <= names
    assert all(mode & 0o111 for mode in scripts.values()) and len(scripts) == 3, scripts
    unwanted = [name for name in names if UNWANTED.search(name)]
    assert not unwanted, unwanted


def test_wheel_from_the_sdist_is_the_wheel_from_the_checkout(release: Release) -> None:
    with zipfile.ZipFile(release.wheel) as from_sdist, zipfile.ZipFile(release.checkout_wheel) as from_tree:
        names = sorted(from_sdist.namelist())
        assert names == sorted(from_tree.namelist())
        differ = [name for name in names if name.endswith(".py") and from_sdist.read(name) != from_tree.read(name)]
    assert not differ
    assert "mqtt_broker/admin/openapi.json" in names and "twisted/plugins/mqttbroker.py" in names


@pytest.fixture(scope="module")
def venv(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the release's wheel and its dependencies, installed by this
    interpreter's pip (``--python``) from the package index pip is configured with; the venv
    gets no pip of its own, which saves the time ensurepip takes."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent, timeout=120)
    run([sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "--quiet",
         str(release.wheel)], cwd=path.parent, env=clean_env(), timeout=600)
    return path


def venv_env(venv: Path) -> dict[str, str]:
    """Nothing from this checkout or the tests' install: PYTHONSAFEPATH keeps the working
    directory off sys.path (the commands run elsewhere anyway)."""
    return clean_env(PYTHONSAFEPATH="1", PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")


def test_installed_from_the_wheel_with_its_commands(venv: Path, tmp_path: Path) -> None:
    env = venv_env(venv)
    where = run([str(venv / "bin" / "python"), "-c", "import mqtt_broker; print(mqtt_broker.__file__)"],
                cwd=tmp_path, env=env, timeout=60).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where).resolve().is_relative_to(ROOT)
    twistd = str(venv / "bin" / "twistd")
    version = run([twistd, "mqttbroker", "--version"], cwd=tmp_path, env=env, timeout=60).stdout
    assert version.startswith(f"mqtt_broker {source_version()} (pure Python)\n")
    for command in ([twistd, "mqttbroker", "--help"], [str(venv / "bin" / "python"), "-m", "twisted",
                                                          "mqttbroker", "--help"]):
        usage = run(command, cwd=tmp_path, env=env, timeout=60).stdout
        assert "--endpoint=" in usage and "--config=" in usage, command
    assert "usage: mqttbroker-passwd" in run([str(venv / "bin" / "mqttbroker-passwd"), "--help"],
                                             cwd=tmp_path, env=env, timeout=60).stdout
    assert "from-mosquitto" in run([str(venv / "bin" / "mqttbroker-config"), "--help"],
                                   cwd=tmp_path, env=env, timeout=60).stdout


def exchange_qos1(sub_port: int, pub_port: int, topic: str, sub_args: dict[str, Any] | None = None,
                  pub_args: dict[str, Any] | None = None) -> None:
    """One QoS 1 message from a publisher to a subscriber (paho-mqtt)."""
    sub = PahoClient(sub_port, "release-sub", **(sub_args or {}))
    pub = PahoClient(pub_port, "release-pub", **(pub_args or {}))
    try:
        assert sub.reason == 0 and pub.reason == 0
        assert [int(code.value) for code in sub.subscribe(topic, qos=1)] == [1]
        pub.publish(topic, b"installed", qos=1)
        message = sub.message()
        assert (message.topic, message.payload, message.qos) == (topic, b"installed", 1)
    finally:
        pub.close()
        sub.close()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Brokers the test starts, stopped at the end if the test has not."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        terminate(process)


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM to the PID, as systemd stops a unit; the broker must shut down cleanly and in time.
    twistd ends by raising the signal again, which systemd counts as a clean stop."""
    os.kill(process.pid, signal.SIGTERM)
    try:
        code = process.wait(WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail("the broker did not stop within 10 s of SIGTERM:\n" + log.read_text(errors="replace"))
    output = log.read_text(errors="replace")
    assert code in (0, -signal.SIGTERM) and "Server Shut Down." in output, output


def test_installed_broker_exchanges_a_qos1_message(venv: Path, tmp_path: Path,
                                                   processes: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(venv / "bin" / "twistd"), "-n", "mqttbroker", "--endpoint",
                                    f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(tmp_path / "data")],
                                   cwd=tmp_path, env=venv_env(venv), stdout=out, stderr=subprocess.STDOUT)
    processes.append(process)
    wait_for_port(port, process)
    exchange_qos1(port, port, "release/qos1")
    stop(process, log)
    assert (tmp_path / "data" / "mqttbroker.db").is_file()


def unit_settings() -> dict[str, list[str]]:
    """The unit's settings, each with every value it is given, in order."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_runs_the_broker_as_systemd_expects() -> None:
    unit = unit_settings()
    assert unit["Type"] == ["simple"]
    [exec_start] = unit["ExecStart"]
    assert shlex.split(exec_start) == [UNIT_TWISTD, "-n", "--pidfile=", "mqttbroker", "--config", UNIT_CONFIG]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] == unit["Group"] == ["mqttbroker"]
    assert unit["WorkingDirectory"] == [f"/var/lib/{unit['StateDirectory'][0]}"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality"):
        assert unit[key] == ["yes"], key
    assert unit["MemoryDenyWriteExecute"] == ["no"]  # see test_memory_deny_write_execute_breaks_tls
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert unit["SystemCallFilter"] == ["@system-service"]
    assert unit["CapabilityBoundingSet"] == unit["AmbientCapabilities"] == [""]
    assert int(unit["LimitNOFILE"][0]) >= 65536


def installed_unit(venv: Path, directory: Path) -> Path:
    """The unit with ExecStart pointing at the virtualenv's twistd (verify wants it to exist)."""
    text = UNIT.read_text()
    assert text.count(UNIT_TWISTD) == 2  # the install note and ExecStart
    directory.mkdir(exist_ok=True)
    (directory / UNIT.name).write_text(text.replace(UNIT_TWISTD, str(venv / "bin" / "twistd")))
    return directory / UNIT.name


def test_unit_passes_systemd_analyze(venv: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian: systemd; ./scripts/test installs it)"
    unit = installed_unit(venv, tmp_path / "units")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr
    # Exposure is 0-10 (printed) and 0-100 (the threshold); the unit scores 1.6, "OK".
    result = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux 6.3): the kernel's own MemoryDenyWriteExecute,
# kept across execve. `python -c RESTRICT UMASK yes|no COMMAND...` sets it and the umask, then runs
# the command in its place, so that the PID is the command's.
RESTRICT = """
import ctypes, os, sys
umask, deny_write_execute, *command = sys.argv[1:]
if deny_write_execute == "yes" and ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}")
os.umask(int(umask, 8))
os.execv(command[0], command)
"""


def restricted(umask: str, deny_write_execute: bool, *command: str) -> list[str]:
    return [sys.executable, "-c", RESTRICT, umask, "yes" if deny_write_execute else "no", *command]


def can_deny_write_execute() -> bool:
    result = subprocess.run(restricted("022", True, sys.executable, "-c", "pass"), capture_output=True, timeout=60)
    return result.returncode == 0


def test_memory_deny_write_execute_breaks_tls(venv: Path, tmp_path: Path) -> None:
    """Why the unit leaves MemoryDenyWriteExecute off: the installed broker imports fine under it,
    but pyOpenSSL's callbacks, which every TLS listener sets, cannot be made. Should this start
    passing the other way, the unit can turn it on (and the test below runs the broker under it)."""
    if not can_deny_write_execute():
        pytest.skip("this kernel cannot deny writable and executable memory (PR_SET_MDWE, Linux 6.3)")
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    result = subprocess.run(restricted("022", True, sys.executable, "-c", wx), capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode != 0 and "PermissionError" in result.stderr, result.stderr  # it is in force
    script = textwrap.dedent("""
        import mqtt_broker.broker, mqtt_broker.tap
        from OpenSSL import SSL
        try:
            SSL.Context(SSL.TLS_METHOD).set_alpn_select_callback(lambda connection, offered: offered[0])
        except MemoryError as e:
            print("refused:", e)
        else:
            print("allowed")
    """)
    result = run(restricted("022", True, str(venv / "bin" / "python"), "-c", script), cwd=tmp_path,
                 env=venv_env(venv), timeout=60)
    assert result.stdout.startswith("refused: Cannot allocate write+execute memory"), result.stdout


def test_unit_command_line_runs_the_installed_broker_and_reloads_on_sighup(
        venv: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """ExecStart as written, but for the paths: TLS and TCP listeners, a password file, the state
    directory as working directory and the unit's UMask. Then ExecReload, and SIGTERM as
    systemctl stop sends it."""
    unit = unit_settings()
    env = venv_env(venv)
    certs = tmp_path / "certs"
    make_certs(certs)
    passwd = tmp_path / "passwd"
    run([str(venv / "bin" / "mqttbroker-passwd"), "-c", "-b", str(passwd), "alice", "wonderland"],
        cwd=tmp_path, env=env, timeout=60)
    tcp, tls = free_port(), free_port()
    config = tmp_path / "mqttbroker.toml"
    endpoints = [f"tcp:{tcp}:interface=127.0.0.1",
                 f"ssl:{tls}:interface=127.0.0.1:privateKey={_endpoint_quote(certs / 'server.key')}"
                 f":certKey={_endpoint_quote(certs / 'server.pem')}"]
    config.write_text(f"endpoints = {json.dumps(endpoints)}\nallow_anonymous = false\n"
                      f"password_file = {json.dumps(str(passwd))}\n")
    state = tmp_path / "state"  # StateDirectory=, the working directory
    state.mkdir()
    command = [str(venv / "bin" / "twistd") if arg == UNIT_TWISTD else str(config) if arg == UNIT_CONFIG else arg
               for arg in shlex.split(unit["ExecStart"][0])]
    # Should the unit turn MemoryDenyWriteExecute on, the broker runs under it where the kernel can.
    deny_write_execute = unit["MemoryDenyWriteExecute"] == ["yes"] and can_deny_write_execute()
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(restricted(unit["UMask"][0], deny_write_execute, *command), cwd=state,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    processes.append(process)
    try:
        wait_for_port(tcp, process)
        wait_for_port(tls, process)
    except (RuntimeError, TimeoutError):
        raise AssertionError("the broker did not start:\n" + log.read_text(errors="replace")) from None
    login = {"username": "alice", "password": "wonderland"}
    exchange_qos1(tls, tcp, "release/unit", {**login, "ca_certs": str(certs / "ca.pem")}, login)

    # ExecReload: a user added to the password file gets in once the broker has been told.
    run([str(venv / "bin" / "mqttbroker-passwd"), "-b", str(passwd), "bob", "builder"], cwd=tmp_path, env=env,
        timeout=60)
    assert connect_code(tcp, "bob", "builder") != 0
    reload = [process.pid if arg == "$MAINPID" else arg for arg in shlex.split(unit["ExecReload"][0])]
    run([str(arg) for arg in reload], cwd=tmp_path, timeout=60)
    deadline = time.monotonic() + WAIT
    while connect_code(tcp, "bob", "builder") != 0:  # the handler queues the reload on the reactor
        assert time.monotonic() < deadline, "SIGHUP did not reload the password file:\n" + log.read_text()
    assert connect_code(tcp, "alice", "wonderland") == 0

    stop(process, log)
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output
    assert not (state / "twistd.pid").exists()  # --pidfile=
    store = state / "mqttbroker-data" / "mqttbroker.db"  # data_dir's default, in the state directory
    assert store.is_file()
    assert store.stat().st_mode & 0o077 == 0  # UMask=0077
