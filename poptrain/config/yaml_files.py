"""Reading a config file: size, depth and value-count limits checked before PyYAML builds anything,
duplicate keys refused, every YAML error turned into a :class:`~poptrain.config.errors.ConfigError` naming the line."""

from __future__ import annotations

import os
from typing import Any

import yaml

from poptrain.config.errors import ConfigError

# Limits of a config file: far above any real config, far below what would hang or exhaust the driver.
MAX_CONFIG_BYTES = 256 * 1024  # pure-Python PyYAML reads ~0.1-0.3 MB/s
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than ``MAX_YAML_DEPTH`` (PyYAML itself would
    overflow Python's stack, or take seconds to scan deep flow collections). Duplicate keys and
    alias bombs are refused by :func:`load_yaml_text`, which looks at the composed document
    before it is constructed."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, token_class):
        # The scanner looks ahead over every open `[`/`{` at each token: refuse deep flow nesting here, early.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml_text(text: str, max_values: int = MAX_YAML_VALUES) -> Any:
    """Parse one YAML document safely; raises ``yaml.YAMLError`` or :class:`ConfigError`.

    Beyond ``yaml.safe_load`` it refuses a key given twice in one mapping (PyYAML silently
    keeps the last), aliases that refer to themselves or expand to more than ``MAX_YAML_VALUES``
    values (a "billion laughs" bomb), and nesting deeper than ``MAX_YAML_DEPTH``, all before
    anything is expanded.
    """
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems = _yaml_structure_problems(node, max_values)
        if problems:
            raise ConfigError(problems)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_structure_problems(root: yaml.Node, max_values: int = MAX_YAML_VALUES) -> list[tuple[str, str]]:
    """Duplicate keys of the composed document; raises :class:`ConfigError` at a recursive or
    too large expansion. Each node is visited once, so an alias bomb costs its text's size."""
    problems: list[tuple[str, str]] = []
    sizes: dict[int, int] = {}  # node -> its number of values once aliases are expanded
    open_nodes: set[int] = set()

    def dotted(path: list) -> str:
        return ".".join(str(part) for part in path) or "top level"

    def walk(node: yaml.Node, path: list, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError([(dotted(path), "refers to itself through a YAML alias: a recursive structure cannot be a config value")])
        if depth > MAX_YAML_DEPTH:
            raise ConfigError([(dotted(path), f"nested more than {MAX_YAML_DEPTH} levels deep through YAML aliases")])
        open_nodes.add(id(node))
        children: list[tuple[Any, yaml.Node]] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}  # (tag, key) -> line of its first occurrence
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    ident, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                    if ident in lines:
                        problems.append(
                            (dotted(path + [name]), f"is given twice (lines {lines[ident]} and {line}); YAML would silently keep only the last one")
                        )
                    lines.setdefault(ident, line)
                children += [(name, key_node), (name, value_node)]
        total = 1
        for part, child in children:
            total += walk(child, path + [part], depth + 1)
            if total > max_values:
                while path and isinstance(path[-1], int):  # name the key, not a list position inside it
                    path = path[:-1]
                raise ConfigError(
                    [(dotted(path), f"holds more than {max_values:,} values, counting each use of a YAML alias: far too many for a config (an alias bomb?)")]
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    walk(root, [], 0)
    return problems


def read_yaml(path: str | os.PathLike, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """The YAML mapping at ``path``; ``max_bytes`` bounds what is read (a config a user hands in
    is small; poptrain's own record of a run may be larger)."""
    source = str(path)
    if not os.path.exists(source):
        raise ConfigError([("", f"file not found: {source}")], source)
    if os.path.isdir(source):
        raise ConfigError([("", f"{source} is a directory, not a YAML file")], source)
    try:
        with open(source, "rb") as stream:
            data = stream.read(max_bytes + 1)  # bounded: the path may be a device or a pipe
    except OSError as exc:
        raise ConfigError([("", f"cannot read the file: {exc.strerror or exc}")], source) from None
    if len(data) > max_bytes:
        raise ConfigError([("top level", f"the file is larger than {max_bytes // 1024} KiB: this is not a config")], source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([(f"line {line}", f"not valid UTF-8 (byte 0x{data[exc.start]:02x}): save the file as UTF-8")], source) from None
    try:
        raw = load_yaml_text(text, max(MAX_YAML_VALUES, MAX_YAML_VALUES * max_bytes // MAX_CONFIG_BYTES))
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc, text)], source) from None
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None
    if raw is None:
        raise ConfigError([("top level", "the file is empty: a config is a mapping of keys (name, steps, members, ...)")], source)
    if not isinstance(raw, dict):
        kinds: dict[type, str] = {list: "a list", str: "a string"}
        found = kinds.get(type(raw), f"a {type(raw).__name__}")
        raise ConfigError([("top level", f"must be a mapping of keys (name, steps, members, ...), not {found}")], source)
    return raw


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, str]:
    """(where, reason) of a YAML syntax error: its line and column, and what the parser expected."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: it has a position, not a mark
        line = text.count("\n", 0, exc.position) + 1
        return f"line {line}", f"not valid YAML: character #x{exc.character:04x} is not allowed in a YAML file"
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "top level"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "'\\t'" in problem:
        problem += " (YAML does not allow tabs for indentation: use spaces)"
    return where, f"not valid YAML: {problem}"
