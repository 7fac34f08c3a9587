"""The wheel as users get it: the twistd plugin ships, is found once installed, and stays light."""

from __future__ import annotations

import configparser
import importlib
import importlib.machinery
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import mqtt_broker
from mqtt_broker.auth.passwords import PasswordFile

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

# Build output and caches that must not go into the copy the wheel is built from.
IGNORED = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                 "dropin.cache", ".mypy_cache", ".hypothesis", "node_modules", "_trial_temp")


# The oldest release of each dependency the broker works with, for what the release before lacks.
FLOORS = {
    # websocket.py imports USES_NVX (25.9.1); a message inflated past the limit closed 1000, not
    # 1009 (26.7.1); the handshake's header lines were split at a NEL byte too, so a client behind
    # a trusted proxy could add an X-Forwarded-For of its own (26.11.1).
    "autobahn": "26.11.1",
    # The first that does not import cgi, which Python 3.13 removed.
    "treq": "24.9.0",
    # Older ones read a peer's certificate with X509.get_extension, which pyOpenSSL 26.2 removed,
    # so every TLS client connection (Redis, bridges, http_auth_url) failed its hostname check.
    "service-identity": "24.2.0",
}


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the source tree (building in place would write build/ and
    *.egg-info into the repository, and two test runs at once would share them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(source), "-w", str(tmp / "dist")],
        cwd=tmp)
    [built] = (tmp / "dist").glob("txmqttbroker-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a directory of its own; put it on PYTHONPATH to use it."""
    site = tmp_path_factory.mktemp("installed") / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
        cwd=site.parent)
    return site


def test_a_build_without_a_c_compiler_makes_a_pure_python_wheel(tmp_path: Path) -> None:
    """It fell back to pure Python when the compiler failed, but the wheel was tagged for this
    platform (cp311-cp311-linux_x86_64) with no extension in it."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    result = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", str(source), "-w", str(tmp_path / "dist")],
                 cwd=tmp_path, env=clean_env(MQTT_BROKER_COMPILE="1", CC="/nonexistent/cc"))
    [built] = (tmp_path / "dist").glob("txmqttbroker-*.whl")
    assert built.name.endswith("-py3-none-any.whl"), built.name
    assert "no C compiler ('/nonexistent/cc')" in result.stdout + result.stderr
    assert not [name for name in zipfile.ZipFile(built).namelist() if name.endswith(SUFFIX)]


def test_a_build_in_a_checkout_leaves_out_what_an_earlier_build_left_there(tmp_path: Path) -> None:
    """`pip install .` builds in the checkout's build/, and setuptools put all of it into the
    wheel: the stub of a module compiled then and no longer (left out of COMPILED, or deleted),
    which shadows the .py and cannot be imported, and a module deleted since."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    earlier = source / "build" / "lib" / "mqtt_broker"  # (the pure build's; a compiled one has its own)
    earlier.mkdir(parents=True)
    (earlier / f"connect{SUFFIX}").write_bytes(b"\x7fELF")
    (earlier / "gone.py").write_text("")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(source), "-w", str(tmp_path / "dist")],
        cwd=tmp_path, env=clean_env(MQTT_BROKER_COMPILE="0"))
    [built] = (tmp_path / "dist").glob("txmqttbroker-*.whl")
    names = set(zipfile.ZipFile(built).namelist())
    assert "mqtt_broker/connect.py" in names
    assert not {f"mqtt_broker/connect{SUFFIX}", "mqtt_broker/gone.py"} & names


