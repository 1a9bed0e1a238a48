"""From a file (or a dict, or Python objects) to a validated :class:`~poptrain.config.schema.RunConfig`:
the schema, each coupling's own fields, every cross-reference between names, and the objects a
recorded config names (functions, classes, datasets given from Python)."""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

import poptrain.config.objects as objects
import poptrain.config.variation as variation
from poptrain.config.errors import ConfigError, Reason, _validation_problems
from poptrain.config.overrides import _list_index, apply_override
from poptrain.config.records import MAX_RECORD_BYTES, _RecordDumper
from poptrain.config.registry import resolve_coupling
from poptrain.config.schema import IMPORT_PATTERN, CodeRef, CouplingConfig, MemberConfig, RunConfig, host_gpu_problem
from poptrain.config.yaml_files import MAX_CONFIG_BYTES, read_yaml


def load_config(
    config: str | os.PathLike | dict | RunConfig,
    overrides: list[str] | tuple[str, ...] = (),
    record: bool = False,
    given: Sequence[Any] = (),
) -> RunConfig:
    """Read, override and validate a run config; raises :class:`ConfigError` on any problem.

    An override may address a member an entry's ``copies``/``vary`` makes (``members.m007.optimizer.lr=0.1``):
    it applies to that member alone, after the entry is expanded. ``record``: ``config`` is
    poptrain's own saved record of a run (``<run dir>/config.yaml``), read without the size bound
    of a config a user hands in. ``given``: Python objects that take the place of the recorded
    objects of the same qualified name, which must have the recorded digest (resuming a run
    started with objects from Python, see :class:`CodeRef`).
    """
    if isinstance(config, RunConfig):
        raw, source = dump_given(config), None
    elif isinstance(config, dict):
        raw, source = variation.copy_tree(config), None
    else:
        source = str(config)
        raw = read_yaml(source, MAX_RECORD_BYTES if record else MAX_CONFIG_BYTES)
    try:
        if given:
            _put_given(raw, given)
        per_member = []
        for text in overrides:
            if _names_a_made_member(raw, text):
                per_member.append(text)
            else:
                apply_override(raw, text)
        cfg = validate_config(raw, per_member)
        if isinstance(config, RunConfig) and not cfg._entries_compact() and config._entries:
            cfg._entries = config._entries  # the entries it was written as (dump_config checks they still hold)
        return cfg
    except ConfigError as exc:
        exc.source = exc.source or source
        raise ConfigError(exc.problems, exc.source) from None


def _names_a_made_member(raw: dict, text: str) -> bool:
    """Whether override ``text`` addresses by name a member that is not written out but made by an
    entry's ``copies`` or ``vary`` (it applies once the entries are expanded)."""
    path = text.split("=", 1)[0].split(".")
    members = raw.get("members")
    if len(path) < 3 or path[0] != "members" or not isinstance(members, list) or _list_index(members, path[1]) is not None:
        return False
    return any(isinstance(m, dict) and isinstance(m.get("name"), str) and path[1].startswith(m["name"]) and (m.get("copies") or m.get("vary")) for m in members)


def _put_given(raw: Any, given: Sequence[Any]) -> None:
    """Put each object of ``given`` in the place of the recorded objects of its qualified name (their
    digests are compared when the config is validated); raises :class:`ConfigError` for an object that
    the record does not name."""
    by_name: dict[str, list[Any]] = {}
    for obj in given:
        by_name.setdefault(objects.qualified_name(obj), []).append(obj)
    recorded = list(_recorded_objects(raw))
    used: set[int] = set()
    for node, field in recorded:
        candidates = by_name.get(node[field], [])
        # Several objects of one name (two lambdas): the one of the recorded digest, else the first (then named as different).
        chosen = next((o for o in candidates if objects.digest(o) == node["digest"]), candidates[0] if candidates else None)
        if chosen is not None:
            node[field] = chosen
            used.add(id(chosen))
    unused = [objects.qualified_name(o) for o in given if id(o) not in used]
    if unused:
        names = sorted({node[field] if isinstance(node[field], str) else objects.qualified_name(node[field]) for node, field in recorded})
        raise ConfigError(
            [
                (
                    "",
                    f"objects {unused} given to resume are not among those the run was started with "
                    f"({names or 'it was started with none'}): pass the objects of those names",
                )
            ]
        )


