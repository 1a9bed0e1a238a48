"""Couplings by name: the table a config's ``couplings[].type`` is looked up in.

The config schema (:mod:`poptrain.config`) and the couplings (:mod:`poptrain.couplings`) both see
this module and neither imports the other: couplings register their classes here, the schema
resolves names here. The built-in couplings are listed by import path and imported on first use,
as a user's coupling named by import path is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

BUILTIN_COUPLINGS = {
    "separation": "poptrain.couplings.separation:Separation",
    "relative": "poptrain.couplings.relative:Relative",
    "average": "poptrain.couplings.averaging:Average",
    "gossip": "poptrain.couplings.averaging:Gossip",
    "wash": "poptrain.couplings.averaging:Wash",
    "diloco": "poptrain.couplings.averaging:Diloco",
    "share": "poptrain.couplings.sharing:Share",
    "mutual": "poptrain.couplings.mutual:Mutual",
}


class CouplingClass:
    """The root of every coupling class (:class:`poptrain.couplings.Coupling` derives from it), so
    that a name can be checked to be a coupling without importing the couplings, and what the
    config layer reads of a coupling class before any is built (declared here, given their values
    and documented by ``Coupling``)."""

    Config: ClassVar[type[Any]]
    rewrites_values: ClassVar[bool]
    allows_rollback: ClassVar[bool]

    @classmethod
    def check_config(cls, config: Any, run: Any) -> list[tuple[str, str]]:
        raise NotImplementedError

    @classmethod
    def plotted_margin(cls, setting: Any) -> float | None:
        raise NotImplementedError


C = TypeVar("C", bound=type[CouplingClass])
COUPLINGS: dict[str, type[CouplingClass]] = {}


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make a coupling available to configs as ``type: <name>``."""

    def decorate(cls: C) -> C:
        if name in BUILTIN_COUPLINGS and BUILTIN_COUPLINGS[name] != f"{cls.__module__}:{cls.__qualname__}":
            raise ValueError(f"{name!r} is a built-in coupling ({BUILTIN_COUPLINGS[name]}): register {cls.__qualname__} under another name")
        old = COUPLINGS.get(name)
        redefined = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)  # a notebook cell run again
        if old is not None and old is not cls and not redefined:
            raise ValueError(f"a coupling named {name!r} is already registered ({COUPLINGS[name].__qualname__})")
        COUPLINGS[name] = cls
        return cls

    return decorate


def registered() -> dict[str, type[CouplingClass]]:
    """Every coupling available by name: the built-ins and those registered so far."""
    for name in BUILTIN_COUPLINGS:
        resolve_coupling(name)
    return dict(COUPLINGS)


def resolve_coupling(type_name: str | type) -> type[CouplingClass]:
    """The coupling class for a config's ``type``: a registered name or an import path
    ``package.module:Class`` (or the class itself, given from Python). Raises ``ValueError``
    listing the valid names on a miss."""
    from poptrain.builtins import import_path

    if isinstance(type_name, type):
        cls = type_name
    elif ":" in type_name:
        cls = import_path(type_name)
    elif type_name in COUPLINGS:
        return COUPLINGS[type_name]
    elif type_name in BUILTIN_COUPLINGS:
        cls = import_path(BUILTIN_COUPLINGS[type_name])  # registers itself on import
    else:
        raise ValueError(
            f"unknown coupling type {type_name!r}; registered: {sorted({*BUILTIN_COUPLINGS, *COUPLINGS})}, or give an import path `package.module:Class`"
        )
    if not (isinstance(cls, type) and issubclass(cls, CouplingClass)):
        raise TypeError(f"{getattr(type_name, '__qualname__', type_name)!r} is not a subclass of poptrain.couplings.Coupling")
    return cls
