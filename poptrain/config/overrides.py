"""``KEY=VALUE`` overrides: dotted keys, list indices or member names (``members.0.optimizer.lr=0.01``,
``members.m1.optimizer.lr=0.01``), applied to the raw YAML before validation, so an override is
checked exactly like the file."""

from __future__ import annotations

from typing import Any

import yaml

from poptrain.config.errors import ConfigError
from poptrain.config.yaml_files import load_yaml_text


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([(text, "an override must look like KEY=VALUE, e.g. members.0.optimizer.lr=0.01")])
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([(text, "an override needs a dotted key before `=`")])
    try:
        value = load_yaml_text(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as exc:
        raise ConfigError([(key, f"override {text!r}: {reason}") for _, reason in exc.problems]) from None
    return key.split("."), value


def apply_override(raw: dict, text: str) -> None:
    """Set one dotted key in the raw config; list items are addressed by index or by `name`. Under
    a member's ``vary`` the rest of the key is one varied key (``members.m.vary.optimizer.lr=[...]``)."""
    path, value = parse_override(text)
    if len(path) > 4 and path[0] == "members" and path[2] == "vary":
        path = [*path[:3], ".".join(path[3:])]
    node: Any = raw
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part)
            if index is None:
                raise ConfigError([(where, f"override {text!r}: no list item {part!r} (use an index or a member name)")])
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError([(where, f"override {text!r}: {'.'.join(path[:depth])} is not a mapping or list")])


def _list_index(items: list, part: str) -> int | None:
    if part.lstrip("-").isdigit():
        index = int(part)
        return index if -len(items) <= index < len(items) else None
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    return None
