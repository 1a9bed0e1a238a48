"""Members that differ in a few values: a member entry's ``copies`` and ``vary`` (see
:class:`Vary`), expanded into the members they stand for, and folded back into the compact record
a run saves.

An entry ``{name: m, copies: k, vary: {key: ...}}`` stands for members ``m0`` ... ``m<k-1>``
(zero-padded: ``m000`` ... ``m999`` for a thousand), alike but for the varied keys:

* a plain list gives member ``j`` its ``j``-th value (lists are zipped: all have the entry's
  length, which is ``copies``, or sets it when ``copies`` is left out);
* ``{grid: [...]}`` keys multiply: the entry has ``copies`` times the product of their lengths
  members, sample-major as Ray Tune orders ``grid_search`` times ``num_samples``;
* ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (``hi``
  excluded, as in Tune and NumPy) and ``{choice: [...]}`` draw one value per member from a
  stream of its own, seeded by the run's seed, the entry's name, the key and the member's index:
  ``poptrain check``, the run and its resume see the same values, and adding a key or a member
  changes no other member's draws.

Expansion works on the raw config (before the schema), so each resulting member is validated
like any written-out member: a varied value outside its field's domain is refused naming the
member. :func:`compact` folds the resolved members back into entries whose ``vary`` lists what
each member got (drawn values are part of the record), so the record grows with what the user
wrote, not with the number of members.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from poptrain.config.objects import is_given

MAX_MEMBERS_PER_ENTRY = 100_000
NOT_VARIED = ("name", "copies", "vary")  # what makes an entry an entry


class Draw(BaseModel):
    """How a varied key takes its values across an entry's members: exactly one of these."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    grid: list[Any] | None = Field(
        None,
        min_length=1,
        description=(
            "Every one of these values, for every combination of the entry's other `grid` "
            "keys: the entry has `copies` times the product of their lengths members."
        ),
    )
    choice: list[Any] | None = Field(None, min_length=1, description="One of these per member, drawn at random.")
    uniform: tuple[float, float] | None = Field(None, description="Drawn uniformly from [low, high].")
    loguniform: tuple[float, float] | None = Field(None, description="Drawn log-uniformly from [low, high], 0 < low.")
    randint: tuple[int, int] | None = Field(None, description="A whole number drawn uniformly from low to high, high excluded (as Ray Tune's `randint`).")

    @model_validator(mode="after")
    def _exactly_one(self) -> Draw:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(type(self).model_fields)}, or a plain list of values (got {given or 'none'})")
        kind = given[0]
        bounds = getattr(self, kind)
        if kind in ("uniform", "loguniform") and not bounds[0] <= bounds[1]:
            raise ValueError(f"`{kind}` must be [low, high] with low <= high, got {list(bounds)}")
        if kind == "loguniform" and bounds[0] <= 0:
            raise ValueError(f"`loguniform` needs 0 < low, got {list(bounds)}")
        if kind == "randint" and not bounds[0] < bounds[1]:
            raise ValueError(f"`randint` must be [low, high] with low < high (high is excluded), got {list(bounds)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    def draw(self, rng: random.Random) -> Any:
        low_high = getattr(self, self.kind)
        if self.kind == "choice":
            return rng.choice(low_high)
        if self.kind == "uniform":
            return rng.uniform(*low_high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(low_high[0]), math.log(low_high[1])))
        return rng.randrange(*low_high)  # randint


