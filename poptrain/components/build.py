"""Building a member's parts from its config: model, data, loss, terms, optimizer, frozen patterns.

One place, used alike by the member (for real) and by the driver's checks
(:mod:`poptrain.driver.checks`, on the meta device, before anything starts), so what the check accepts
is exactly what the member builds.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from poptrain import builtins
from poptrain.components.batches import SizedDataset
from poptrain.config.schema import Component, MemberConfig


def build_model(spec: Component) -> nn.Module:
    factory = builtins.resolve(builtins.MODELS, spec.given_or_name, "model")
    model = factory(**spec.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_dataset(spec: Component) -> SizedDataset:
    """The dataset ``spec`` names. A built-in one (fixed by its arguments, seeded, read-only to
    the members) is built once per process for every member that names it alike: a host carrying
    a thousand members holds one copy."""
    if spec.name in builtins.DATASETS:
        return _built_in_dataset(spec.name, json.dumps(spec.kwargs, sort_keys=True, default=str))
    return _checked(spec.name, builtins.resolve(builtins.DATASETS, spec.given_or_name, "dataset")(**spec.kwargs))


@functools.lru_cache(maxsize=8)
def _built_in_dataset(name: str, kwargs_json: str) -> SizedDataset:
    return _checked(name, builtins.DATASETS[name](**json.loads(kwargs_json)))


def _checked(name: str, dataset: Any) -> SizedDataset:
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"data {name!r} returned {type(dataset).__name__}, not a map-style torch Dataset")
    if len(dataset) == 0:
        raise ValueError(f"data {name!r} returned an empty dataset")
    return dataset


def matching(names: list[str], patterns: list[str]) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def optimizer_class(cfg: MemberConfig) -> type:
    """The member's optimizer class: a built-in by name, or an import path."""
    name = cfg.optimizer.given_or_name
    if not isinstance(name, str) or ":" in name:
        return builtins.obtain(name)
    if name in builtins.OPTIMIZERS:
        return getattr(torch.optim, builtins.OPTIMIZERS[name])
    raise ValueError(f"unknown optimizer {name!r}; built-ins are {sorted(builtins.OPTIMIZERS)}, or an import path")


def parameter_groups(model: nn.Module, cfg: MemberConfig, tagged: bool = False) -> list[dict[str, Any]]:
    """The optimizer's parameter groups by name pattern (first match wins), frozen parameters excluded.
    ``tagged``: each group also says which config group it is (``poptrain_group``: its index, -1 for
    the rest), so that population-based training can change a group's hyperparameters."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    taken: set[str] = set()
    groups: list[dict[str, Any]] = []
    for index, group in enumerate(cfg.optimizer.groups):
        names = [n for n in matching([n for n, _ in trainable], group.params) if n not in taken]
        taken.update(names)
        if names:
            params = [p for n, p in trainable if n in names]
            groups.append({"params": params, **({"lr": group.lr} if group.lr else {}), **group.kwargs, **({"poptrain_group": index} if tagged else {})})
    rest = [p for n, p in trainable if n not in taken]
    if rest:
        groups.append({"params": rest, **({"poptrain_group": -1} if tagged else {})})
    if not groups:
        raise ValueError("every parameter is frozen: there is nothing to optimize")
    return groups


def build_optimizer(model: nn.Module, cfg: MemberConfig, tagged: bool = False) -> torch.optim.Optimizer:
    """One optimizer per member over :func:`parameter_groups` (``tagged`` as there)."""
    return optimizer_class(cfg)(parameter_groups(model, cfg, tagged), lr=cfg.optimizer.lr, **cfg.optimizer.kwargs)


# Flags that torch's optimizers check only once they hold their parameters.
_CHECKED_WITH_PARAMETERS = {"fused", "foreach", "differentiable", "capturable"}


def check_optimizer(model: nn.Module, cfg: MemberConfig) -> None:
    """Raise what :func:`build_optimizer` would raise for ``model``, without building it when possible.

    Building a torch optimizer imports ``torch._dynamo`` (about 2 s of CPU and 70 MiB, since
    ``Optimizer.add_param_group`` is wrapped to keep the compiler out), which the driver would
    pay before Ray even starts. torch's own optimizers check every hyperparameter before they
    look at their parameters and then refuse an empty parameter list: constructing one with
    ``[]`` checks the same values and stops before that import. Other classes (import paths),
    flags torch checks only with parameters (``fused``, ``foreach``, ...) and several parameter
    groups (``LBFGS`` refuses them once it holds them) are built for real.
    """
    cls = optimizer_class(cfg)
    groups = parameter_groups(model, cfg)
    kwargs = cfg.optimizer.kwargs
    probe = cls.__module__.startswith("torch.optim") and len(groups) == 1 and not (_CHECKED_WITH_PARAMETERS & {*kwargs, *groups[0]})
    if probe:
        probe_torch_optimizer(cls, cfg.optimizer.lr, kwargs)
        return
    build_optimizer(model, cfg)


def probe_torch_optimizer(cls: type, lr: float, kwargs: dict[str, Any]) -> None:
    """Raise what torch optimizer ``cls`` raises for ``lr`` and ``kwargs``, without parameters:
    torch's optimizers check every hyperparameter before they refuse the empty parameter list."""
    try:
        cls([], lr=lr, **kwargs)
    except ValueError as exc:
        if "empty parameter list" not in str(exc):
            raise


