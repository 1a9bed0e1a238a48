"""Population-based training in memory (``pbt:``): a member's mutable hyperparameters, how explore
perturbs them, and whom exploit copies.

The coordinator ranks the members every ``pbt.every`` steps (:class:`poptrain.pbt.rounds.PBTRounds`)
and decides, with a generator seeded by the run's seed and the step (so a resumed run decides the
same), which of the bottom ``quantile`` copies which of the top ``quantile`` and with which new
hyperparameters. The receiver then loads its donor's weights, optimizer state, balancing state and
data position straight from the donor's process through Ray's object store (no checkpoint), and
applies its new hyperparameters, which its optimizer uses from its next step on.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from typing import Any

from poptrain.components.build import optimizer_class, probe_torch_optimizer
from poptrain.config.schema import MemberConfig, Perturbation, RunConfig

GROUP_KEY = "poptrain_group"  # in each optimizer param group: the config group it came from (-1: the default)


def ranking(run: RunConfig) -> tuple[str, bool]:
    """The metric members are ranked by and whether higher is better."""
    pbt, ranked_by = run.pbt, run.evaluation.ranking
    if pbt is None:
        raise ValueError("the run has no `pbt` section to rank members for")
    metric = pbt.metric
    if metric is None:
        if ranked_by is None:
            raise ValueError("pbt.metric: none given, and the run evaluates no metric to rank members by")
        metric = f"eval/{ranked_by.key}"
    if pbt.mode is not None:
        return metric, pbt.mode == "max"
    if metric.startswith("eval/"):
        labelled = {m.key: m for m in run.evaluation.metrics}
        return metric, bool(labelled[metric[len("eval/") :]].higher)
    return metric, False  # a training metric: a loss, lower is better


class Hyperparameters:
    """A member's mutable hyperparameters by key (see :class:`poptrain.config.PBTConfig`), read from
    and written into its live optimizer, objective weights and couplings."""

    def __init__(self, trainer, keys: list[str]):
        """``trainer``: the member's :class:`poptrain.training.member.MemberTrainer`."""
        self.trainer, self.keys = trainer, list(keys)

    def _groups(self, key: str) -> list[dict]:
        """The optimizer param groups a key sets: ``optimizer.lr`` and ``optimizer.kwargs.<k>`` those
        that do not set their own, ``optimizer.groups.<i>.lr`` group i's."""
        config, groups = self.trainer.config.optimizer, self.trainer.optimizer.param_groups
        parts = key.split(".")
        if parts[1] == "groups":
            return [g for g in groups if g.get(GROUP_KEY) == int(parts[2])]
        own = (lambda i: config.groups[i].lr is not None) if parts[1] == "lr" else (lambda i: parts[2] in config.groups[i].kwargs)
        return [g for g in groups if g.get(GROUP_KEY, -1) < 0 or not own(g[GROUP_KEY])]

    def get(self) -> dict[str, float]:
        out = {}
        for key in self.keys:
            head, _, rest = key.partition(".")
            if head == "optimizer":
                groups = self._groups(key)
                out[key] = float(groups[0]["lr" if key.endswith(".lr") else key.rsplit(".", 1)[1]]) if groups else math.nan
            elif head == "loss_weight":
                out[key] = self.trainer.term_weights["loss"]
            elif head == "terms":
                out[key] = abs(self.trainer.term_weights[rest.rsplit(".", 1)[0]])
            else:
                out[key] = next(c.weight for c in self.trainer.couplings if c.name == rest.rsplit(".", 1)[0])
        return out

    def set(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            head, _, rest = key.partition(".")
            if head == "optimizer":
                for group in self._groups(key):
                    group["lr" if key.endswith(".lr") else key.rsplit(".", 1)[1]] = value
            elif head == "loss_weight":
                self.trainer.term_weights["loss"] = value
            elif head == "terms":
                name = rest.rsplit(".", 1)[0]  # its sign (maximize: negative) is kept
                self.trainer.term_weights[name] = math.copysign(abs(value), self.trainer.term_weights[name])
            else:
                for coupling in self.trainer.couplings:
                    if coupling.name == rest.rsplit(".", 1)[0]:
                        coupling.weight = value


def explore(
    values: dict[str, float], space: dict[str, Perturbation], rng: random.Random, problem: Callable[[str, float], str | None] = lambda key, value: None
) -> tuple[dict[str, float], dict[str, dict]]:
    """The donor's ``values`` perturbed as ``space`` says (keys not in it are kept), and what was
    adjusted: ``{key: {"drawn": v, "set": w, "reason": ...}}``. A draw outside the key's
    ``min``/``max`` is set to the nearer bound; one its consumer refuses (``problem(key, value)``,
    :func:`value_problem`) keeps the donor's value. Drawn key by key in sorted order: the order a
    config lists them in (a YAML mapping has none) changes nothing."""
    out, adjusted = dict(values), {}
    for key, how in sorted(space.items()):
        if key not in out:
            continue
        if how.factors is not None and rng.random() >= how.resample_probability:
            drawn = out[key] * rng.choice(how.factors)
        elif how.values is not None:
            drawn = rng.choice(how.values)
        elif how.range is not None:
            low, high = how.range
            drawn = math.exp(rng.uniform(math.log(low), math.log(high))) if how.log else rng.uniform(low, high)
        else:
            continue
        value = how.bounded(drawn)
        reason = f"outside [{how.min}, {how.max}]" if value != drawn else None
        refused = problem(key, value)
        if refused:
            value, reason = out[key], f"refused: {refused}; the donor's value is kept"
        if reason:
            adjusted[key] = {"drawn": drawn, "set": value, "reason": reason}
        out[key] = value
    return out, adjusted


def value_problem(member: MemberConfig, key: str, value: float) -> str | None:
    """Why ``value`` is outside what the consumer of hyperparameter ``key`` of ``member`` accepts, or
    None: a learning rate must be positive, an optimizer option what the optimizer's own constructor
    accepts (torch's optimizers check their values before they look at their parameters), a weight
    not negative."""
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    head, _, rest = key.partition(".")
    if head != "optimizer":
        return f"{value:g} is negative: a weight below 0 would maximize what it weighs" if value < 0 else None
    option = "lr" if rest == "lr" or rest.startswith("groups.") else rest.split(".", 1)[1]
    if option == "lr" and value <= 0:
        return f"{value:g} is not a positive learning rate"
    cls = optimizer_class(member)
    if not cls.__module__.startswith("torch.optim"):
        return None  # a user's optimizer: its own checks run when it is built
    kwargs = {**member.optimizer.kwargs, **({} if option == "lr" else {option: value})}
    try:
        probe_torch_optimizer(cls, value if option == "lr" else member.optimizer.lr, kwargs)
    except (ValueError, TypeError) as exc:
        return f"{cls.__name__} refuses {option}={value:g}: {exc}"
    return None


def optimizer_options(member: MemberConfig) -> dict[str, Any]:
    """The options of ``member``'s optimizer class (its constructor's keyword arguments but ``lr``,
    which is ``optimizer.lr``), with the values the member's optimizer takes: its config's, else
    the constructor's defaults."""
    parameters = inspect.signature(optimizer_class(member).__init__).parameters  # type: ignore[misc]  # the class's own, not an instance's
    options = {n: p.default for n, p in parameters.items() if n not in ("self", "params", "lr") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {**options, **member.optimizer.kwargs}


def exploit_plan(scores: dict[str, float | None], order: list[str], quantile: float, higher: bool, rng: random.Random) -> dict[str, str]:
    """``{receiver: donor}``: each of the bottom ``quantile`` (at least one) copies a member of the top
    ``quantile`` chosen at random. Nobody is exploited while a score is missing (the ranking metric
    does not exist yet) or not finite; ties are broken by member order."""
    known = {m: v for m, v in scores.items() if v is not None and math.isfinite(v)}
    if len(scores) < 2 or len(known) < len(scores):
        return {}
    ranked = sorted(order, key=lambda m: (-known[m] if higher else known[m], order.index(m)))
    n = max(1, int(len(ranked) * quantile))
    top, bottom = ranked[:n], ranked[-n:]
    return {receiver: rng.choice(top) for receiver in bottom if receiver not in top}


def pbt_members(run: RunConfig) -> list[str]:
    return list(run.pbt.members or run.member_names) if run.pbt is not None else []


def round_rng(run: RunConfig, step: int) -> random.Random:
    """The generator of the round at ``step``: the same in a resumed run."""
    return random.Random(f"poptrain-pbt-{run.seed}-{step}")


def check(run: RunConfig, shapes: dict[str, dict[str, tuple]]) -> list[tuple[str, str]]:
    """Members in the schedule must be alike where copying requires it: the same parameter names and
    shapes and the same optimizer (class and groups); each perturbed key must exist."""
    pbt = run.pbt
    if pbt is None:
        return []
    members = pbt_members(run)
    problems: list[tuple[str, str]] = []
    unknown = [m for m in members if m not in run.member_names]
    if unknown:
        return [("pbt.members", f"unknown members {unknown}; members are {run.member_names}")]
    if len(members) < 2:
        problems.append(("pbt.members", "population-based training needs at least two members"))
    first = members[0]
    for name in members[1:]:
        if shapes.get(name) != shapes.get(first):
            differ = sorted(set(shapes.get(name, {}).items()) ^ set(shapes.get(first, {}).items()))[:4]
            problems.append(
                ("pbt.members", f"members {first!r} and {name!r} have different parameters ({differ}): a member can only copy one of the same architecture")
            )
        a, b = run.member(first).optimizer, run.member(name).optimizer
        if a.name != b.name or len(a.groups) != len(b.groups):
            problems.append(
                (
                    "pbt.members",
                    f"members {first!r} and {name!r} have different optimizers ({a.name}, {len(a.groups)} "
                    f"groups vs {b.name}, {len(b.groups)}): their states cannot be copied",
                )
            )
    for key, how in pbt.hyperparameters.items():
        head, _, rest = key.partition(".")
        where = f"pbt.hyperparameters.{key}"
        found = []
        for member in _distinct(run.member(name) for name in members):  # a thousand alike members are checked once
            name = member.name
            if head == "optimizer" and rest.startswith("groups.") and int(rest.split(".")[1]) >= len(member.optimizer.groups):
                found.append((where, f"member {name!r} has {len(member.optimizer.groups)} optimizer groups"))
            elif head == "optimizer" and rest.startswith("kwargs."):
                option, options = rest.split(".", 1)[1], optimizer_options(member)
                numeric = sorted(k for k, v in options.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
                if option not in options:
                    found.append(
                        (
                            where,
                            f"{member.optimizer.name!r} has no option {option!r}; its options are "
                            f"{sorted(options)} (of which numbers, which explore can perturb: {numeric})",
                        )
                    )
                elif option not in numeric:
                    found.append(
                        (
                            where,
                            f"the option {option!r} of {member.optimizer.name!r} is {options[option]!r}, not a number: explore perturbs numbers ({numeric})",
                        )
                    )
            elif head == "terms" and rest.rsplit(".", 1)[0] not in [t.name for t in member.terms]:
                found.append((where, f"member {name!r} has no term {rest.rsplit('.', 1)[0]!r}"))
            elif head == "couplings" and rest.rsplit(".", 1)[0] not in [c.label for c in run.couplings]:
                found.append((where, f"there is no coupling named {rest.rsplit('.', 1)[0]!r}"))
            if found:
                break
            # Every value explore can set from a list or a range is one the member's consumer takes (the
            # domains are intervals: a range's ends stand for it); factors are positive (the schema), so
            # a value keeps its sign, and `min`/`max` bound them where the config asks.
            for field, candidates in (
                ("values", how.values or []),
                ("range", list(how.range or [])),
                ("min", [how.min] if how.min is not None else []),
                ("max", [how.max] if how.max is not None else []),
            ):
                for value in candidates:
                    reason = value_problem(member, key, value)
                    if reason:
                        found.append((f"{where}.{field}", f"for member {name!r}: {reason}"))
                        break
        problems += found
    metric = pbt.metric or ""
    if metric.startswith("eval/") and metric[len("eval/") :] not in [m.key for m in run.evaluation.metrics]:
        problems.append(("pbt.metric", f"{metric!r} is not one of the evaluation metrics {[f'eval/{m.key}' for m in run.evaluation.metrics]}"))
    if (not pbt.metric or metric.startswith("eval/")) and any(run.member(m).held_out_data() is None for m in members):
        problems.append(
            ("pbt.metric", "members are ranked by a held-out metric, but some have no held-out data: give them `eval_data` or `data.kwargs.split: train`")
        )
    return problems


def _distinct(members) -> list[MemberConfig]:
    """One member of each optimizer, terms and couplings setup (what the checks above depend on)."""
    seen, out = set(), []
    for member in members:
        key = repr((member.optimizer.model_dump(), [t.name for t in member.terms]))
        if key not in seen:
            seen.add(key)
            out.append(member)
    return out


def transferable(state: dict[str, Any]) -> dict[str, Any]:
    """What a receiver copies of its donor's :meth:`MemberTrainer.state_dict`, every tensor on the
    CPU. It travels through Ray's object store (``ray.put`` in the donor's process): a CUDA tensor
    there would be pickled with its device, and unpickling it in the receiver's process would need
    the donor's GPU (another process's device index, or none on a CPU node). On the CPU it loads
    onto any receiver: ``load_state_dict`` copies weights into its parameters where they are and
    moves optimizer state to each parameter's device. A CPU tensor is passed as it is (no copy)."""
    import torch

    def on_cpu(tree: Any) -> Any:
        if isinstance(tree, torch.Tensor):
            return tree.detach().cpu()
        if isinstance(tree, dict):
            return {k: on_cpu(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(on_cpu(v) for v in tree)
        return tree

    return on_cpu({k: state[k] for k in ("model", "optimizer", "balancer", "batches")})