def _read_vary(raw: Any, where: str) -> tuple[dict[str, list | Draw], list[tuple[str, str]]]:
    """``vary`` as written: each key a non-empty list or one :class:`Draw`."""
    if raw is None:
        return {}, []
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        return {}, [(where, "must be a mapping of member keys (`optimizer.lr`, ...) to a list of values or a draw")]
    out: dict[str, list | Draw] = {}
    problems: list[tuple[str, str]] = []
    for key, how in raw.items():
        if isinstance(how, list) and how:
            out[key] = how
        elif isinstance(how, dict):
            try:
                out[key] = Draw.model_validate(how)
            except ValidationError as exc:
                problems += [(".".join([where, key, *map(str, e["loc"])]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        else:
            problems.append(
                (
                    f"{where}.{key}",
                    "is empty: give at least one value"
                    if how == []
                    else f"must be a list of values (one per member) or one of {{{', '.join(Draw.model_fields)}}}: [...], not {how!r}",
                )
            )
    return out, problems


@dataclass
class Entry:
    """One member entry as written, and the members it resolved to (in config order)."""

    name: str
    names: list[str]
    keys: list[str] = field(default_factory=list)  # the varied keys, as written

    @property
    def compactable(self) -> bool:
        return len(self.names) > 1 or bool(self.keys)


def member_names(name: str, count: int) -> list[str]:
    """``name`` plus a zero-padded index, or ``name`` itself for one member."""
    width = len(str(count - 1))
    return [f"{name}{i:0{width}d}" for i in range(count)] if count > 1 else [name]


def expand(members: Any, seed: Any, member_model: type[BaseModel]) -> tuple[Any, list[Entry], list[tuple[str, str]]]:
    """The members each entry stands for: (expanded member list, the entries, problems). Entries
    that are not mappings, or whose ``copies`` the schema will refuse, are left as written."""
    if not isinstance(members, list):
        return members, [], []
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    expanded, entries, problems = [], [], []
    for index, entry in enumerate(members):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            expanded.append(entry)
            continue
        copies = entry.get("copies")
        if copies is not None and (isinstance(copies, bool) or not isinstance(copies, int) or not 1 <= copies <= MAX_MEMBERS_PER_ENTRY):
            expanded.append(entry)  # the schema names the bad `copies`
            continue
        out, found = _expand_entry(entry, f"members.{index}", seed, member_model)
        problems += found
        if found:
            continue
        expanded += out
        entries.append(Entry(entry["name"], [m["name"] for m in out], list(entry.get("vary") or {})))
    return expanded, entries, problems


def _expand_entry(entry: dict, where: str, seed: int, member_model: type[BaseModel]) -> tuple[list[dict], list[tuple[str, str]]]:
    vary, problems = _read_vary(entry.get("vary"), f"{where}.vary")
    if problems:
        return [], problems
    problems = [(f"{where}.vary.{key}", reason) for key in vary if (reason := settable(member_model, key))]
    if problems:
        return [], problems
    grid = {k: v.grid for k, v in vary.items() if isinstance(v, Draw) and v.grid is not None}  # its kind: the one field given
    lists = {k: v for k, v in vary.items() if isinstance(v, list)}
    copies = entry.get("copies")
    points = list(itertools.product(*grid.values())) if grid else [()]
    if grid or not lists:
        count = (copies or 1) * len(points)
    else:
        count = copies if copies is not None else len(next(iter(lists.values())))
    if not grid and copies is None and len({len(v) for v in lists.values()}) > 1:
        lengths = ", ".join(f"{k}: {len(v)}" for k, v in lists.items())
        return [], [
            (
                f"{where}.vary",
                f"lists of unequal lengths ({lengths}): lists are zipped member by member, so give them equal "
                "lengths, or use `{grid: [...]}` for their product",
            )
        ]
    wrong = {k: len(v) for k, v in lists.items() if len(v) != count}
    if wrong:
        why = f"the entry has {count} members ({copies or 1} copies x {len(points)} grid points)" if grid else f"`copies` is {copies}"
        return [], [(f"{where}.vary.{k}", f"has {n} values, but {why}") for k, n in wrong.items()]
    if count > MAX_MEMBERS_PER_ENTRY:
        return [], [(f"{where}.vary", f"makes {count:,} members, more than {MAX_MEMBERS_PER_ENTRY:,}")]
    base = {k: v for k, v in entry.items() if k not in ("copies", "vary")}
    out = []
    for j, name in enumerate(member_names(entry["name"], count)):
        member = copy_tree(base)
        member["name"] = name
        point = dict(zip(grid, points[j % len(points)], strict=True))
        for key, how in vary.items():
            if key in grid:
                value = point[key]
            elif isinstance(how, list):
                value = how[j]
            else:
                value = how.draw(random.Random(f"poptrain-vary-{seed}-{entry['name']}-{key}-{j}"))
            set_dotted(member, key.split("."), copy_tree(value), member_model)
        out.append(member)
    return out, []


def settable(model: Any, key: str) -> str | None:
    """Why ``key`` (dotted) is not a key of a member that can be varied, or None."""
    parts = key.split(".")
    if parts[0] in NOT_VARIED:
        return f"`{parts[0]}` cannot be varied: it is what makes the entry"
    annotation: Any = model
    for depth, part in enumerate(parts):
        annotation = _unwrap(annotation)
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                known = ", ".join(annotation.model_fields)
                return f"unknown key {'.'.join(parts[: depth + 1])!r}: {'a member' if depth == 0 else '.'.join(parts[:depth])} has {known}"
            annotation = annotation.model_fields[part].annotation
        elif origin is dict or annotation is Any:
            return None  # free-form (kwargs): the consumer checks it
        elif origin is list and part.isdigit():
            annotation = typing.get_args(annotation)[0]
        else:
            return f"{'.'.join(parts[:depth])!r} has no key {part!r}"
    return None


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]``, ``Annotated[X, ...]``, ``SerializeAsAny[X]``: ``X``."""
    while True:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        origin = typing.get_origin(annotation)
        if (origin is Union or origin is types.UnionType) and len(args) == 1 or origin is Annotated:
            annotation = args[0]
        else:
            return annotation


def set_dotted(node: dict | list, parts: list[str], value: Any, model: Any = None) -> None:
    """Set ``node[parts[0]][parts[1]]...`` to ``value``, creating mappings on the way; a component
    written as a string (``model: mlp``) becomes ``{name: mlp}`` first."""
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        child = node.get(part)
        if isinstance(child, str) or is_given(child):  # `model: mlp` or, from Python, `model: <the class>`
            child = node[part] = {"name": child}
        elif not isinstance(child, (dict, list)):
            child = node[part] = {}
        node = child
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def copy_tree(node: Any) -> Any:
    """A copy of the mappings and lists of raw config data; every other value shared, not copied: a
    Python object given in place of a name (a dataset, a class) stays the very object, once for a
    thousand members."""
    if isinstance(node, dict):
        return {key: copy_tree(value) for key, value in node.items()}
    if isinstance(node, list):
        return [copy_tree(value) for value in node]
    return node


def get_dotted(node: Any, parts: list[str]) -> Any:
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def compact(dumped: list[dict], entries: list[Entry]) -> list[dict]:
    """Resolved members (``model_dump(mode="json")`` each, in config order) folded back into their
    entries: one entry with ``copies`` and ``vary`` (each varied key's value per member, drawn ones
    included) where its members differ only in the varied keys, else the members one by one (a
    command-line override set one member's own value)."""
    out: list[dict] = []
    position = 0
    for entry in entries:
        members = dumped[position : position + len(entry.names)]
        position += len(entry.names)
        if not entry.compactable:
            out += members
            continue
        record = copy.deepcopy(members[0])
        record.update(name=entry.name, copies=len(members), vary={k: [get_dotted(m, k.split(".")) for m in members] for k in entry.keys})
        if _expanded_alike(record, members):
            out.append(record)
        else:
            out += members
    return out + dumped[position:]


def _expanded_alike(record: dict, members: list[dict]) -> bool:
    base = {k: v for k, v in record.items() if k not in ("copies", "vary")}
    for j, (name, member) in enumerate(zip(member_names(record["name"], record["copies"]), members, strict=True)):
        again = {**copy.deepcopy(base), "name": name, "copies": 1, "vary": {}}
        for key, values in record["vary"].items():
            set_dotted(again, key.split("."), values[j])
        if again != member:
            return False
    return True
