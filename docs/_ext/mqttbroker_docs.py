"""References generated from the code, so that they cannot drift from it.

Directives (used from the reStructuredText reference pages):

- ``mqttbroker-settings``: every :class:`mqtt_broker.config.BrokerConfig` setting as a
  ``confval``: TOML key and default, command-line flag, type, bounds and help text, from the
  dataclass fields and their metadata;
- ``mqttbroker-bridge-settings``: the keys of a ``[[bridge]]`` table, from
  :class:`mqtt_broker.bridge.config.BridgeConfig`'s fields and the attribute docstrings that
  follow them in its source;
- ``mqttbroker-options``: the options of ``twistd mqttbroker``, from
  :class:`mqtt_broker.tap.Options` (``optParameters`` and the ``opt_*`` methods' docstrings);
- ``mqttbroker-openapi``: the admin API, from ``mqtt_broker/admin/openapi.json``;
- ``mqttbroker-automodule``: ``automodule`` for a module that may not exist in this version
  (it then says so instead of failing).

The ``*_rows`` functions hold what is rendered, apart from the markup, for the tests.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import re
import textwrap
from importlib import resources
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# --- what is rendered ------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """``value`` as it is written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return repr(value)


def _kind(field: dataclasses.Field[Any]) -> str:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    if isinstance(default, list):
        return "table list" if field.metadata.get("table") else "list of strings"
    return type(default).__name__


def settings_rows() -> list[dict[str, Any]]:
    """One dict per BrokerConfig setting, in declaration order."""
    from mqtt_broker.config import settings
    from mqtt_broker.tap import _LIST_FLAGS, _flag_name

    rows = []
    for f in settings():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        meta = f.metadata
        if meta.get("table"):
            flag = None
        elif f.name in _LIST_FLAGS:
            flag = "--" + _LIST_FLAGS[f.name]
        else:
            flag = "--" + _flag_name(f.name)
        rows.append({
            "name": f.name, "help": meta["help"], "type": _kind(f), "default": default, "flag": flag,
            "repeatable": f.name in _LIST_FLAGS, "table": bool(meta.get("table")),
            "min": meta.get("min") if isinstance(default, (int, float)) and not isinstance(default, bool) else None,
            "max": meta.get("max"), "choices": meta.get("choices"),
        })
    return rows


def attribute_docstrings(cls: type) -> dict[str, str]:
    """The docstrings written after a class's annotated attributes, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    found = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            found[statement.target.id] = inspect.cleandoc(following.value.value)
    return found


def dataclass_rows(cls: type) -> list[dict[str, Any]]:
    """One dict per field of a dataclass: name, type (as annotated), default, docstring."""
    docs = attribute_docstrings(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        rows.append({"name": f.name, "type": str(f.type), "default": default, "doc": docs.get(f.name, "")})
    return rows


def options_rows() -> list[dict[str, Any]]:
    """The options of ``twistd mqttbroker`` in --help's order: names, argument, help, setting."""
    from twisted.python import reflect

    from mqtt_broker.config import settings
    from mqtt_broker.tap import _LIST_FLAGS, Options, _flag_name

    by_flag = {_flag_name(f.name): f.name for f in settings()}
    by_flag.update({flag: name for name, flag in _LIST_FLAGS.items()})
    rows = []
    parameters: list[list[Any]] = []
    reflect.accumulateClassList(Options, "optParameters", parameters)
    for long, short, default, help_text, *_ in parameters:
        rows.append({"long": long, "short": short, "argument": True, "help": help_text,
                     "setting": by_flag.get(long)})
    methods: dict[str, Any] = {}
    reflect.accumulateMethods(Options(), methods, "opt_")
    names: dict[Any, list[str]] = {}
    for name, method in sorted(methods.items()):
        names.setdefault(method.__func__, []).append(name.replace("_", "-"))
    for function, aliases in names.items():
        long = max(aliases, key=len)
        short = next((a for a in aliases if len(a) == 1), None)
        takes = len(inspect.signature(function).parameters) > 1
        rows.append({"long": long, "short": short, "argument": takes,
                     "help": inspect.cleandoc(function.__doc__ or ""), "setting": by_flag.get(long)})
    return rows


def openapi() -> dict[str, Any]:
    return json.loads(resources.files("mqtt_broker.admin").joinpath("openapi.json").read_text("utf-8"))


