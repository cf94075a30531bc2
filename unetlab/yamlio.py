"""Read YAML safely, keeping the line of every key so errors can point at it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["KeyPath", "SafeLoader", "load_yaml_text", "load_yaml_file", "format_path", "parse_scalar"]


class SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus floats written without a dot (``1e-3``), which YAML 1.1 reads as strings."""


SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_scalar(text: str):
    """Parse a ``--set`` value: a YAML scalar or flow collection, read with ``SafeLoader``."""
    return yaml.load(text, Loader=SafeLoader)

KeyPath = tuple  # ("model", "encoder", "depth") or ("matrix", "model.fusion", 1)

_SAFE_TAGS = {
    "tag:yaml.org,2002:" + t
    for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")
}


def format_path(path: KeyPath) -> str:
    """``("matrix", "model.fusion", 1)`` -> ``matrix.model.fusion[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_yaml_text(text: str, filename: str) -> tuple[Any, dict[KeyPath, int]]:
    """Parse ``text`` with PyYAML's safe loader; return the data and a map key path -> 1-based line.

    Rejects, as one-line ``ConfigError``s naming file and line: syntax errors, duplicate keys,
    non-string keys and any tag outside YAML's standard data types (``!!python/object`` included).
    """
    loader = SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{filename}{line}: invalid YAML: {exc.problem or exc.context}") from None
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {}
    if node is None:
        return {}, lines
    return _build(node, (), filename, lines, loader), lines


def load_yaml_file(path: str | Path) -> tuple[Any, dict[KeyPath, int]]:
    """Read and parse a YAML file (see ``load_yaml_text``); a missing file is a ``ConfigError``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return load_yaml_text(text, str(path))


def _build(node: yaml.Node, path: KeyPath, filename: str, lines: dict[KeyPath, int],
           loader: SafeLoader) -> Any:
    where = f"{filename}:{node.start_mark.line + 1}"
    if node.tag not in _SAFE_TAGS:
        shown = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise ConfigError(f"{where}: {format_path(path) or '(top level)'}: YAML tag '{shown}' is not allowed; "
                          "experiment files hold plain data (mappings, lists, strings, numbers, booleans, null)")
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError(f"{where}: {format_path(path) or '(top level)'}: YAML merge keys (<<) "
                                  "are not supported; use variants to share settings")
            key = _build(key_node, path, filename, {}, loader)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ConfigError(f"{filename}:{key_line}: {format_path(path) or '(top level)'}: "
                                  f"key {key!r} must be a string (quote it)")
            if key in result:
                raise ConfigError(f"{filename}:{key_line}: {format_path(path + (key,))}: duplicate key "
                                  f"(first at line {lines[path + (key,)]})")
            lines[path + (key,)] = key_line
            result[key] = _build(value_node, path + (key,), filename, lines, loader)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            items.append(_build(item, path + (i,), filename, lines, loader))
        return items
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: {format_path(path)}: {exc}") from None