def apply_frozen(model: nn.Module, patterns: list[str]) -> list[str]:
    frozen = matching([n for n, _ in model.named_parameters()], patterns)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def accepts(fn: Callable, kwargs: dict, leading: int = 0) -> str | None:
    """None when ``fn(*leading positional, **kwargs)`` binds, else the reason."""
    try:
        inspect.signature(fn).bind(*([None] * leading), **kwargs)
    except TypeError as exc:
        return str(exc)
    except ValueError:  # no signature (builtins): let the call itself decide
        return None
    return None


def resolve_loss(cfg: MemberConfig) -> Callable:
    """The member's task loss ``f(outputs, targets) -> scalar``."""
    return builtins.resolve(builtins.LOSSES, cfg.loss.given_or_name, "loss")


def resolve_terms(cfg: MemberConfig) -> dict[str, Callable]:
    """The member's own objective terms by name, each ``f(model, *inputs, outputs, targets, **kwargs)``."""
    return {t.name: builtins.resolve(builtins.TERMS, t.fn.given_or_name, "term") for t in cfg.terms}


def resolve_grad_transforms(cfg: MemberConfig, param_names: list[str]) -> list[tuple[Any, Callable | None, list[str]]]:
    """(transform config, its function or None, the parameter names it selects) per gradient transform."""
    return [(t, builtins.obtain(t.fn.given_or_name) if t.fn else None, matching(param_names, t.params)) for t in cfg.grad_transforms]


def resolve_metrics(evaluation, loss_fn: Callable | None) -> dict[str, Callable]:
    """Each evaluation metric by label, as ``f(outputs, targets) -> float`` with its kwargs bound;
    ``loss`` is ``loss_fn`` (the member's task loss; left out when None)."""
    out: dict[str, Callable] = {}
    for metric in evaluation.metrics:
        if metric.name == "loss":
            if loss_fn is not None:
                out[metric.key] = loss_fn
            continue
        fn = builtins.resolve(builtins.METRICS, metric.given_or_name, "metric")
        out[metric.key] = functools.partial(fn, **metric.kwargs) if metric.kwargs else fn
    return out


def describe_dataset(spec: Component, dataset: SizedDataset, context: str) -> dict[str, Any]:
    """What MLflow shows of a member's dataset: name, digest (of its tensors when it is a
    TensorDataset, else of its config), ``context`` (``train`` or ``eval``), source and profile
    (rows, and the split, view, part and limit it was asked for)."""
    digest = hashlib.sha256()
    if isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    else:
        digest.update(json.dumps({"name": spec.name, "kwargs": spec.kwargs}, sort_keys=True, default=str).encode())
    profile: dict[str, Any] = {"rows": len(dataset), **{k: spec.kwargs[k] for k in ("split", "view", "part", "parts", "limit") if k in spec.kwargs}}
    source = spec.name if ":" in spec.name else f"poptrain.builtins.data:{spec.name}"
    return {"name": spec.name.rsplit(":", 1)[-1], "digest": digest.hexdigest()[:16], "context": context, "source": source, "profile": profile}
