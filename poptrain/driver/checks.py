"""Checks before anything starts: every name, pattern, path and shape a run's config refers to.

:func:`inspect_population` builds every model on the meta device (no memory) with the same
builders the members use (:mod:`poptrain.components.build`), so a config it accepts builds; :func:`prepare`
adds the output folder and the tracking store. Every problem is a :class:`ConfigError` naming
the file and the dotted key, before Ray starts.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch.utils.data import TensorDataset

from poptrain import builtins
from poptrain.components.batches import collate
from poptrain.components.build import accepts, apply_frozen, build_dataset, build_model, check_optimizer, matching
from poptrain.config.errors import ConfigError
from poptrain.config.load import load_config
from poptrain.config.outputs import anchor_outputs, job_storage_problems, output_problems
from poptrain.config.schema import MemberConfig, RunConfig
from poptrain.couplings import PopulationInfo, build_couplings
from poptrain.evaluation import population_average
from poptrain.pbt import policy as pbt
from poptrain.tracking.runs import TrackingUnavailable, check_tracking_reachable, resolve_tracking_uri


def inspect_population(cfg: RunConfig) -> PopulationInfo:
    """Build every model on the meta device (no memory) and check every name, pattern and path.

    Raises :class:`ConfigError` listing every problem found.
    """
    problems: list[tuple[str, str]] = _metric_problems(cfg)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    trainable: dict[str, dict[str, bool]] = {}
    for index, member in enumerate(cfg.members):
        key = f"members.{index}"
        model = _build_for_inspection(member.model, f"{key}.model", problems)
        held_out = member.held_out_data()
        for field_name, table, what, leading, spec in (
            ("data", builtins.DATASETS, "dataset", 0, member.data),
            ("loss", builtins.LOSSES, "loss", 2, member.loss),
            # Derived from `data` (its `split: test`) unless given: named where the user wrote it.
            ("eval_data" if member.eval_data is not None else "data", builtins.DATASETS, "dataset", 0, held_out),
        ):
            if spec is None or (field_name == "data" and any(k.startswith(f"{key}.data") for k, _ in problems) and spec is held_out):
                continue  # no held-out data, or held-out data derived from `data`, whose problem is named already
            try:
                fn = builtins.resolve(table, spec.given_or_name, what)
                reason = accepts(fn, spec.kwargs, leading)
                if reason:
                    problems.append((f"{key}.{field_name}", f"{spec.name!r} does not accept these arguments: {reason}"))
            except (ImportError, AttributeError, ValueError, TypeError) as exc:
                problems.append((f"{key}.{field_name}.name", str(exc)))
        for t_index, term in enumerate(member.terms):
            try:
                fn = builtins.resolve(builtins.TERMS, term.fn.given_or_name, "term")
                reason = accepts(fn, term.fn.kwargs, 4)
                if reason:
                    problems.append((f"{key}.terms.{t_index}.fn", f"{term.fn.name!r} does not accept these arguments: {reason}"))
            except (ImportError, AttributeError, ValueError, TypeError) as exc:
                problems.append((f"{key}.terms.{t_index}.fn.name", str(exc)))
        for g_index, transform in enumerate(member.grad_transforms):
            if transform.fn is not None:
                try:
                    if not callable(builtins.obtain(transform.fn.given_or_name)):
                        problems.append((f"{key}.grad_transforms.{g_index}.fn.name", f"{transform.fn.name!r} is not callable"))
                except (ImportError, AttributeError, ValueError) as exc:
                    problems.append((f"{key}.grad_transforms.{g_index}.fn.name", str(exc)))
        if member.init is not None and not os.path.isfile(member.init):
            problems.append((f"{key}.init", f"no such file: {member.init}"))
        if model is None:
            continue
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        if size > member.resources.max_model_gib * 2**30:
            problems.append(
                (
                    f"{key}.model",
                    f"{member.model.name!r} with kwargs {member.model.kwargs} would take {_gib(size)} "
                    f"of parameters and buffers, more than `resources.max_model_gib` ({member.resources.max_model_gib:g} GiB)",
                )
            )
        if member.init is not None and os.path.isfile(member.init):
            reason = _init_problem(member.init, model)
            if reason:
                problems.append((f"{key}.init", reason))
        names = [n for n, _ in model.named_parameters()]
        shown = f"{names[:12]}{' ...' if len(names) > 12 else ''}"
        for p_key, patterns in (
            [(f"{key}.frozen", member.frozen)]
            + [(f"{key}.optimizer.groups.{i}.params", g.params) for i, g in enumerate(member.optimizer.groups)]
            + [(f"{key}.grad_transforms.{i}.params", t.params) for i, t in enumerate(member.grad_transforms)]
        ):
            for pattern in patterns:
                if not matching(names, [pattern]):
                    problems.append((p_key, f"pattern {pattern!r} matches no parameter of member {member.name!r}; its parameters are {shown}"))
        frozen = apply_frozen(model, member.frozen if member.trainable else ["*"])
        if member.trainable:
            try:
                check_optimizer(model, member)
            except (TypeError, ValueError, RuntimeError, ImportError, AttributeError) as exc:
                problems.append((f"{key}.optimizer", str(exc)))
        shapes[member.name] = {n: tuple(p.shape) for n, p in model.named_parameters()}
        trainable[member.name] = {n: n not in frozen for n in names}
    if not problems and cfg.pbt is not None:
        problems.extend(pbt.check(cfg, shapes))
    if problems:
        raise ConfigError(problems)

    population = PopulationInfo(
        members=cfg.member_names,
        param_shapes=shapes,
        trainable=trainable,
        terms={m.name: ["loss", *[t.name for t in m.terms]] for m in cfg.members},
        exchange_every=cfg.exchange.every,
        seed=cfg.seed,
        log_every=cfg.tracking.log_every,
    )
    couplings = build_couplings(cfg.couplings, population)
    population.models = {m.name: m.model.dump_given() for m in cfg.members}
    problems = _describe_predictions(cfg, population, couplings)
    if problems:
        raise ConfigError(problems)
    for index, coupling in enumerate(couplings):
        own = [(f"couplings.{index}.{k}" if k else f"couplings.{index}", msg) for k, msg in coupling.check_population()]
        problems.extend(own or _unknown_quantities(index, coupling, population))
        if coupling.rewrites() and not coupling.rewrites_values:  # else the async check would let it through
            problems.append(
                (f"couplings.{index}.type", f"{type(coupling).__name__} rewrites values at exchanges but does not declare `rewrites_values = True`")
            )
    if cfg.evaluation.population_average is True:  # asked for: refused where the mean is no model (`auto` turns it off)
        averaged = population_average.averaged_members(cfg, couplings)  # never None when asked for
        problems.extend(("evaluation.population_average", msg) for msg in population_average.problems(cfg, averaged or []))
    if problems:
        raise ConfigError(problems)
    return population


def _unknown_quantities(index: int, coupling, population: PopulationInfo) -> list[tuple[str, str]]:
    """The members and parameters that ``coupling`` reads or rewrites but the population lacks
    (a mistyped ``param`` in a coupling that checks nothing itself, a user's by import path
    included): named here, before anything starts, not as a KeyError in the coordinator."""
    problems, seen = [], set()
    for q in [*coupling.reads(), *(q for r in coupling.rewrites() for q in r.quantities)]:
        if (q.member, q.kind, q.key) in seen:
            continue
        seen.add((q.member, q.kind, q.key))
        if q.member not in population.param_shapes:
            problems.append(
                (
                    f"couplings.{index}",
                    f"coupling {coupling.name!r} reads member {q.member!r}, which the population does not have; its members are {population.members}",
                )
            )
        elif q.kind == "param" and (lacking := population.lacks_param(coupling.name, q.member, q.key)):
            problems.append((f"couplings.{index}", lacking))
    return problems


def _describe_predictions(cfg: RunConfig, population: PopulationInfo, couplings) -> list[tuple[str, str]]:
    """Fill ``population.outputs`` and ``.samples`` for the members whose predictions (or own
    batches) a coupling reads; the problems of those that cannot predict."""
    problems = []
    for name in sorted({q.member for c in couplings for q in c.reads() if q.kind in ("pred", "local")}):
        index = cfg.member_index(name)
        try:
            population.outputs[name], population.samples[name] = _predictions_of(cfg, cfg.members[index])
        except Exception as exc:  # a model or dataset that fails here would fail in the member too
            problems.append(
                (f"members.{index}", f"cannot compute member {name!r}'s predictions on its data, which a coupling reads: {type(exc).__name__}: {exc}")
            )
    return problems


def _predictions_of(cfg: RunConfig, member: MemberConfig) -> tuple[tuple[int, ...], dict]:
    """A member's output shape per sample, from a forward pass on two of its samples, and what
    decides which samples its batches hold in which order (see :class:`PopulationInfo`)."""
    dataset = build_dataset(member.data)
    *inputs, _ = collate(dataset, torch.arange(min(2, len(dataset))))
    with torch.no_grad():
        outputs = build_model(member.model)(*inputs)
    if isinstance(dataset, TensorDataset):
        targets = dataset.tensors[-1]
    else:  # one sample at a time, the first few thousand: enough to tell different data apart
        targets = torch.stack([torch.as_tensor(dataset[i][-1]) for i in range(min(len(dataset), 4096))])
    samples = {
        "size": len(dataset),
        "batch_size": min(member.data.batch_size, len(dataset)),  # as BatchStream clamps it
        "shuffle": member.data.shuffle,
        "seed": member.data.seed if member.data.seed is not None else cfg.seed,
        "targets": hashlib.sha256(targets.contiguous().numpy().tobytes()).hexdigest(),
        "inputs": [tuple(t.shape[1:]) for t in inputs],  # per sample
    }
    return tuple(outputs.shape[1:]), samples


def _metric_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    problems = []
    for index, metric in enumerate(cfg.evaluation.metrics):
        if metric.name == "loss":
            continue
        try:
            reason = accepts(builtins.resolve(builtins.METRICS, metric.given_or_name, "metric"), metric.kwargs, 2)
            if reason:
                problems.append((f"evaluation.metrics.{index}", f"{metric.name!r} does not accept these arguments: {reason}"))
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            problems.append((f"evaluation.metrics.{index}.name", str(exc)))
    return problems


def _gib(size: int) -> str:
    return f"{size / 2**40:,.1f} TiB" if size >= 2**40 else f"{size / 2**30:,.1f} GiB"


def _init_problem(path: str, model: torch.nn.Module) -> str | None:
    """Why the state_dict at ``path`` cannot initialize ``model``, or None. Read onto the meta
    device (memory-mapped where the format allows it): nothing is allocated."""
    import zipfile

    zipped = zipfile.is_zipfile(path)  # torch.save's format; only its legacy format is not a zip
    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=zipped)
    except Exception as exc:
        if "weights only load failed" in str(exc).lower():
            return f"{path} holds Python objects, not only tensors: save `model.state_dict()`, not the model"
        detail = f" ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})" if zipped else ""
        return f"{path} is not a state_dict saved by torch.save{detail}"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"{path} is not a state_dict: torch.load gives a {type(state).__name__}, not a mapping of names to tensors"
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    found = {n: tuple(t.shape) for n, t in state.items()}
    differences = [f"missing {sorted(set(expected) - set(found))[:5]}"] if set(expected) - set(found) else []
    differences += [f"unexpected {sorted(set(found) - set(expected))[:5]}"] if set(found) - set(expected) else []
    differences += [f"{n} has shape {list(found[n])}, the model's is {list(s)}" for n, s in expected.items() if n in found and found[n] != s][:5]
    return f"{path} does not fit the model: {'; '.join(differences)}" if differences else None


def _build_for_inspection(spec, key: str, problems: list) -> torch.nn.Module | None:
    try:
        builtins.resolve(builtins.MODELS, spec.given_or_name, "model")
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        problems.append((f"{key}.name", str(exc)))
        return None
    try:
        with torch.device("meta"):
            return build_model(spec)
    except (TypeError, ValueError) as exc:
        problems.append((key, f"cannot build {spec.name!r} with kwargs {spec.kwargs}: {exc}"))
        return None
    except Exception:
        pass  # some models cannot be built on the meta device; build them for real
    try:
        return build_model(spec)
    except Exception as exc:
        problems.append((key, f"cannot build {spec.name!r} with kwargs {spec.kwargs}: {type(exc).__name__}: {exc}"))
        return None


def stacking_problems(cfg: RunConfig, population: PopulationInfo) -> dict[str, str | None]:
    """Why each member would train alone rather than stacked with alike members of its host, or None
    (it stacks wherever its host carries an alike member): from its config, and from its model,
    built for real twice per architecture and tried with torch.func on a few of its samples
    (:func:`poptrain.training.stacked.vmap_problem`), and from what the couplings read of it."""
    import json

    from poptrain.exchange.wire import ExchangePlan
    from poptrain.training.stacked import config_problem

    plan = ExchangePlan.for_run(cfg, population, build_couplings(cfg.couplings, population))
    tried: dict[str, str | None] = {}
    out: dict[str, str | None] = {}
    for member in cfg.members:
        reason = "`placement.stacked` is false" if not cfg.placement.stacked else config_problem(member, cfg)
        if reason is None and any(q.kind != "param" for q in plan.own_reads[member.name]):
            reason = "a coupling training it reads its losses or predictions"
        if reason is None and plan.coordinator_only[member.name] and cfg.exchange.shared_memory is True:
            reason = "the coordinator keeps its averaged or shared parameters in memory it maps (on a CPU node; `exchange.shared_memory: auto` lets it stack)"
        if reason is None:
            key = json.dumps(
                [member.model.model_dump(mode="json"), member.loss.model_dump(mode="json"), member.data.model_dump(mode="json")], sort_keys=True, default=str
            )
            if key not in tried:
                tried[key] = _model_stacking_problem(member)
            reason = tried[key]
        out[member.name] = reason
    return out


def _model_stacking_problem(member: MemberConfig) -> str | None:
    from poptrain.components.build import resolve_loss
    from poptrain.training.stacked import model_problem, probe_batch, vmap_problem

    with torch.random.fork_rng():  # the driver's own streams stay as they were
        torch.manual_seed(0)
        try:
            models = [build_model(member.model) for _ in range(2)]
        except Exception as exc:  # noqa: BLE001 - inspect_population has accepted it; say why it cannot be tried
            return f"its model could not be built to try it: {type(exc).__name__}: {exc}"
    reason = model_problem(models[0])
    if reason:
        return reason
    return vmap_problem(models, resolve_loss(member), probe_batch(build_dataset(member.data)))


def prepare(config, overrides=(), record: bool = False, given=()) -> tuple[RunConfig, PopulationInfo, str]:
    """Everything that can fail because of user input, before Ray starts: (config, population, tracking URI).
    ``record`` and ``given``: ``config`` is a run's own saved record, and the Python objects it was
    started with (see :func:`poptrain.config.load_config`)."""
    cfg = load_config(config, overrides, record, given)
    try:
        home = anchor_outputs(cfg)  # inside a Ray job: relative outputs go outside its temporary working dir
        population = inspect_population(cfg)
        problems = output_problems(cfg)
        if problems:
            raise ConfigError(problems)
        uri = resolve_tracking_uri(cfg, None if home is None else str(home))
        problems = job_storage_problems(cfg, uri)
        if problems:
            raise ConfigError(problems)
        try:
            check_tracking_reachable(uri)
        except TrackingUnavailable as exc:
            raise ConfigError([("tracking.uri", str(exc))]) from None
    except ConfigError as exc:  # name the file, as load_config's own errors do
        raise ConfigError(exc.problems, exc.source or (None if isinstance(config, (dict, RunConfig)) else str(config))) from None
    return cfg, population, uri