# --- markup ----------------------------------------------------------------------------------

_SPECIAL = re.compile(r"([\\*`_|\[\]])")


def text(value: str) -> str:
    """Plain text as reStructuredText: nothing in it is taken for markup."""
    return _SPECIAL.sub(r"\\\1", " ".join(value.split()))


def literal(value: str) -> str:
    return "``" + value.replace("`", "\\`") + "``" if value else '``""``'


def _bounds(row: dict[str, Any]) -> str | None:
    low, high = row["min"], row["max"]
    if low is None and high is None:
        return None
    if high is None:
        return f"at least {low}"
    if low is None:
        return f"at most {high}"
    return f"{low} to {high}"


def settings_markup() -> list[str]:
    lines: list[str] = []
    for row in settings_rows():
        lines += [f".. confval:: {row['name']}", f"   :type: {text(row['type'])}"]
        if not row["table"]:
            lines.append(f"   :default: {literal(toml_value(row['default']))}")
        lines += ["", f"   {text(row['help'])}", ""]
        if row["table"]:
            lines.append(f"   :TOML: ``[[{row['name']}]]`` tables, see :ref:`bridge-settings`")
            lines.append("   :Command line: none")
        else:
            lines.append(f"   :TOML: {literal(row['name'] + ' = ' + toml_value(row['default']))}")
            flag = f":option:`{row['flag']} <twistd mqttbroker {row['flag']}>`"
            lines.append(f"   :Command line: {flag}" + (", repeatable (replaces the file's list)" if row["repeatable"] else ""))
        bounds = _bounds(row)
        if bounds:
            lines.append(f"   :Bounds: {bounds}")
        if row["choices"]:
            lines.append("   :Choices: " + ", ".join(literal(c) for c in row["choices"]))
        lines.append("")
    return lines


def bridge_markup() -> list[str]:
    from mqtt_broker.bridge.config import BridgeConfig, BridgeTopic

    lines: list[str] = []
    for row in dataclass_rows(BridgeConfig):
        lines += [f".. confval:: bridge.{row['name']}", f"   :type: {text(row['type'])}"]
        if row["default"] is dataclasses.MISSING:
            lines.append("   :default: none: required")
        elif row["default"] is not None:
            lines.append(f"   :default: {literal(toml_value(row['default']))}")
        else:
            lines.append("   :default: not set")
        lines += ["", f"   {text(row['doc'])}", ""]
    lines += [".. list-table:: Keys of a ``topic`` table (``BridgeTopic``)", "   :header-rows: 1", "",
              "   * - key", "     - type", "     - default", "     - meaning"]
    for row in dataclass_rows(BridgeTopic):
        default = "required" if row["default"] is dataclasses.MISSING else literal(toml_value(row["default"]))
        lines += [f"   * - ``{row['name']}``", f"     - {text(row['type'])}", f"     - {default}",
                  f"     - {text(row['doc'])}"]
    return lines + [""]