def _recorded_objects(node: Any) -> Iterator[tuple[dict, str]]:
    """Each mapping of a raw config that records an object (it has a ``digest``), with the key naming it."""
    if isinstance(node, dict):
        if isinstance(node.get("digest"), str):
            yield node, "type" if "type" in node else "name"
        for key, value in node.items():
            if key != "kwargs":  # the user's own arguments
                yield from _recorded_objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _recorded_objects(value)


def code_refs(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, CodeRef]]:
    """Every :class:`CodeRef` of a validated config (models, data, losses, terms, metrics, optimizers,
    couplings), with its path (field names and list indices)."""
    if isinstance(node, CodeRef):
        yield path, node
    if isinstance(node, BaseModel):
        for name in _code_fields(type(node)):  # not every field: a thousand members' numbers are many
            yield from code_refs(getattr(node, name), (*path, name))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from code_refs(value, (*path, index))
    elif isinstance(node, dict):
        for name, value in node.items():
            if isinstance(value, (BaseModel, list, dict)):
                yield from code_refs(value, (*path, name))


_CODE_FIELDS: dict[type, tuple[str, ...]] = {}


def _code_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``model`` whose type can hold a :class:`CodeRef`."""
    if model not in _CODE_FIELDS:
        _CODE_FIELDS[model] = ()  # while it is being worked out (a model that holds itself)
        _CODE_FIELDS[model] = tuple(name for name, info in model.model_fields.items() if _holds_code(info.annotation))
    return _CODE_FIELDS[model]


def _holds_code(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return issubclass(annotation, CodeRef) or bool(_code_fields(annotation))
    return any(_holds_code(arg) for arg in typing.get_args(annotation))


def dump_given(cfg: RunConfig) -> dict[str, Any]:
    """``cfg.model_dump(mode="json")`` with each object given from Python in the place of its name:
    raw config data that validates to the same config, objects included."""
    raw = cfg.model_dump(mode="json")
    for path, ref in code_refs(cfg):
        if ref.given is not None:
            variation.get_dotted(raw, [str(p) for p in path])[ref.NAME_FIELD] = ref.given
    return raw


def _recorded_object_problem(name: str, recorded: str, find: Callable[[], Any]) -> tuple[str | None, Any]:
    """(why the recorded object ``name`` of digest ``recorded`` is not here, the object found): the
    object is imported by its name and must have the recorded digest."""
    if recorded.startswith("pickle:"):
        return (
            f"the run was started with an instance of `{name}` given from Python (a dataset, ...), which no import finds again: "
            "only the same object, given again, can take its place"
        ), None
    try:
        found = find()
    except Exception as exc:  # noqa: BLE001 - whatever importing it raises, it is not here
        where = ", defined in a notebook or a script's `__main__`" if name.startswith("__main__:") else ", defined inside a function" if "<" in name else ""
        return f"the run was started with the Python object `{name}`{where}, which cannot be imported here ({exc})", None
    found_digest = objects.digest(found)
    if found_digest != recorded:
        return (
            f"`{name}` imports, but it is not the object the run was started with: its digest is {found_digest}, the record's {recorded} (its code changed)"
        ), None
    return None, found


def _find_recorded_components(cfg: RunConfig, entries: list[variation.Entry], problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each component that records an object given from Python (a digest) but holds none: the object
    imported by its name, of the recorded digest, is held (it travels to the workers as the object:
    their ``__main__`` is not this one). Those not found are added to ``problems`` and returned
    (name, digest)."""
    missing: list[tuple[str, str]] = []
    reported: set[tuple[str, str]] = set()
    for path, ref in code_refs(cfg):
        key, name = ".".join(map(str, path)), getattr(ref, ref.NAME_FIELD)
        if ref.digest is None or ref.given is not None or ":" not in name or isinstance(ref, CouplingConfig) or (name, ref.digest) in reported:
            continue
        reported.add((name, ref.digest))
        from poptrain.builtins import import_path  # only for a record of objects: it imports torch

        reason, found = _recorded_object_problem(name, ref.digest, partial(import_path, name))
        if reason:
            if any(e.compactable for e in entries):  # positions in the expanded list mean nothing to the user: name the member
                key = _named_member(key, {str(i): m.name for i, m in enumerate(cfg.members)})
            problems.append((f"{key}.{ref.NAME_FIELD}", reason))
            missing.append((name, ref.digest))
        else:
            for _, same in code_refs(cfg):
                if getattr(same, same.NAME_FIELD) == name and same.digest == ref.digest:
                    same.hold(found)
    return missing


