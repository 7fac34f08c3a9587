"""Writes docs/_inventories/twisted.inv, the intersphinx inventory of Twisted's API.

The docs build has no network, so it cannot fetch Twisted's objects.inv; this script makes an
equivalent one from the installed Twisted, with the URLs of Twisted's pydoctor API pages
(https://docs.twisted.org/en/stable/api/<module or class>.html, members as #anchors). Run it
after changing the Twisted modules listed here, or when Twisted moves a name, and commit
the result:

    pip install sphobjinv && python docs/make_inventory.py
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import sphobjinv as soi
import twisted
from zope.interface.interface import InterfaceClass

# The modules the broker's API and these docs refer to (not all of Twisted: importing some of it
# installs reactors or needs optional dependencies).
MODULES = [
    "twisted.application.internet", "twisted.application.service", "twisted.application.strports",
    "twisted.internet.address", "twisted.internet.defer", "twisted.internet.endpoints",
    "twisted.internet.error", "twisted.internet.interfaces", "twisted.internet.protocol",
    "twisted.internet.ssl", "twisted.internet.task", "twisted.internet.testing",
    "twisted.logger", "twisted.plugin", "twisted.python.failure", "twisted.python.usage",
    "twisted.web.resource", "twisted.web.server", "twisted.web.static", "twisted.web.http",
    "twisted.web.iweb",
]


def entries(module_name: str) -> list[tuple[str, str, str]]:
    """(name, role, uri) of a module and the public names it defines."""
    module = importlib.import_module(module_name)
    found = [(module_name, "module", f"{module_name}.html")]
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module_name:
            continue
        full = f"{module_name}.{name}"
        if isinstance(value, (type, InterfaceClass)):
            role = "exception" if isinstance(value, type) and issubclass(value, BaseException) else "class"
            found.append((full, role, f"{full}.html"))
            members = value.names() if isinstance(value, InterfaceClass) else vars(value)
            for member in members:
                if member.startswith("_"):
                    continue
                attribute = value.get(member) if isinstance(value, InterfaceClass) else vars(value)[member]
                kind = "method" if callable(attribute) or inspect.isfunction(attribute) else "attribute"
                found.append((f"{full}.{member}", kind, f"{full}.html#{member}"))
        elif inspect.isfunction(value):
            found.append((full, "function", f"{module_name}.html#{name}"))
    return found


def main() -> None:
    inventory = soi.Inventory()
    inventory.project = "Twisted"
    inventory.version = twisted.__version__
    seen = set()
    for module_name in MODULES:
        for name, role, uri in entries(module_name):
            if name in seen:
                continue
            seen.add(name)
            inventory.objects.append(soi.DataObjStr(name=name, domain="py", role=role, priority="1",
                                                    uri=uri, dispname="-"))
    target = Path(__file__).parent / "_inventories" / "twisted.inv"
    soi.writebytes(str(target), soi.compress(inventory.data_file(contract=True)))
    print(f"{target}: {len(inventory.objects)} objects of Twisted {twisted.__version__}")


if __name__ == "__main__":
    main()
