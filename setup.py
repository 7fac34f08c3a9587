"""Builds mqtt_broker, compiling its hot modules with mypyc (metadata: setup.cfg).

MQTT_BROKER_COMPILE=0 builds pure Python; so does a build without mypy or a C compiler, saying so.
Either way the package holds every .py file, and the pure-Python modules are the reference.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build import build
from setuptools.command.build_ext import build_ext

# The codec, topic matching and the path of a message from socket to socket: the work done for
# every message. Not wire/codes.py: its
# exceptions' reason codes are class attributes, which mypyc drops from compiled subclasses, and
# nothing in it runs per message.
COMPILED = ["mqtt_broker/wire/__init__.py", "mqtt_broker/wire/codec.py", "mqtt_broker/wire/packets.py",
            "mqtt_broker/wire/properties.py", "mqtt_broker/topics.py", "mqtt_broker/cluster/codec.py",
            "mqtt_broker/cluster/forwarding.py",
            "mqtt_broker/message.py", "mqtt_broker/session.py", "mqtt_broker/delivery.py",
            "mqtt_broker/deadlines.py", "mqtt_broker/protocol.py", "mqtt_broker/connecting.py",
            "mqtt_broker/publishing.py", "mqtt_broker/subscribing.py", "mqtt_broker/connect.py"]


def warn(why: str) -> None:
    print(f"*** mqtt_broker: {why}; installing the pure-Python modules only ***", file=sys.stderr)


def cannot_compile() -> str | None:
    """Why no extension can be built here (no C compiler, no Python headers), or None. Known
    before setup(), such a build makes a pure-Python wheel (py3-none-any), not one tagged for
    this platform that holds no extension."""
    import shlex
    import shutil
    import sysconfig
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    try:
        words = shlex.split(compiler)
    except ValueError:  # (an unbalanced quote)
        words = []
    if not words or shutil.which(words[0]) is None:
        return f"no C compiler ({compiler!r})"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "no Python headers (Python.h: python3-dev on Debian)"
    return None


def compiled_modules() -> list[Extension]:
    if os.environ.get("MQTT_BROKER_COMPILE", "1") == "0":
        return []
    why = cannot_compile()
    if why is not None:
        warn(why)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        warn("mypy (mypyc) is not installed")
        return []
    # No config file: setup.cfg's [mypy] section loads a plugin the build neither needs nor
    # installs, and imports outside the compiled modules are not followed (mqtt_broker/__init__
    # names the whole package for type checkers), nor need they be installed (Twisted, for the
    # protocol's imports: what is not followed is typed Any). The compiled modules share one library,
    # mqtt_broker__mypyc, beside the package: a name inside it (group_name "mqtt_broker.x") gives
    # the modules wrong __file__ paths.
    options = ["--config-file=", "--follow-imports=skip", "--ignore-missing-imports"]
    return mypycify([*options, *COMPILED, "mqtt_broker/wire/codes.py"], only_compile_paths=COMPILED,
                    group_name="mqtt_broker")


class BuildExt(build_ext):
    """Falls back to pure Python when the C compiler fails or is missing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # distutils raises several unrelated types for a missing compiler
            warn(f"compiling failed ({e})")
            for path in self.get_outputs():  # an earlier build's would ship, and shadow the .py
                if os.path.exists(path):
                    os.remove(path)


class Build(build):
    """Starts from what this build makes: all of build_lib goes into the wheel, and `pip install .`
    builds in the checkout's build/, which keeps an earlier build's files. The stub of a module
    compiled then and no longer (left out of COMPILED, or deleted) shadows the .py and cannot be
    imported, the shared library having no init for it; a module deleted since would ship too.
    What this build makes it keeps: build_ext leaves an extension newer than its C alone. Only
    what this project's builds make is looked at (``--build-lib`` may name a folder of others)."""

    def run(self) -> None:
        made = {os.path.normpath(path) for command in ("build_py", "build_ext")
                for path in self.get_finalized_command(command).get_outputs()}
        ours = [os.path.join(self.build_lib, "mqtt_broker"), os.path.join(self.build_lib, "twisted", "plugins")]
        for directory, _, files in (entry for root in ours for entry in os.walk(root)):
            for path in (os.path.normpath(os.path.join(directory, name)) for name in files):
                if path not in made:
                    os.remove(path)
        for path in glob.glob(os.path.join(self.build_lib, "mqtt_broker__mypyc*")):
            if os.path.normpath(path) not in made:
                os.remove(path)
        super().run()


setup(ext_modules=compiled_modules(), cmdclass={"build": Build, "build_ext": BuildExt})