def test_a_build_whose_compiling_fails_ships_no_module_an_earlier_build_compiled(tmp_path: Path) -> None:
    """The stubs an earlier compiled build left in build/ were kept as what this one makes, and
    shipped when compiling then failed ("installing the pure-Python modules only"). Nothing of
    build_lib but what the build makes is removed (``--build-lib`` may name a folder of other
    files)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    earlier = source / "build" / f"lib.linux-x86_64-cpython-{sys.version_info[0]}{sys.version_info[1]}"
    (earlier / "mqtt_broker").mkdir(parents=True)
    stale = earlier / "mqtt_broker" / f"connect{SUFFIX}"
    stale.write_bytes(b"\x7fELF")
    os.utime(stale, (978307200, 978307200))  # (2001: older than the C the build writes)
    result = run([sys.executable, "setup.py", "build_ext"], cwd=source, env=clean_env(MQTT_BROKER_COMPILE="1", CC="false"))
    assert "compiling failed" in result.stderr and not stale.exists()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "other").mkdir(parents=True)
    (elsewhere / "other" / "keep.py").write_text("")
    run([sys.executable, "setup.py", "build", "--build-lib", str(elsewhere)], cwd=source,
        env=clean_env(MQTT_BROKER_COMPILE="0"))
    assert (elsewhere / "other" / "keep.py").exists() and (elsewhere / "mqtt_broker" / "connect.py").exists()


@pytest.mark.parametrize("cc", [" ", 'gcc "-O2'])
def test_a_cc_that_names_no_command_is_no_c_compiler(cc: str) -> None:
    """Blank (``$CCACHE $COMPILER``, both unset) or unbalanced, it made setup.py fail."""
    result = run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=clean_env(MQTT_BROKER_COMPILE="1", CC=cc))
    assert result.stdout.split()[-1] == "txmqttbroker" and f"no C compiler ({cc!r})" in result.stderr


def test_the_dependencies_exclude_the_releases_the_broker_fails_with() -> None:
    """pip keeps an older release already installed, or takes one a constraints file names, if
    the requirement allows it; `pip check` then sees nothing wrong and the broker fails at run
    time (or, with autobahn, trusts an address a client wrote)."""
    options = configparser.ConfigParser(interpolation=None)
    options.read(ROOT / "setup.cfg")
    requirements = {canonicalize_name(r.name): r for r in map(Requirement, filter(
        None, options["options"]["install_requires"].splitlines()))}
    assert {name: str(requirements[name].specifier) for name in FLOORS} == {
        name: f">={floor}" for name, floor in FLOORS.items()}


def test_no_plugins_init_in_source() -> None:
    assert (ROOT / "twisted" / "plugins" / "mqttbroker.py").is_file()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "__init__.py").exists()


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("twisted/plugins/mqttbroker.py", "mqtt_broker/py.typed", "mqtt_broker/wire/codec.py",
                     "mqtt_broker/tap.py", "mqtt_broker/config.py"):
        assert required in names
    # Either would shadow Twisted's own package once installed.
    assert "twisted/plugins/__init__.py" not in names
    assert [name for name in names if name.endswith((".dist-info/licenses/LICENSE", ".dist-info/LICENSE"))]  # (MIT)
    assert "twisted/__init__.py" not in names
    assert not [name for name in names if name.endswith(("dropin.cache", ".pyc"))]
    assert not [name for name in names if name.startswith("tests/")]
    # A compiled wheel adds mypyc's shared library of the compiled modules beside the package.
    assert {n.split("/")[0] for n in names} - {f"mqtt_broker__mypyc{SUFFIX}"} == {
        "mqtt_broker", "twisted", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}


def test_wheel_is_compiled_unless_told_not_to(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    compiled = {name for name in names if name.endswith(SUFFIX)}
    if os.environ.get("MQTT_BROKER_COMPILE") == "0":
        assert not compiled
    else:
        assert compiled == {f"mqtt_broker__mypyc{SUFFIX}"} | {
            f"mqtt_broker/cluster/{name}{SUFFIX}" for name in ("codec", "forwarding")} | {
            f"mqtt_broker/{name}{SUFFIX}" for name in (
                "topics", "message", "session", "delivery", "deadlines", "protocol", "connecting", "publishing",
                "subscribing", "connect")} | {
            f"mqtt_broker/wire/{name}{SUFFIX}" for name in ("__init__", "codec", "packets", "properties")}


def test_the_build_under_test() -> None:
    """scripts/test runs the suite against a compiled and a pure-Python install, naming the one
    it expects in MQTT_BROKER_EXPECT_BUILD ("compiled" or "pure"). Without that variable, this
    says which build it found."""
    build = "compiled" if mqtt_broker.compiled else "pure Python"
    where = Path(mqtt_broker.__file__).parent
    # The brokers the tests start run the same build as the tests.
    version = run([sys.executable, "-m", "twisted", "mqttbroker", "--version"], cwd=ROOT, timeout=60).stdout
    assert version.startswith(f"mqtt_broker {mqtt_broker.__version__} ({build})\n")
    expected = os.environ.get("MQTT_BROKER_EXPECT_BUILD")
    if expected is None:
        pytest.skip(f"testing the {build} build in {where}")
    assert mqtt_broker.compiled == (expected == "compiled"), f"expected the {expected} build, found {build}"
    assert where != ROOT / "mqtt_broker", "the tests import this checkout, not the installed build"


def test_loggers_are_named_after_their_modules() -> None:
    """Log observers and filters go by namespace; a compiled module's ``Logger()`` would take its
    namespace from whatever Python frame is below it (``importlib._bootstrap``)."""
    from twisted.logger import Logger
    loggers = {}
    for info in pkgutil.walk_packages(mqtt_broker.__path__, "mqtt_broker."):
        if not info.name.endswith("__main__"):
            module = importlib.import_module(info.name)
            loggers.update({info.name: value.namespace for value in vars(module).values() if isinstance(value, Logger)})
    assert {"mqtt_broker.protocol", "mqtt_broker.delivery", "mqtt_broker.broker"} <= loggers.keys()
    assert {name: namespace for name, namespace in loggers.items() if namespace != name} == {}


def test_the_public_names_pass_a_strict_type_check(tmp_path: Path) -> None:
    """Applications check their code with mypy --strict, which refuses a name that a package does
    not export explicitly: the names the package imports on first use are exported so."""
    (tmp_path / "app.py").write_text(textwrap.dedent("""\
        from mqtt_broker import (
            BrokerConfig, BrokerService, Client, ConfigError, Hooks, Message, ReasonCode, Refused, Subscription,
        )


        def guard(client: Client, message: Message) -> Refused | None:
            return Refused(ReasonCode.NOT_AUTHORIZED, "no") if message.topic.startswith("admin/") else None


        def hooks_of(broker: BrokerService) -> Hooks:
            broker.hooks.on_publish(guard)
            return broker.hooks


        print(BrokerConfig, ConfigError, Subscription)
    """))
    # (from tmp_path: the build under test, as an application sees it)
    run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "app.py"], cwd=tmp_path)
    assert set(mqtt_broker.__all__) == {*mqtt_broker._EXPORTS, "__version__", "compiled"}  # (written out twice)


def test_wheel_has_every_module(wheel: Path) -> None:
    """A subpackage that packages = find_namespace: missed would only show up once installed."""
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {path.relative_to(ROOT).as_posix() for path in (ROOT / "mqtt_broker").rglob("*.py")
              if "__pycache__" not in path.parts}
    assert source and source <= names


def test_wheel_installs_the_commands_and_the_endpoint_plugin(wheel: Path, installed: Path, tmp_path: Path) -> None:
    """The wheel declares mqttbroker-passwd and mqttbroker-config and ships the mqtts: endpoint
    plugin; installed, the scripts run the commands and Twisted finds the plugin."""
    with zipfile.ZipFile(wheel) as archive:
        [entry_points] = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        declared = archive.read(entry_points).decode()
        assert "mqttbroker-passwd = mqtt_broker.passwd:main" in declared
        assert "mqttbroker-config = mqtt_broker.mosquitto:main" in declared
        assert {"twisted/plugins/mqttbroker_mqtts.py", "mqtt_broker/auth/endpoint.py",
                "mqtt_broker/passwd.py"} <= set(archive.namelist())
    path = tmp_path / "pw"
    env = {**os.environ, "PYTHONPATH": str(installed)}
    run([str(installed / "bin" / "mqttbroker-passwd"), "-c", "-b", str(path), "alice", "pw"], cwd=tmp_path, env=env,
        timeout=30)
    assert PasswordFile.load(path).users["alice"].verify(b"pw")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 127.0.0.1\n")
    result = run([str(installed / "bin" / "mqttbroker-config"), "from-mosquitto", str(conf)], cwd=tmp_path, env=env,
                 timeout=30)
    assert 'endpoints = ["tcp:1883:interface=127.0.0.1"]' in result.stdout
    script = ("from twisted.plugin import getPlugins\n"
              "from twisted.internet.interfaces import IStreamServerEndpointStringParser as I\n"
              "[p] = [p for p in getPlugins(I) if p.prefix == 'mqtts']\n"
              "print(type(p).__module__)")
    result = run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=30)
    assert result.stdout.strip() == "mqtt_broker.auth.endpoint"


def test_installed_plugin_is_found(installed: Path, tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import json, sys
        import twisted.plugins
        from twisted.plugin import getPlugins
        from twisted.application.service import IServiceMaker
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "mqttbroker"]
        import mqtt_broker
        print(json.dumps({
            "makers": [[p.tapname, p.module, p.name] for p in makers],
            "plugin_file": sys.modules["twisted.plugins.mqttbroker"].__file__,
            "package_file": mqtt_broker.__file__,
            "plugin_path": list(twisted.plugins.__path__),
            "reactor": "twisted.internet.reactor" in sys.modules,
        }))
    """)
    env = clean_env(PYTHONPATH=str(installed))
    found = json.loads(run([sys.executable, "-c", script], cwd=tmp_path, env=env).stdout)
    assert found["makers"] == [["mqttbroker", "mqtt_broker.tap", "MQTT broker"]]
    assert Path(found["package_file"]).is_relative_to(installed)
    assert str(installed / "twisted" / "plugins") in found["plugin_path"]
    assert found["reactor"] is False
    # Where this interpreter already has the package installed (scripts/test's virtualenv), its copy
    # of the plugin sits beside Twisted's own and is found first; otherwise it must be the wheel's.
    elsewhere = run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('mqtt_broker'))"],
                    cwd=tmp_path, env=clean_env()).stdout.strip() != "None"
    if not elsewhere:
        assert Path(found["plugin_file"]).is_relative_to(installed)


