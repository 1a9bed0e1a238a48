"""A run's config as recorded: the YAML kept beside its checkpoints (``dump_config``) and the
flattened params MLflow shows (``flatten``)."""

from __future__ import annotations

from typing import Any

import yaml

import poptrain.config.variation as variation
from poptrain.config.schema import RunConfig

# poptrain's own record of a run: compact, but members an override changed one by one are listed
# one by one.
MAX_RECORD_BYTES = 64 * 2**20


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every default filled in), with entries that make several
    members kept compact (``copies``, ``vary`` with each member's values): it loads back to the
    same members, and its size follows what the user wrote, not the number of members."""
    data = cfg.model_dump(mode="json")
    if cfg._entries and sum(len(e.names) for e in cfg._entries) == len(cfg.members):
        data["members"] = variation.compact(data["members"], cfg._entries)
    return yaml.dump(data, Dumper=_RecordDumper, sort_keys=False)


class _RecordDumper(yaml.SafeDumper):
    """Lists of plain values on one line (a thousand members' drawn values stay a readable block)."""

    def represent_list(self, data):
        flow = all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested config data into dotted keys (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list) and data and any(isinstance(v, (dict, list)) for v in data):
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}.{index}"))
    else:
        out[prefix] = str(data)
    return out
