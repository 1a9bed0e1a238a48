"""The population's average model: the mean of the final members' weights, evaluated on held-out data.

PAPA's claim (arXiv 2304.03094) is about this model, not the members nor their ensemble: with
``evaluation.population_average`` the driver averages the final weights the members saved
(``members/<name>/model.pt``), saves the mean as ``population_average.pt`` and evaluates it as a
member evaluates itself (:meth:`poptrain.training.member.MemberTrainer.evaluate`): in eval mode, without
gradients, on the whole held-out set, ``batch_size`` at a time, with the evaluation metrics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from poptrain.components.batches import in_order
from poptrain.components.build import build_dataset, build_model, resolve_loss, resolve_metrics
from poptrain.config.schema import RunConfig
from poptrain.storage.checkpoint import save_atomic

PREFIX = "population_average/"


def averaged_members(cfg: RunConfig, couplings: list) -> list[str] | None:
    """The members whose final weights make the population's average model, or None when the run
    evaluates none: the members of the first coupling that averages members (the averaging family,
    ``Coupling.averages_members``), else every member. ``evaluation.population_average``: ``false``,
    none; ``true``, those (:func:`problems` says why they cannot be averaged); ``auto``, those
    where an averaging coupling exists and :func:`problems` finds nothing."""
    setting = cfg.evaluation.population_average
    if setting is False:
        return None
    averaging = next((c for c in couplings if c.averages_members), None)
    members = list(averaging.members) if averaging is not None else list(cfg.member_names)
    if setting == "auto" and (averaging is None or problems(cfg, members)):
        return None
    return members


def problems(cfg: RunConfig, members: list[str]) -> list[str]:
    """Why the mean of ``members``' weights cannot be evaluated as one model: they have different
    models (name or kwargs: their weights are not one architecture's), or the first, whose model and
    held-out data the average takes, has no held-out data."""
    out = []
    first = cfg.member(members[0])
    model = _model_key(first)
    other = [m for m in members[1:] if _model_key(cfg.member(m)) != model]
    if other:
        differing = cfg.member(other[0]).model
        out.append(
            f"the averaged members {members} are not of one architecture: {members[0]!r} is {first.model.name!r} with kwargs "
            f"{first.model.kwargs}, {other[0]!r} {differing.name!r} with kwargs {differing.kwargs}; the mean of their weights is no "
            "model. Set `evaluation.population_average: false`, or average members of one `model`"
        )
    if first.held_out_data() is None:
        out.append(
            f"member {members[0]!r}, whose held-out data the average is evaluated on, has none: give it `eval_data` "
            "(or `data` with `split: train`), or set `evaluation.population_average: false`"
        )
    return out


def _model_key(member) -> str:
    return json.dumps(member.model.dump_given(), sort_keys=True, default=repr)


def mean_state_dict(paths: Iterable[Path]) -> dict[str, torch.Tensor]:
    """The mean of the state_dicts saved at ``paths``, ``(s_1 + ... + s_n) / n`` entry by entry in
    that order, as written (so bitwise the plain expression's); read one at a time, so it holds two
    models' worth of memory whatever n. An entry that is not floating point (BatchNorm's
    ``num_batches_tracked``) is the first state_dict's."""
    total: dict[str, torch.Tensor] = {}
    count = 0
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not total:
            total = {k: v.clone() for k, v in state.items()}
        else:
            for key, value in total.items():
                if value.is_floating_point():
                    value.add_(state[key])
        count += 1
    for value in total.values():
        if value.is_floating_point():
            value.div_(count)
    return total


def evaluate(cfg: RunConfig, member: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """``state`` in ``member``'s model, evaluated on its held-out data as the member evaluates itself:
    ``{<label>: value}`` of the evaluation metrics (``loss``: the member's loss), on the CPU. What it
    draws at random (building the model, before ``state`` replaces its weights) leaves the caller's
    random streams as they were."""
    config = cfg.member(member)
    held_out = config.held_out_data()
    if held_out is None:  # problems() refuses such a run before it starts
        raise ValueError(f"member {member!r} has no held-out data to evaluate the population's average model on")
    metric_fns = resolve_metrics(cfg.evaluation, resolve_loss(config))
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(cfg.seed)
        model = build_model(config.model)
        model.load_state_dict(state)
        model.eval()
        for *inputs, target in in_order(build_dataset(held_out), held_out.batch_size):
            outputs.append(model(*inputs).detach().float().cpu())
            targets.append(target.cpu())
    predicted, expected = torch.cat(outputs), torch.cat(targets)
    return {key: float(fn(predicted, expected)) for key, fn in metric_fns.items()}


def save_and_evaluate(cfg: RunConfig, members: list[str], weights: dict[str, Path], run_dir: Path) -> dict[str, float]:
    """The mean of ``members``' final weights (``weights``: member -> its saved ``model.pt``), saved
    atomically as ``<run_dir>/population_average.pt`` (loads with ``weights_only=True``) and
    evaluated: ``population_average/<label>``, and ``population_average/members``, how many."""
    state = mean_state_dict(weights[m] for m in members)
    save_atomic(state, run_dir / "population_average.pt")
    metrics = {f"{PREFIX}{key}": value for key, value in evaluate(cfg, members[0], state).items()}
    metrics[f"{PREFIX}members"] = float(len(members))
    return metrics