def test_installed_twistd_help(installed: Path, tmp_path: Path) -> None:
    env = clean_env(PYTHONPATH=str(installed))
    result = run([sys.executable, "-m", "twisted", "mqttbroker", "--help"], cwd=tmp_path, env=env, timeout=60)
    assert "--endpoint=" in result.stdout and "--max-qos=" in result.stdout
    listing = run([sys.executable, "-m", "twisted", "--help"], cwd=tmp_path, env=env, timeout=60)
    assert "mqttbroker" in listing.stdout


def test_installed_twistd_rejects_bad_flag(installed: Path, tmp_path: Path) -> None:
    env = clean_env(PYTHONPATH=str(installed))
    result = subprocess.run([sys.executable, "-m", "twisted", "mqttbroker", "--max-qos", "3"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--max-qos: 3 is out of range (0..2)" in result.stdout + result.stderr


def test_plugin_does_not_import_the_reactor(tmp_path: Path) -> None:
    """twistd --help imports every plugin and builds their Options; none of it may install a reactor."""
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location(
            "mqttbroker_plugin", {str(ROOT / "twisted" / "plugins" / "mqttbroker.py")!r})
        plugin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
        after_import = "twisted.internet.reactor" in sys.modules
        options = plugin.mqttbroker.options()
        usage = options.getUsage()
        print(json.dumps({{
            "after_import": after_import,
            "after_options": "twisted.internet.reactor" in sys.modules,
            "broker": "mqtt_broker.broker" in sys.modules,
            "tapname": plugin.mqttbroker.tapname,
            "usage": usage,
        }}))
    """)
    result = run([sys.executable, "-c", script], cwd=tmp_path, env=clean_env(PYTHONPATH=str(ROOT)), timeout=60)
    found = json.loads(result.stdout)
    assert found["tapname"] == "mqttbroker"
    assert "--endpoint=" in found["usage"]
    assert found["after_import"] is False
    assert found["after_options"] is False
    assert found["broker"] is False
