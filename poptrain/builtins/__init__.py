"""Built-in models, datasets, losses, objective terms and evaluation metrics, referenced by name from configs.

Anything a config names can instead be an import path ``package.module:attr``, or, from Python,
the object itself; all are resolved by :func:`resolve`, which raises ``ValueError`` with the
valid names on a miss.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from poptrain.builtins import data, losses, metrics, models, terms

MODELS: dict[str, Callable] = models.MODELS
DATASETS: dict[str, Callable] = data.DATASETS
LOSSES: dict[str, Callable] = losses.LOSSES
TERMS: dict[str, Callable] = terms.TERMS
METRICS: dict[str, Callable] = metrics.METRICS  # evaluation metrics; `loss` (the member's own) is not in it
OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad"}


def import_path(path: str) -> Any:
    """Import ``package.module:attr`` (``attr`` may be dotted)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path of the form `package.module:attr`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} of {path!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def obtain(target: Any) -> Any:
    """The object an import path names, or ``target`` itself when it is an object given from Python."""
    return import_path(target) if isinstance(target, str) else target


def resolve(table: dict[str, Any], name: Any, what: str) -> Any:
    """A built-in by name, an object by import path, or the object given (a config's
    ``CodeRef.given_or_name``). A dataset given itself, rather than a function returning one, comes as
    a function of no arguments returning it."""
    if not isinstance(name, str):
        if what == "dataset" and not callable(name) and hasattr(name, "__getitem__") and hasattr(name, "__len__"):
            return functools.partial(_itself, name)
        if not callable(name):
            raise TypeError(f"{type(name).__qualname__} object {name!r:.60} is not callable, so it cannot be used as a {what}")
        return name
    if ":" in name:
        obj = import_path(name)
        if not callable(obj):
            raise TypeError(f"{name!r} is not callable, so it cannot be used as a {what}")
        return obj
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; built-ins are {sorted(table)}, or give an import path `package.module:attr`")
    return table[name]


def _itself(dataset: Any) -> Any:
    return dataset