def options_markup() -> list[str]:
    lines = [".. program:: twistd mqttbroker", ""]
    for row in options_rows():
        argument = " <" + row["long"].upper().replace("-", "_") + ">" if row["argument"] else ""
        names = [f"--{row['long']}{argument}"]
        if row["short"]:
            names.append(f"-{row['short']}{argument}")
        lines += [f".. option:: {', '.join(names)}", "", f"   {text(row['help'])}", ""]
        if row["setting"]:
            lines += [f"   Setting: :confval:`{row['setting']}`.", ""]
    return lines


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _schema_type(schema: dict[str, Any]) -> str:
    """A schema in a few words: a link to a named one, or its type."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f":ref:`{name} <openapi-schema-{name.lower()}>`"
    kind = schema.get("type", "any")
    if kind == "array":
        return "array of " + _schema_type(schema.get("items", {}))
    if "enum" in schema:
        return kind + ": " + ", ".join(literal(str(e)) for e in schema["enum"])
    if kind == "object" and schema.get("properties"):
        return "object: " + ", ".join(literal(p) for p in schema["properties"])
    return kind


def _resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in item and item["$ref"].startswith("#/components/") and "/schemas/" not in item["$ref"]:
        _, _, kind, name = item["$ref"].split("/")
        item = document["components"][kind][name]
    return item


def openapi_markup() -> list[str]:
    document = openapi()
    lines = [text(document["info"].get("description", "")), ""]
    for path, item in document["paths"].items():
        for method in ("get", "post", "put", "delete", "patch"):
            operation = item.get(method)
            if operation is None:
                continue
            title = f"{method.upper()} /api/v1{path}"
            lines += [f".. _openapi-{operation['operationId'].lower()}:", "", title, "~" * len(title), "",
                      text(operation.get("summary", "")), ""]
            if operation.get("description"):
                lines += [text(operation["description"]), ""]
            if operation.get("security") == []:
                lines += ["No API key needed.", ""]
            parameters = [_resolve(document, p) for p in item.get("parameters", []) + operation.get("parameters", [])]
            if parameters:
                lines += [".. list-table:: Parameters", "   :header-rows: 1", "",
                          "   * - name", "     - in", "     - type", "     - meaning"]
                for p in parameters:
                    schema = p.get("schema", {})
                    kind = _schema_type(schema)
                    extra = [f"{k} {schema[k]}" for k in ("minimum", "maximum", "default") if k in schema]
                    description = text(p.get("description", "")) + (" (" + ", ".join(extra) + ")" if extra else "")
                    lines += [f"   * - ``{p['name']}``", f"     - {p['in']}" + (", required" if p.get("required") else ""),
                              f"     - {kind}", f"     - {description or '-'}"]
                lines.append("")
            body = operation.get("requestBody")
            if body:
                for content_type, content in body.get("content", {}).items():
                    lines += [f"Request body ({content_type}): {_schema_type(content.get('schema', {}))}.", ""]
            lines += ["Responses:", ""]
            for status, response in operation.get("responses", {}).items():
                response = _resolve(document, response)
                shown = [_schema_type(c.get("schema", {})) for c in response.get("content", {}).values()]
                lines.append(f"- **{status}**: {text(response.get('description', ''))}"
                             + (f" ({', '.join(shown)})" if shown else ""))
            lines.append("")
    lines += ["Schemas", "-------", ""]
    for name, schema in document["components"]["schemas"].items():
        lines += [f".. _openapi-schema-{name.lower()}:", "", name, "~" * len(name), ""]
        if schema.get("description"):
            lines += [text(schema["description"]), ""]
        properties = schema.get("properties", {})
        if not properties:
            lines += [f"Type: {_schema_type(schema)}.", ""]
            continue
        required = set(schema.get("required", []))
        lines += [".. list-table::", "   :header-rows: 1", "", "   * - property", "     - type", "     - meaning"]
        for prop, value in properties.items():
            lines += [f"   * - ``{prop}``" + (" (required)" if prop in required else ""),
                      f"     - {_schema_type(value)}", f"     - {text(value.get('description', '')) or '-'}"]
        lines.append("")
    return lines


# --- directives ------------------------------------------------------------------------------


class _Generated(SphinxDirective):
    """Parses the reStructuredText a function makes, in place of the directive."""

    has_content = False

    def markup(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        node = nodes.section() if self.with_titles else nodes.container()
        source = f"<generated by {self.name}>"
        nested_parse_with_titles(self.state, StringList(self.markup(), source=source), node)
        return node.children

    with_titles = False


class SettingsDirective(_Generated):
    def markup(self) -> list[str]:
        return settings_markup()


class BridgeSettingsDirective(_Generated):
    def markup(self) -> list[str]:
        return bridge_markup()


class OptionsDirective(_Generated):
    def markup(self) -> list[str]:
        return options_markup()


class OpenAPIDirective(_Generated):
    with_titles = True

    def markup(self) -> list[str]:
        return openapi_markup()


class OptionalAutomoduleDirective(_Generated):
    """``automodule`` with ``:members:``, or a note when the module is not in this version."""

    required_arguments = 1
    option_spec = {"note": directives.unchanged}

    def markup(self) -> list[str]:
        module = self.arguments[0]
        if importlib.util.find_spec(module) is None:
            return [text(self.options.get("note") or f"This version has no module {module}.")]
        importlib.import_module(module)
        return [f".. automodule:: {module}", "   :members:", ""]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("mqttbroker-settings", SettingsDirective)
    app.add_directive("mqttbroker-bridge-settings", BridgeSettingsDirective)
    app.add_directive("mqttbroker-options", OptionsDirective)
    app.add_directive("mqttbroker-openapi", OpenAPIDirective)
    app.add_directive("mqttbroker-automodule", OptionalAutomoduleDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