def _cannot_continue(missing: list[tuple[str, str]]) -> tuple[str, str]:
    """The problem that sums up recorded objects (name, digest) that are not here."""
    code = dict.fromkeys(name.rsplit(":", 1)[-1].rsplit(".", 1)[-1] for name, digest in missing if not digest.startswith("pickle:"))
    instances = dict.fromkeys(name.rsplit(":", 1)[-1] for name, digest in missing if digest.startswith("pickle:"))
    also = f", with the same {' and '.join(instances)} it was given in the list" if instances else ""
    return (
        "",
        f"this run cannot continue with what is here: it was started from Python with objects that are not importable by "
        f"their recorded names, or not the same. Continue it from Python, passing the same objects: "
        f"`poptrain.resume(<its folder>, objects=[{', '.join(code)}])`{also}",
    )


def validate_config(raw: dict, member_overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate the schema, each coupling's own fields, and every cross-reference between names.
    ``member_overrides`` apply to members made by ``copies``/``vary``, once they are made."""
    raw = dict(raw)
    members, entries, problems = variation.expand(raw.get("members"), raw.get("seed", 0), MemberConfig)
    if "members" in raw:  # a missing key stays missing, for the schema to name
        raw["members"] = members
    if problems:
        raise ConfigError(problems)
    for text in member_overrides:
        apply_override(raw, text)
    problems = []
    # Couplings recording a class given from Python that is not here (said after the members' objects).
    recorded_problems: list[tuple[str, Any]] = []
    recorded_missing: list[tuple[str, str]] = []
    if "couplings" in raw and raw["couplings"] is None:  # `couplings:` left empty in YAML: none
        raw["couplings"] = []
    if not isinstance(raw.get("couplings", []), list):
        problems.append(("couplings", "must be a list of mappings, each with a `type`"))
        del raw["couplings"]
    if isinstance(raw.get("couplings"), list):
        raw["couplings"] = [_recorded_coupling(item, f"couplings.{i}", recorded_problems, recorded_missing) for i, item in enumerate(raw["couplings"])]
    not_here = {key.removesuffix(".type") for key, _ in recorded_problems}  # couplings whose recorded class is not here: said once
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        found = _validation_problems(exc)
        if any(e.compactable for e in entries):  # positions in the expanded list mean nothing to the user: name the member
            made = {str(i): m["name"] for i, m in enumerate(raw["members"]) if isinstance(m, dict) and isinstance(m.get("name"), str)}
            found = [(_named_member(key, made), reason) for key, reason in found]
        found = [(key, reason) for key, reason in found if not any(key == k or key.startswith(k + ".") for k in not_here)]
        if found or not not_here:
            raise ConfigError(problems + recorded_problems + found) from None
        # Only couplings whose recorded class is not here failed: the rest is checked without them,
        # so every object the run cannot continue without is named at once.
        cfg = RunConfig.model_validate({**raw, "couplings": []})

    # Recorded objects (name, digest) that are not here: the run cannot continue.
    missing = _find_recorded_components(cfg, entries, problems) + recorded_missing
    problems += recorded_problems
    names = cfg.member_names
    seen: dict[str, str] = {}
    for index, name in enumerate(names):
        if name in seen.values():
            problems.append((f"members.{index}.name", f"duplicate member name {name!r}"))
        elif name.lower() in seen:
            problems.append(
                (
                    f"members.{index}.name",
                    f"member names {seen[name.lower()]!r} and {name!r} differ only in case: "
                    "their outputs (`members/<name>/`) would share a folder on case-insensitive file systems",
                )
            )
        seen.setdefault(name.lower(), name)
    if not names:
        problems.append(("members", "the population is empty: list at least one member"))
    if cfg.checkpoint.every and cfg.checkpoint.every % cfg.exchange.every:
        problems.append(
            ("checkpoint.every", f"must be a multiple of exchange.every ({cfg.exchange.every}), so checkpoints fall on exchanges; got {cfg.checkpoint.every}")
        )

    labels: set[str] = set()
    for index, specific in enumerate(cfg.couplings):
        key = f"couplings.{index}"
        if key in not_here:
            continue
        cls = resolve_coupling(specific.given_or_name)
        if specific.members == []:
            problems.append((f"{key}.members", "is empty: list the members it reads, or leave `members` out for every member"))
        for field in ("members", "trains"):
            listed = getattr(specific, field) or []
            for position, name in enumerate(listed):
                if name not in names:
                    problems.append((f"{key}.{field}", f"unknown member {name!r}; members are {names}"))
                elif name in listed[:position]:
                    problems.append((f"{key}.{field}", f"member {name!r} is listed twice"))
        if specific.trains and specific.members:
            for name in specific.trains:
                if name not in specific.members and name in names:
                    problems.append((f"{key}.trains", f"member {name!r} is trained but not read by this coupling (add it to `members`)"))
        if specific.label in labels:
            problems.append((f"{key}.name", f"duplicate coupling name {specific.label!r}: give each coupling a distinct `name`"))
        labels.add(specific.label)
        if cfg.exchange.mode == "async" and cls.rewrites_values:
            problems.append(
                (
                    f"{key}.type",
                    f"{specific.type!r} replaces members' values at exchanges, which needs every member at the same exchange: use `exchange.mode: sync`",
                )
            )
        if cfg.failure.nonfinite == "rollback" and not cls.allows_rollback:
            problems.append(
                (
                    f"{key}.type",
                    f"{specific.type!r} keeps members' parameters identical, which restoring one "
                    "member from its checkpoint would break: use `failure.nonfinite: skip` or `fail`",
                )
            )
        try:
            problems.extend((f"{key}.{k}" if k else key, msg) for k, msg in cls.check_config(specific, cfg))
        except Exception as exc:  # a user coupling's own check failing: nothing starts, and its traceback is shown
            problems.append(
                (key, Reason.of(f"{cls.__name__}.check_config raised {type(exc).__name__}: {exc} (a bug in the coupling's code; its traceback follows)", exc))
            )
    per = cfg.placement.members_per_host
    if per != "auto":  # hosts known from the config alone; with `auto` shares, the driver checks them (host_resources)
        for start in range(0, len(cfg.members), per):
            host = cfg.members[start : start + per]
            if all(m.resources.num_gpus != "auto" for m in host):
                reason = host_gpu_problem([float(m.resources.num_gpus) for m in host])
                if reason:
                    problems.append(
                        (
                            "placement.members_per_host",
                            f"the host of members {', '.join(m.name for m in host[:4])}{' ...' if len(host) > 4 else ''} cannot be placed: {reason}",
                        )
                    )
                    break  # one host says it; the others are cut alike
    for index, member in enumerate(cfg.members):
        term_names = [t.name for t in member.terms]
        for t_index, term in enumerate(member.terms):
            if term.name in ("loss", "objective") or term_names.count(term.name) > 1:
                problems.append((f"members.{index}.terms.{t_index}.name", f"term name {term.name!r} is reserved or duplicated"))
    if missing:
        problems.append(_cannot_continue(missing))
    if problems:
        raise ConfigError(problems)
    cfg._entries = entries
    return cfg


def _recorded_coupling(item: Any, key: str, problems: list[tuple[str, Any]], missing: list[tuple[str, str]]) -> Any:
    """A coupling entry that records a class given from Python (a digest): the class imported by its
    name, of that digest, in its place; else the entry as it is, with its problem noted."""
    if not (isinstance(item, dict) and isinstance(item.get("type"), str) and isinstance(item.get("digest"), str) and IMPORT_PATTERN.match(item["type"])):
        return item
    reason, found = _recorded_object_problem(item["type"], item["digest"], partial(resolve_coupling, item["type"]))
    if reason:
        problems.append((f"{key}.type", reason))
        missing.append((item["type"], item["digest"]))
        return item
    return {**item, "type": found}


def _named_member(key: str, names: dict[str, str]) -> str:
    parts = key.split(".")
    if len(parts) > 1 and parts[0] == "members" and parts[1] in names:
        parts[1] = names[parts[1]]
    return ".".join(parts)


_RecordDumper.add_representer(list, _RecordDumper.represent_list)
