"""Read YAML safely, keeping the line of every key so errors can point at it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from unetlab.errors import ConfigError

__all__ = ["KeyPath", "SafeLoader", "DocumentTooComplex", "MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "load_yaml_text",
           "load_yaml_file", "format_path", "parse_scalar"]


MAX_BYTES = 1 << 20      # 1 MiB: experiment files are a few KB; anything near this is a mistake or an attack
MAX_DEPTH = 32           # mappings and lists inside each other; real files use fewer than 8
MAX_VALUES = 20_000      # values, aliases expanded: a "billion laughs" document stops here (real files: < 500)

try:  # libyaml scans in C: PyYAML's pure-Python scanner takes seconds on a 100 KB flow collection
    from yaml._yaml import CParser
    _PARSER: tuple[Any, ...] = (CParser,)  # parser classes chosen at import time
except ImportError:  # PyYAML built without libyaml
    _PARSER = (yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser)


class DocumentTooComplex(yaml.MarkedYAMLError):
    """A document nested deeper than ``MAX_DEPTH`` or holding more than ``MAX_VALUES`` values.

    Raised while composing, so neither Python's recursion limit nor the time to build a huge
    document is ever reached.
    """


# mypy cannot follow a starred base list (the parser classes are chosen at import time, above)
class SafeLoader(yaml.composer.Composer, *_PARSER,  # type: ignore[misc]
                 yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """A safe loader (PyYAML's safe constructor and resolver, libyaml's parser when available) that
    reads floats written without a dot (``1e-3``, a string in YAML 1.1) and bounds nesting depth and
    size while composing (PyYAML composes recursively: 5,000 levels were a RecursionError)."""

    def __init__(self, stream: Any) -> None:
        if len(_PARSER) == 1:
            _PARSER[0].__init__(self, stream)
        else:
            reader, scanner, parser = _PARSER
            reader.__init__(self, stream)
            scanner.__init__(self)
            parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose one node, refusing documents nested deeper than ``MAX_DEPTH`` or over ``MAX_VALUES`` nodes."""
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise DocumentTooComplex(problem=f"nested deeper than {MAX_DEPTH} levels "
                                                 "(mappings and lists inside each other)",
                                         problem_mark=self.peek_event().start_mark)
            if self._nodes > MAX_VALUES:
                raise DocumentTooComplex(problem=f"more than {MAX_VALUES:,} values; experiment files are small",
                                         problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_scalar(text: str, source: str = "--set") -> Any:
    """Parse a ``--set`` value: a YAML scalar or flow collection, with the same rules as a file.

    Errors are ``ConfigError``s prefixed with ``source`` (``--set train.lr``): bad syntax, a tag
    outside plain data, nesting deeper than ``MAX_DEPTH``, more than ``MAX_VALUES`` values.
    """
    data, _ = _parse(text, source, with_lines=False)
    return data


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

    An empty document (nothing but comments) gives ``None``. Rejects, as one-line ``ConfigError``s
    naming file and line: syntax errors, duplicate keys, non-string keys, any tag outside YAML's
    standard data types (``!!python/object`` included), text over ``MAX_BYTES``, nesting deeper
    than ``MAX_DEPTH`` and documents whose aliases expand to more than ``MAX_VALUES`` values.
    """
    return _parse(text, filename, with_lines=True)


def load_yaml_file(path: str | Path) -> tuple[Any, dict[KeyPath, int]]:
    """Read and parse a YAML file (see ``load_yaml_text``); a missing or oversized file is a ``ConfigError``."""
    p = Path(path)
    try:
        with p.open("rb") as stream:  # a bounded read: /dev/zero or a FIFO must not hang us
            raw = stream.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            size = p.stat().st_size
            shown = f"the file is {size:,} bytes" if size > MAX_BYTES else "the file is larger than that"
            raise ConfigError(f"{path}: {shown}; an experiment file may be at most {MAX_BYTES:,} bytes (1 MiB)")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return load_yaml_text(text, str(path))


def _parse(text: str, source: str, with_lines: bool) -> tuple[Any, dict[KeyPath, int]]:
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: the text is {len(text):,} characters; at most {MAX_BYTES:,} (1 MiB)")
    loader = None
    try:
        loader = SafeLoader(text)  # the reader checks for control characters here already
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark and with_lines else ""
        problem = f"invalid YAML: {exc.problem or exc.context}"
        if isinstance(exc, DocumentTooComplex):
            problem = str(exc.problem)
        elif "maximum nesting depth" in problem:  # libyaml's own limit (1,000 levels) met before ours
            problem = f"nested deeper than {MAX_DEPTH} levels (mappings and lists inside each other)"
        raise ConfigError(f"{source}{line}: {problem}") from None
    except yaml.YAMLError as exc:  # reader errors (control characters) carry no problem_mark
        raise ConfigError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return None, {}
    builder = _Builder(source, with_lines, loader)
    return builder.build(node, ()), builder.lines


class _Builder:
    """Turns composed nodes into Python data, recording each key's line and bounding alias expansion.

    PyYAML shares an aliased node; building it again at every use is what makes a "billion laughs"
    document explode, so every built value counts against ``MAX_VALUES`` (and depth against
    ``MAX_DEPTH``, which also stops an anchor that contains its own alias).
    """

    def __init__(self, source: str, with_lines: bool, loader: SafeLoader) -> None:
        self.source, self.with_lines, self.loader = source, with_lines, loader
        self.lines: dict[KeyPath, int] = {}
        self.count = 0

    def at(self, line: int) -> str:
        return f"{self.source}:{line}" if self.with_lines else self.source

    def where(self, node: yaml.Node, path: KeyPath) -> str:
        """``file.yaml:12: train.epochs`` (just ``--set KEY`` for a --set value, whose key is the source)."""
        if not self.with_lines:
            return self.source
        return f"{self.at(node.start_mark.line + 1)}: {format_path(path) or '(top level)'}"

    def build(self, node: yaml.Node, path: KeyPath, depth: int = 1) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise ConfigError(f"{self.where(node, path)}: the document expands to more than {MAX_VALUES:,} "
                              "values (YAML aliases repeating large blocks?); experiment files are small")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{self.where(node, path)}: nested deeper than {MAX_DEPTH} levels "
                              "(through YAML aliases)")
        if node.tag not in _SAFE_TAGS:
            shown = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(f"{self.where(node, path)}: YAML tag '{shown}' is not allowed; experiment files "
                              "hold plain data (mappings, lists, strings, numbers, booleans, null)")
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self._record(path + (i,), item.start_mark.line + 1)
                items.append(self.build(item, path + (i,), depth + 1))
            return items
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int over Python's 4300-digit limit, a bad date
            text = str(exc).splitlines()[0].split(";")[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{self.where(node, path)}: {text}") from None

    def _mapping(self, node: yaml.MappingNode, path: KeyPath, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        top = format_path(path) or "(top level)"
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError(f"{self.at(key_line)}: {top}: YAML merge keys (<<) are not supported; "
                                  "use variants to share settings")
            key = self.build(key_node, path, depth + 1) if isinstance(key_node, yaml.ScalarNode) else key_node
            if not isinstance(key, str):
                shown = repr(key) if isinstance(key_node, yaml.ScalarNode) else "(a mapping or list)"
                raise ConfigError(f"{self.at(key_line)}: {top}: key {shown} must be a string (quote it)")
            if key in result:
                raise ConfigError(f"{self.at(key_line)}: {format_path(path + (key,))}: duplicate key "
                                  f"(first at line {first_line[key]})")
            first_line[key] = key_line
            self._record(path + (key,), key_line)
            result[key] = self.build(value_node, path + (key,), depth + 1)
        return result

    def _record(self, path: KeyPath, line: int) -> None:
        if self.with_lines:
            self.lines[path] = line
