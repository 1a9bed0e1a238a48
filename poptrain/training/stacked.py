"""Members of one architecture on a host, trained as one stacked model with torch.func.

:class:`StackedGroup` holds its members' parameters stacked along a new first dimension (member
``i`` is row ``i``); each member's own ``nn.Parameter``\\ s become views of its row, so everything
that reads a member (exchange, evaluation, checkpoints, ``model.pt``, layer norms) sees its
current weights, and what writes into a member in place (a restored checkpoint, an average, an
exploit) writes into the stack. One step of the group is one ``vmap(grad_and_value(...))`` of
the members' own objectives (``loss_weight * loss``) over the stack, then the coupling terms of
members that have one (each on its own parameters, with autograd, every step), then one
vectorised optimizer update with every member's own hyperparameters, held as columns over the
member dimension and read again from the members' own torch optimizers, coupling objects and
term weights only when the host hands the stack their state (after population-based training
changed them, or a restore).

A member's optimizer state lives in the stack while it trains and in its own torch optimizer
(torch's own state format) whenever anything outside the step needs it: :meth:`StackedGroup.to_members`
before a checkpoint, an exploit's donor state or the end, :meth:`StackedGroup.from_members` after a
member's state was loaded. Stacked training matches members trained one by one to float rounding
(the same operations, vectorised), not bitwise.

What stacks (:func:`stackable`, checked per member, and :func:`vmap_problem`, tried once per
group): any model, the user's own included, without buffers, that torch.func computes as the
model does (``vmap(grad)`` of its loss runs on a few of its samples and gives each member's own
gradient), ``nn.Dropout`` included (:class:`RowDropout` takes each member's masks, drawn from its
own stream before the step); a built-in loss; Adam, AdamW or SGD with ``betas``/``eps``/``weight_decay``
(``momentum``/``dampening`` for SGD); no frozen parameters, extra terms, balancing, gradient
transforms or mapped parameters; ``failure.nonfinite: fail``; couplings that train the member
read only its parameters. Members that do not stack train one after another
(:mod:`poptrain.training.lockstep`); each says why in ``trainer.stacking_problem`` and in ``poptrain check``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections import ChainMap
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from poptrain.components.batches import StackedBatches, in_order, same_tensor_data, to_device
from poptrain.couplings.base import Columns, Overlay, Quantity
from poptrain.exchange.wire import numpy_copy, tensor_copy
from poptrain.training.lockstep import Send, StepProgram, Wait
from poptrain.training.member import logs_step

STACKABLE_OPTIONS = {"adam": {"betas", "eps", "weight_decay"}, "adamw": {"betas", "eps", "weight_decay"}, "sgd": {"momentum", "dampening", "weight_decay"}}
MIN_MEMBERS = 2  # a group of one trains as the member alone does
PROBE_TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # the same operations, vectorised: float rounding


def model_problem(model: nn.Module) -> str | None:
    """Why ``model`` (any ``nn.Module``, the user's own included) cannot train stacked, as far as its
    structure tells: buffers a step would update in place (BatchNorm's running statistics) and
    dropout other than ``nn.Dropout`` (whose masks a stack draws from each member's own stream:
    :class:`RowDropout`). Whether torch.func computes it as the model does is tried on data:
    :func:`vmap_problem`."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p and type(module) is not nn.Dropout:
            return f"it has {type(module).__name__} ({name or type(model).__name__}: p={module.p:g}): a stack draws each member's own masks for nn.Dropout only"
        if type(module) is nn.Dropout and module.p >= 1:
            return f"its dropout ({name}) has p={module.p:g}: every value dropped"
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return (
            f"its model has buffers ({', '.join(buffers[:3])}{' ...' if len(buffers) > 3 else ''}: BatchNorm's running statistics or the like), "
            "which a stacked step would update in place"
        )
    return None


class RowDropout(nn.Module):
    """An ``nn.Dropout`` of a stack's architecture: multiplies its input by ``mask``, a member's row of
    the masks the stack drew before the step from each member's own random stream, as torch's
    dropout draws them (``empty_like(x).bernoulli_(1 - p)``, divided by ``1 - p``), handed in by
    ``functional_call`` as a buffer (vmapped: each member its row). The identity in eval mode.
    While ``calls`` is a list (:meth:`StackedGroup._dropout_calls_for`, :func:`vmap_problem`), it
    records itself and the shape of each input it gets instead, and passes the input on."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.mask: torch.Tensor  # a member's row of the step's masks, handed in by functional_call
        self.register_buffer("mask", torch.empty(0), persistent=False)
        self.calls: list | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p:
            return x
        if self.calls is not None:
            self.calls.append((self, tuple(x.shape)))
            return x
        return x * self.mask


def _with_row_dropout(model: nn.Module) -> dict[str, RowDropout]:
    """Replace ``model``'s ``nn.Dropout`` modules (p > 0) by :class:`RowDropout`; them by name."""
    replaced = {}
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout and module.p:
            replaced[name] = RowDropout(module.p)
            _set_parameter(model, name, replaced[name])
    return replaced


def vmap_problem(models: list[nn.Module], loss_fn, batch: list[torch.Tensor]) -> str | None:
    """Why torch.func cannot stand for ``models`` (two or more of one architecture) on ``batch``
    ([inputs..., targets]), or None: ``vmap(grad)`` of the loss over their stacked parameters must
    run (no data-dependent control flow, no random op) and give each model's own gradient, to
    float rounding. Nothing of the models changes."""
    *inputs, targets = batch
    # In eval mode (dropout off): a stack draws its dropout masks itself (RowDropout); what is probed
    # here is whether torch.func computes the rest as the model does.
    skeleton = copy.deepcopy(models[0]).to("meta").eval()
    modes = [m.training for m in models]
    try:
        return _vmap_problem(models, loss_fn, inputs, targets, skeleton)
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


def _vmap_problem(models, loss_fn, inputs, targets, skeleton) -> str | None:
    from torch.func import functional_call, grad, vmap

    for model in models:
        model.eval()
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k, _ in models[0].named_parameters()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stacked = vmap(grad(lambda p: loss_fn(functional_call(skeleton, p, tuple(inputs)), targets)))(params)
    except Exception as exc:  # whatever torch.func cannot do is a reason, not a failure
        return f"torch.func cannot stack its model: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    slow = [str(w.message) for w in caught if "performance drop" in str(w.message)]
    if slow:  # vmap would run the op member by member: slower than each member alone
        op = slow[0].split("batching rule for ", 1)[-1].split(".", 1)[0]
        return f"torch.func has no batching rule for {op} (it would loop over the members inside each stacked step)"
    for i, model in enumerate(models):
        named = dict(model.named_parameters())
        own = torch.autograd.grad(loss_fn(model(*inputs), targets), list(named.values()), allow_unused=True)
        for (k, p), g in zip(named.items(), own, strict=True):
            if not torch.allclose(stacked[k][i], torch.zeros_like(p) if g is None else g, rtol=PROBE_TOLERANCE["rtol"], atol=PROBE_TOLERANCE["atol"]):
                return f"its gradient stacked differs from its own ({k}): its forward may keep state between calls"
    # In training mode, its nn.Dropout standing aside and counted (a stack multiplies by masks drawn
    # outside, one per module): anything else random (functional dropout, RReLU) cannot be drawn
    # from each member's own stream.
    trained = copy.deepcopy(skeleton).train()
    calls: list = []
    for module in _with_row_dropout(trained).values():
        module.calls = calls
    try:
        vmap(grad(lambda p: loss_fn(functional_call(trained, p, tuple(inputs)), targets)))(params)
    except Exception as exc:
        return f"in training mode torch.func cannot stack its model: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    called = [module for module, _ in calls]
    if len(set(called)) != len(called):
        return "a dropout module of its model is called more than once per forward (a stack draws one mask per module and step)"
    return None


def config_problem(cfg, run) -> str | None:
    """Why a member of config ``cfg`` in run ``run`` cannot train stacked, from its config alone."""
    from poptrain.builtins import LOSSES

    if cfg.loss.name not in LOSSES or cfg.loss.kwargs:
        return "its loss is not a built-in one without options"
    # Every parameter group's options as well as the optimizer's: the stacked update reads each
    # member's own groups, and implements these options only.
    for options in [cfg.optimizer.kwargs, *(g.kwargs for g in cfg.optimizer.groups)]:
        if cfg.optimizer.name not in STACKABLE_OPTIONS or set(options) - STACKABLE_OPTIONS[cfg.optimizer.name]:
            return f"optimizer {cfg.optimizer.name!r} with {sorted(options)} is not stackable"
        if cfg.optimizer.name == "sgd" and options.get("dampening", 0):
            return "SGD with dampening is not stackable"
    if not cfg.trainable or cfg.frozen or cfg.terms or cfg.balancing.method != "none" or cfg.grad_transforms:
        return "it has frozen parameters, extra terms, balancing or gradient transforms"
    if run.failure.nonfinite != "fail":
        return "`failure.nonfinite` is not `fail`"
    return None


def stackable(trainer) -> str | None:
    """Why ``trainer`` (a :class:`poptrain.training.member.MemberTrainer`) cannot train stacked, or None
    (whether torch.func computes its model as the model does is tried once per group: :func:`form_groups`)."""
    reason = model_problem(trainer.model) or config_problem(trainer.config, trainer.run)
    if reason:
        return reason
    if trainer.mapped:
        return "its parameters are mapped by the coordinator"
    if not trainer.couplings_read_only_own_params:
        return "a coupling training it reads its losses or predictions"
    if trainer.device.type != "cpu" and not torch.cuda.is_available():
        return "its device is unavailable"
    return None


def probe_batch(dataset, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The first few samples of ``dataset`` (what :func:`vmap_problem` tries a model on), on
    ``device``; a member's batch stream does not move."""
    from poptrain.components.batches import collate

    return [t.to(device) for t in collate(dataset, torch.arange(min(len(dataset), 4)))]


def group_key(trainer) -> tuple:
    """Members with equal keys can share a stack: the same architecture, loss, optimizer kind,
    device, batch size (their batches are one tensor) and the same part in every exchange (the
    same couplings, whose weights may differ: each member's own applies to it)."""
    cfg, plan, name = trainer.config, trainer.plan, trainer.name
    roles = tuple(name in plan.takes_part[k] for k in sorted(plan.takes_part))
    return (
        repr(cfg.model.model_dump(mode="json")),
        cfg.loss.name,
        cfg.optimizer.name,
        str(trainer.device),
        trainer.batches.batch_size,
        roles,
        tuple(sorted(c.name for c in trainer.training_couplings)),
        trainer.defer_param_replies,
        trainer.every,
    )


def form_groups(trainers: list) -> list:
    """``trainers`` (one host's, in order) as units to step: a :class:`StackedGroup` per set of at
    least :data:`MIN_MEMBERS` stackable members with the same :func:`group_key`, the others alone."""
    by_key: dict[tuple, list] = {}
    for t in trainers:
        t.stacking_problem = stackable(t)
        if t.stacking_problem is None:
            by_key.setdefault(group_key(t), []).append(t)
    for members in by_key.values():  # tried once per group: the models are alike
        problem = (
            vmap_problem([m.model for m in members[:2]], members[0].loss_fn, probe_batch(members[0].batches.dataset, members[0].device))
            if len(members) >= MIN_MEMBERS
            else None
        )
        for m in members:
            m.stacking_problem = problem
    grouped = {id(t): members for members in by_key.values() if len(members) >= MIN_MEMBERS and members[0].stacking_problem is None for t in members}
    units: list = []
    placed: set[int] = set()
    for t in trainers:
        if id(t) not in grouped:
            units.append(t)
        elif id(t) not in placed:
            members = grouped[id(t)]
            placed.update(id(m) for m in members)
            units.append(StackedGroup(members))
    return units


class StackedGroup:
    """Members of one architecture trained as one stacked model: see the module's docstring."""

    def __init__(self, members: list):
        from torch.func import functional_call, grad_and_value, vmap

        self.members = members
        self.names = tuple(m.name for m in members)
        self.randomness = _NoRandomness()  # nothing a stacked step computes draws at random
        self.timings = {"serialize_ms": 0.0, "exchange_wait_ms": 0.0}  # this step's, the whole group's (the host shares them out)
        first = members[0]
        self.device, self.every = first.device, first.every
        self.link = first.link  # the host's: a group alone on its host sends through it as one member would
        self.keys = [k for k, _ in first.model.named_parameters()]
        self.population_order = {name: i for i, name in enumerate(first.population.members)}
        self.skeleton = copy.deepcopy(first.model).to("meta")  # the architecture, holding no memory
        self.dropouts = _with_row_dropout(self.skeleton)  # each member's masks from its own stream (RowDropout)
        self._dropout_calls: dict[tuple, list[tuple[str, float, tuple]]] = {}
        self._generator = torch.Generator(device=self.device) if self.dropouts else None
        # The stack: member i's parameters are row i; its own Parameters become views of it.
        self.params = {k: torch.stack([m.params[k].detach() for m in members]).contiguous() for k in self.keys}
        for i, m in enumerate(members):
            self._point_at_stack(i, m)
        loss_fn = first.loss_fn

        def objective(params, masks, inputs, targets, weight):
            outputs = functional_call(self.skeleton, {**params, **masks}, tuple(inputs))
            loss = loss_fn(outputs, targets)
            return weight * loss, (loss, outputs)

        self._grad = grad_and_value(objective, has_aux=True)
        # The quantities of its own each member's couplings read (its parameters), computed once.
        self.own_reads = [sorted(m.plan.own_reads[m.name]) for m in members]
        # Each member's couplings by name: its own objects when population-based training changes
        # their weights member by member (poptrain.training.host), else the ones all share.
        self.couplings = [{c.name: c for c in m.training_couplings} for m in members]
        # The exchange rounds the group takes part in (all its members alike: group_key).
        self.rounds = {kind: first.name in first.plan.takes_part[kind] for kind in first.plan.takes_part}
        self.coupled_keys = sorted({q.key for own in self.own_reads for q in own})
        self.own_couplings = any(not c.term_is_joint for c in first.training_couplings)
        # When one backward of a joint term over the live stack gives each member its own gradient:
        # at a sync exchange that sent every quantity the couplings read, when the peers' exchanged
        # values are the live ones. Else (between exchanges, async) each member's term is its own
        # live values against everyone else's exchanged ones, as alone (Coupling.values_against).
        self.joint_at_exchanges = first.run.exchange.mode == "sync" and all(first.plan.period.get(q, 1) == 1 for own in self.own_reads for q in own)
        # What the members send in each exchange phase, when alike for all of them (the same
        # quantities, each due at the same exchanges): sent as one copy of each stacked value, not
        # member by member. {phase: {(kind, key): (its period in exchanges, each member's Quantity)}},
        # None for a phase where they differ (each member's own values are then sent one by one).
        self.send_columns = {phase: self._alike_sends(phase) for phase in first.plan.sends[first.name]}
        # The rounds that rewrite members' parameters (averaging, ...): what each moved its members
        # by is measured as columns at logged steps (received/distance, :meth:`_keep_before_round`).
        self.row = {name: i for i, name in enumerate(self.names)}
        self.rewritten = any(m.param_rounds for m in members)
        # Which rounds are due repeats with this period in exchanges (the rewrites' own periods'
        # least common multiple), apart from the first exchange: _rows_rewritten_at's cache key.
        self.round_period = math.lcm(*{r.every for m in members for r, _ in m.param_rounds if r.every} or {1})
        self._round_rows: dict[tuple[int, bool], dict[tuple[str, ...], list[int]]] = {}
        self.before_round: tuple[int, dict[str, torch.Tensor], dict[tuple[str, ...], list[int]]] | None = None
        self.received: torch.Tensor | None = None  # the last round's received/distance, a column (N,), NaN where none
        self.received_rows: set[int] = set()
        self._vmap = vmap
        self.optimizer = first.config.optimizer.name
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = torch.zeros(len(members), dtype=torch.float64, device=self.device)  # each member's optimizer steps, where the update reads them
        self.shared_eval = _same_held_out(members)  # evaluated in one pass over the stack (evaluate)
        # Members' streams over one dataset, each in its own order, are drawn as one (StackedBatches).
        self.batches_alike = StackedBatches.fits([m.batches for m in members])
        self.stacked_batches: StackedBatches | None = None
        self.from_members()

    def _point_at_stack(self, i: int, member) -> None:
        """Make ``member``'s Parameters views of row ``i`` of the stack, in its model and in its
        optimizer (param_groups, and its state re-keyed to them)."""
        old = {id(p): k for k, p in member.model.named_parameters()}
        state = {old[id(p)]: s for p, s in member.optimizer.state.items() if id(p) in old}
        for k in self.keys:
            view = nn.Parameter(self.params[k][i], requires_grad=True)
            _set_parameter(member.model, k, view)
            member.params[k] = view
        for group in member.optimizer.param_groups:
            group["params"] = [member.params[old[id(p)]] for p in group["params"]]
        member.optimizer.state.clear()
        for k, s in state.items():
            member.optimizer.state[member.params[k]] = s

    # -- optimizer state: the stack's, or the members' own -------------------------------------

    def from_members(self) -> None:
        """Take every member's optimizer state (torch's format, in its own optimizer) into the stack,
        after a checkpoint was restored or a donor copied (a restored model is copied into the
        members' Parameters in place, so it is in the stack already)."""
        for i, m in enumerate(self.members):
            if any(m.params[k].data_ptr() != self.params[k][i].data_ptr() for k in self.keys):  # replaced, not copied into
                for k in self.keys:
                    self.params[k][i].copy_(m.params[k].detach())
                self._point_at_stack(i, m)
        # Which of its optimizer's param_groups holds each parameter (a loaded optimizer has new group dicts).
        self.group_index = [
            {k: next(g for g, group in enumerate(m.optimizer.param_groups) if any(p is m.params[k] for p in group["params"])) for k in self.keys}
            for m in self.members
        ]
        names = ("exp_avg", "exp_avg_sq") if self.optimizer in ("adam", "adamw") else ("momentum_buffer",)
        self.state = {k: {n: torch.zeros_like(self.params[k]) for n in names} for k in self.keys}
        # Whether each member holds SGD's momentum buffer of each parameter: torch keeps none while its momentum is 0.
        self.has_momentum = {k: torch.zeros(len(self.members), dtype=torch.bool, device=self.device) for k in self.keys}
        for i, m in enumerate(self.members):
            steps = set()
            for k in self.keys:
                own = m.optimizer.state.get(m.params[k], {})
                for n in names:
                    if own.get(n) is not None:
                        self.state[k][n][i].copy_(own[n])
                        self.has_momentum[k][i] = True
                if "step" in own:
                    steps.add(float(own["step"]))
            self.steps[i] = max(steps) if steps else 0.0
        self.shared_batches = self._one_order()
        self.stacked_batches = StackedBatches([m.batches for m in self.members]) if self.batches_alike and not self.shared_batches else None
        self._share_peers()
        self._read_hyperparameters()

    def _one_order(self) -> bool:
        """Whether every member's batches are the same samples in the same order: streams over
        equal data (:attr:`batches_alike`, found once) at the same settings and position."""
        first = self.members[0].batches
        return self.batches_alike and all(
            (m.batches.shuffle, m.batches.seed, m.batches.epoch, m.batches.offset) == (first.shuffle, first.seed, first.epoch, first.offset)
            for m in self.members
        )

    def _share_peers(self) -> None:
        """Give every member one :class:`~poptrain.training.member.PeerValues`, the union of theirs (they read
        the same peers: :func:`group_key`): a reply is taken in once for all of them, and packed
        once for all their checkpoints. Each member's own live values take the place of its own
        entry there whenever it computes (:meth:`_coupling_terms`)."""
        from poptrain.training.member import PeerValues

        if all(m.peers is self.members[0].peers for m in self.members):
            return
        shared = PeerValues()
        for m in self.members:  # after a restore, each holds what its checkpoint held
            shared.update(m.peers)
        for m in self.members:
            m.peers = shared

    def to_members(self) -> None:
        """Write the stack's optimizer state into every member's own optimizer (copies, in torch's
        format), so that its ``state_dict`` is what training it alone would have made."""
        if self.stacked_batches is not None:  # their data positions, which a checkpoint or an exploit reads
            self.stacked_batches.to_streams()
        steps = self.steps.tolist()  # one read, not one per member
        has_momentum = {k: v.tolist() for k, v in self.has_momentum.items()}
        for i, m in enumerate(self.members):
            m.optimizer.state.clear()
            if steps[i] == 0:
                continue
            for k in self.keys:
                own: dict[str, torch.Tensor | None] = {n: self.state[k][n][i].clone() for n in self.state[k]}
                if self.optimizer in ("adam", "adamw"):
                    own["step"] = torch.tensor(steps[i])
                elif not has_momentum[k][i]:
                    own = {"momentum_buffer": None}
                m.optimizer.state[m.params[k]] = own

    def release_member_copies(self) -> None:
        """Drop the copies :meth:`to_members` wrote into the members' own optimizers once what read
        them (a checkpoint) is done: the stack holds the state, and on a GPU the copies would hold as
        much memory again until the next copy."""
        for m in self.members:
            m.optimizer.state.clear()

    # -- the step ---------------------------------------------------------------------------

    def step_program(self) -> StepProgram:
        """One step of every member of the group (a program, as
        :meth:`poptrain.training.member.MemberTrainer.step_program`); returns their metrics, in order."""
        members = self.members
        step = members[0].step
        exchanging = step % self.every == 0
        inputs, targets = self._batches()
        pending = None
        if exchanging and self.rounds["param"]:
            self._keep_before_round()
            pending = yield from self._send_values("param", lambda kind, key: self.params[key])
        if not members[0].defer_param_replies:  # a round rewrites their parameters: the step computes on the new ones, as apart
            yield from self._receive_all(pending)
            pending = None
        weights = self.loss_weights
        batch_dim = None if self.shared_batches else 0
        masks = self._dropout_masks(inputs, batch_dim) if self.dropouts else {}
        grads, (objectives, (losses, outputs)) = self._vmap(self._grad, in_dims=(0, 0, batch_dim, batch_dim, 0))(self.params, masks, inputs, targets, weights)
        yield from self._receive_all(pending)
        if exchanging and self.rounds["loss"]:  # no non-finite loss goes to the peers
            self._guard_losses(losses)
            yield from self._receive_all((yield from self._send_values("loss", lambda kind, key: losses if kind == "loss" else outputs)))
        couplings = self._coupling_terms(grads, exchanging)
        # What the host needs of the step (every member's loss and objective, whether everything is
        # finite, on a logged step its coupling terms) in one read from the device: on a GPU each
        # read waits for the step to finish.
        logged = self._logged(step)
        columns = {
            "loss": losses.detach(),
            "objective": objectives.detach() + sum(couplings.values()),
            **({f"coupling/{name}": column for name, column in couplings.items()} if logged else {}),
            **({"received/distance": self.received} if self.received is not None else {}),
        }
        self.received = None
        finite = torch.stack([_all_finite(losses), *(_all_finite(c) for c in couplings.values()), *(_all_finite(g) for g in grads.values())])
        read = torch.cat([*(c.to(torch.float64) for c in columns.values()), finite.to(torch.float64)]).tolist()
        count = len(members)
        values = {key: read[j * count : (j + 1) * count] for j, key in enumerate(columns)}
        self._guard_step(losses, couplings, grads, read[len(columns) * count :])
        grad_round = exchanging and self.rounds["grad"]
        if grad_round:  # what reads a member's gradients: its part of the gradient round
            for i, m in enumerate(members):
                for k in self.keys:
                    m.params[k].grad = grads[k][i]
            yield from self._receive_all((yield from self._send_values("grad", lambda kind, key: grads[key])))
            for i, m in enumerate(members):  # a coupling that replaced a gradient (as a member's own, out of the stack)
                for k in self.keys:
                    if m.params[k].grad is not None and m.params[k].grad.data_ptr() != grads[k][i].data_ptr():
                        grads[k][i].copy_(m.params[k].grad)
        self._optimizer_step(grads)
        if members[0].reads_predictions:
            for m in members:
                m.forget_predictions()
        for m in members:
            m.step += 1
        if not logged:  # a step nobody logs or ranks by: what a member's last metrics must hold
            return [{"loss": loss, "objective": objective} for loss, objective in zip(values["loss"], values["objective"], strict=True)]
        norms = members[0].run.tracking.layer_norms_every
        if norms and step % norms == 0:  # after the update, as alone: one more read, on the steps they are due
            norm_columns = self._layer_norms(grads)
            values.update(zip(norm_columns, torch.stack(list(norm_columns.values())).tolist(), strict=True))
        # The logged columns in a member's order: its couplings' terms, then (after what is its own) layer norms.
        order = ([k for k in values if k.startswith("coupling/")], [k for k in values if k.startswith(("weight_norm/", "grad_norm/"))])
        return [self._member_metrics(i, m, values, order, exchanging) for i, m in enumerate(members)]

    def _member_metrics(self, i: int, m, values: dict[str, list[float]], order: tuple[list[str], list[str]], exchanging: bool) -> dict[str, float]:
        """Member ``m``'s (row ``i``'s) metrics of a logged step, the keys in the order a member alone
        logs them (:meth:`poptrain.training.member.MemberTrainer._metrics`): its values from the step's
        columns (``order``: the coupling terms' keys, the layer norms'), and what is its own
        (staleness, hyperparameters, its couplings' own metrics, what a round moved it by)."""
        metrics = {"loss": values["loss"][i], "objective": values["objective"][i]}
        if m.staleness is not None and exchanging:
            metrics["exchange/staleness"] = m.staleness
        metrics.update({key: values[key][i] for key in order[0]})
        if m.hyperparameters is not None:  # the schedule, as a chart
            metrics.update({f"hp/{k}": v for k, v in m.hyperparameters.get().items()})
        metrics.update(m.coupling_extras)
        m.coupling_extras = {}
        if "received/distance" in values and i in self.received_rows:  # a round rewrote it at this step
            metrics["received/distance"] = values["received/distance"][i]
        metrics.update({key: values[key][i] for key in order[1]})
        return metrics

    def _layer_norms(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every member's ``weight_norm/<name>`` and ``grad_norm/<name>`` (L2; per parameter or per
        module, as :meth:`poptrain.training.member.MemberTrainer.layer_norms`), columns over the member
        dimension: the squares summed per member in the parameters' dtype, then in float64 across
        a module's parameters, as a member alone sums them."""
        by_module = self.members[0].run.tracking.layer_norms_by == "module"
        count = len(self.members)
        weights: dict[str, torch.Tensor] = {}
        gradients: dict[str, torch.Tensor] = {}
        for k in self.keys:
            key = k.rsplit(".", 1)[0] if by_module and "." in k else k
            for sums, tensor in ((weights, self.params[k]), (gradients, grads[k])):
                squares = tensor.detach().reshape(count, -1).pow(2).sum(1).to(torch.float64)
                sums[key] = sums[key] + squares if key in sums else squares
        return {**{f"weight_norm/{k}": v.sqrt() for k, v in weights.items()}, **{f"grad_norm/{k}": v.sqrt() for k, v in gradients.items()}}

    def _guard_step(self, losses: torch.Tensor, couplings: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], flags: list) -> None:
        """Stop at the first member with a non-finite value (``failure.nonfinite: fail``, as a member
        alone does: its loss, else its couplings, else its gradient), given the step's finite
        ``flags`` (loss, each coupling column, each gradient); nothing when all are finite."""
        if all(flags):
            return
        if not flags[0]:
            self._guard_losses(losses)
        bad_couplings = [name for name, ok in zip(couplings, flags[1:], strict=False) if not ok]  # the gradients' flags follow
        for i, m in enumerate(self.members) if bad_couplings else ():
            bad = [f"coupling {name!r}" for name in bad_couplings if not torch.isfinite(couplings[name][i])]
            if bad:
                m.refuse_nonfinite(bad)
        for i, m in enumerate(self.members):
            if not all(torch.isfinite(grads[k][i]).all() for k in self.keys):
                m.refuse_nonfinite(["gradient"])

    def evaluate(self) -> dict[str, tuple[dict[str, float], torch.Tensor, torch.Tensor]]:
        """Every member's :meth:`poptrain.training.member.MemberTrainer.evaluate` (its held-out metrics, its
        outputs and the targets, on the CPU), by name: one forward pass of the stack per held-out
        batch where the members hold the same held-out data (``shared_eval``), else member by
        member; {} without held-out data. Stacked outputs match each member's own to float rounding."""
        from torch.func import functional_call

        first = self.members[0]
        if first.eval_dataset is None:
            return {}
        if not self.shared_eval:
            return {m.name: m.evaluate() for m in self.members}
        outputs, targets = [], []
        self.skeleton.eval()  # as a member alone evaluates: its dropout (RowDropout) off
        try:
            with torch.no_grad():
                for batch in in_order(first.eval_dataset, first.held_out.batch_size):
                    *inputs, target = to_device(batch, self.device)
                    stacked = self._vmap(lambda params, inputs=tuple(inputs): functional_call(self.skeleton, params, inputs))(self.params)
                    outputs.append(stacked.detach().float().cpu())
                    targets.append(target.cpu())
        finally:
            self.skeleton.train()
        stacked_outputs, target = torch.cat(outputs, dim=1), torch.cat(targets)
        return {
            m.name: ({f"eval/{key}": float(fn(stacked_outputs[i], target)) for key, fn in first.metric_fns.items()}, stacked_outputs[i], target)
            for i, m in enumerate(self.members)
        }

    def _guard_losses(self, losses: torch.Tensor) -> None:
        """Stop at the first member whose loss is not finite (``failure.nonfinite: fail``, as a
        member alone does); nothing when all are."""
        bad = (~torch.isfinite(losses.detach())).nonzero()
        if len(bad):
            self.members[int(bad[0])].refuse_nonfinite(["term 'loss'"])

    def _logged(self, step: int) -> bool:
        """Whether step ``step``'s metrics are logged (:func:`poptrain.training.member.logs_step`, the rule a
        member alone follows) or ranked by (population-based training ranks by the step before its
        round), or hold layer norms: only then are every member's full metrics worth computing."""
        run = self.members[0].run
        pbt_next = run.pbt is not None and (step + 1) % run.pbt.every == 0
        norms = run.tracking.layer_norms_every
        return logs_step(run, step) or pbt_next or bool(norms and step % norms == 0)

    def _batches(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """This step's batch of every member: ([inputs (N, batch, ...)], targets (N, batch, ...)),
        or one batch for all when every member's stream draws the same samples; members over one
        dataset in orders of their own are drawn in one gather (:class:`StackedBatches`)."""
        if self.shared_batches:
            first = self.members[0].batches
            *inputs, targets = to_device(first.next(), self.device)
            for m in self.members[1:]:  # the same stream: the same position, without drawing again
                m.batches.follow(first)
            return inputs, targets
        if self.stacked_batches is not None:  # every member's own draw in one gather
            stacked = to_device(self.stacked_batches.next(), self.device)
            return stacked[:-1], stacked[-1]
        drawn = [m.batches.next() for m in self.members]
        stacked = to_device(
            [torch.stack(parts) for parts in zip(*drawn, strict=True)], self.device
        )  # stacked first: one copy each to a GPU, not one per member
        return stacked[:-1], stacked[-1]

    def _dropout_calls_for(self, shapes: tuple) -> list[tuple[str, float, tuple]]:
        """The dropout calls of one member's forward on inputs of ``shapes`` (without the member
        dimension), in call order: (buffer name of the mask, p, the input's shape). Found once per
        shape by running the architecture on meta tensors (no memory, no compute)."""
        if shapes not in self._dropout_calls:
            names = {module: name for name, module in self.dropouts.items()}
            calls: list = []
            for module in self.dropouts.values():
                module.calls = calls
            try:
                with torch.no_grad():
                    self.skeleton(*(torch.empty(shape, device="meta") for shape in shapes))
            finally:
                for module in self.dropouts.values():
                    module.calls = None
            called = [names[module] for module, _ in calls]
            if len(set(called)) != len(called):  # refused by vmap_problem: one mask buffer per module
                raise RuntimeError(f"dropout module(s) {sorted({n for n in called if called.count(n) > 1})} are called more than once per forward")
            self._dropout_calls[shapes] = [(f"{names[module]}.mask", module.p, shape) for module, shape in calls]
        return self._dropout_calls[shapes]

    def _dropout_masks(self, inputs: list[torch.Tensor], batch_dim: int | None) -> dict[str, torch.Tensor]:
        """Every member's dropout masks of this step, ``{mask buffer: (N, *input shape)}``: member i's
        drawn from its own stream (its torch generator's state, on its device; what a member alone
        draws its masks from) as torch's dropout draws them, in the order its forward calls them, so
        a member's masks do not depend on its group-mates. Its stream moves on as alone."""
        shapes = tuple(tuple(x.shape[1:]) if batch_dim == 0 else tuple(x.shape) for x in inputs)
        calls = self._dropout_calls_for(shapes)
        like = self.params[self.keys[0]]
        masks = {name: torch.empty((len(self.members), *shape), dtype=like.dtype, device=self.device) for name, _, shape in calls}
        for i, m in enumerate(self.members):
            with m.randomness.torch_stream(self._generator) as stream:
                for name, p, _ in calls:
                    masks[name][i].bernoulli_(1 - p, generator=stream)
        for name, p, _ in calls:
            masks[name].div_(1 - p)
        return masks

    def _alike_sends(self, phase: str) -> dict[tuple[str, str], tuple[int, list[Quantity]]] | None:
        """What every member sends in ``phase`` when it is alike for all of them (:attr:`send_columns`), else None."""
        plan = self.members[0].plan
        sends = {tuple((q.kind, q.key, plan.period[q]) for q in plan.sends[m.name][phase]) for m in self.members}
        if len(sends) != 1:
            return None
        return {(kind, key): (period, [Quantity(m.name, kind, key) for m in self.members]) for kind, key, period in next(iter(sends))}

    def _send_values(self, phase: str, column: Callable[[str, str], torch.Tensor]) -> StepProgram:
        """Every member's values of exchange ``phase`` in one message (:class:`~poptrain.training.lockstep.Send`),
        from the stack's own columns (``column(kind, key)``: every member's value of that quantity,
        row i member i's): one copy of each column due at this exchange where the members send alike,
        its rows their values, else each member's own rows one by one. A non-finite value is refused
        as a member alone refuses it (``failure.nonfinite: fail``, which stacking requires). The group
        books the time as serialization and exchange wait. Returns the pending reply."""
        first, count = self.members[0], len(self.members)
        plan, index = first.plan, first.step // self.every
        started = time.perf_counter()
        values: dict[Quantity, np.ndarray] = {}
        alike = self.send_columns[phase]
        if alike is not None:
            for (kind, key), (period, quantities) in alike.items():
                if index % period:  # not due at this exchange
                    continue
                rows = numpy_copy(column(kind, key))
                finite = np.isfinite(rows.reshape(count, -1)).all(axis=1)
                if not finite.all():
                    bad = int(np.argmin(finite))
                    self.members[bad].refuse_to_send(quantities[bad])
                values.update((q, rows[i, ...]) for i, q in enumerate(quantities))  # [i, ...]: a loss stays a 0-d array
        else:
            for i, m in enumerate(self.members):
                for q in plan.sends[m.name][phase]:
                    if index % plan.period[q]:
                        continue
                    array = numpy_copy(column(q.kind, q.key)[i])
                    if not np.isfinite(array).all():
                        m.refuse_to_send(q)
                    values[q] = array
        sent = time.perf_counter()
        pending = yield Send(phase, first.step, values)
        self.timings["serialize_ms"] += 1000 * (sent - started)
        self.timings["exchange_wait_ms"] += 1000 * (time.perf_counter() - sent)
        return pending

    def _keep_before_round(self) -> None:
        """At a logged step (not the round after the last step) where a round rewrites members'
        parameters: a copy of the stacked parameters it rewrites, as sent, which
        :meth:`_measure_round` compares with what the round left (each member as alone:
        :meth:`poptrain.training.member.MemberTrainer._keep_before_round`). One copy per stacked parameter."""
        first = self.members[0]
        if not self.rewritten or first.step >= first.run.steps or not logs_step(first.run, first.step):
            return
        rows = self._rows_rewritten_at(first.step // self.every)
        if rows:
            self.before_round = (first.step, {k: self.params[k].clone() for k in set().union(*rows)}, rows)

    def _rows_rewritten_at(self, index: int) -> dict[tuple[str, ...], list[int]]:
        """Which parameters the rounds due at exchange ``index`` rewrite, and in which rows: {the
        parameters' names: the rows whose those are}. Worked out once per pattern of due rounds."""
        key = (index % self.round_period, index == 0)
        if key not in self._round_rows:
            rows: dict[tuple[str, ...], list[int]] = {}
            for i, m in enumerate(self.members):
                names = set().union(*(names for rewrite, names in m.param_rounds if rewrite.due(index, False)))
                if names:
                    rows.setdefault(tuple(k for k in self.keys if k in names), []).append(i)
            self._round_rows[key] = rows
        return self._round_rows[key]

    def _take_new_values(self, reply) -> None:
        """A round's new values of the members' own quantities in ``reply``: each stacked parameter
        as one column, written into the rows the round rewrote (all of them, or some: gossip's odd
        member out, an average's target); a replaced gradient into its member's. Then, where the
        step is logged, what the round moved each member by (:meth:`_measure_round`)."""
        rewritten: dict[str, list[tuple[int, Quantity]]] = {}
        for q in reply.replace:
            row = self.row.get(q.member)
            if row is None:
                continue
            if q.kind == "param":
                rewritten.setdefault(q.key, []).append((row, q))
            else:
                self.members[row].take_new_value(q, reply.tensor(q, self.device, replaced=True))
        with torch.no_grad():
            for key, rows in rewritten.items():
                rows.sort()
                stack = self.params[key]
                column = tensor_copy(np.stack([reply.replace[q] for _, q in rows]), self.device).view(len(rows), *stack.shape[1:])
                if len(rows) == len(self.members):
                    stack.copy_(column)
                else:
                    stack.index_copy_(0, torch.tensor([i for i, _ in rows], device=self.device), column.to(stack.dtype))
        if self.before_round is not None and self.before_round[0] == self.members[0].step:
            self._measure_round()

    def _measure_round(self) -> None:
        """``received/distance`` of every member a round rewrote: the Euclidean distance (over the
        parameters it rewrote) between its parameters before and after the round, as a column (N,)
        read with the step's metrics (NaN in the rows it left alone, which log none)."""
        if self.before_round is None:  # nothing kept: no round's distance to measure
            return
        _, before, rows = self.before_round
        self.before_round = None
        count = len(self.members)
        norms = {k: torch.linalg.vector_norm((self.params[k] - value).reshape(count, -1), dim=1, dtype=torch.float64) for k, value in before.items()}
        received = torch.full((count,), float("nan"), dtype=torch.float64, device=self.device)
        for names, members in rows.items():
            index = torch.tensor(members, device=self.device)
            received[index] = torch.linalg.vector_norm(torch.stack([norms[k][index] for k in names]), dim=0)
        self.received = received
        self.received_rows = {i for members in rows.values() for i in members}

    def _receive_all(self, pending) -> StepProgram:
        """Take in one reply for every member: the peers' values made tensors once for all of them."""
        if pending is None:
            return
        waited = time.perf_counter()
        reply = yield Wait(pending)
        received = time.perf_counter()
        first = self.members[0]
        first.peers.take_columns(*self._columns_of(reply))  # every member's (_share_peers)
        self._take_new_values(reply)
        if reply.steps:  # async
            for m in self.members:
                m.note_peer_steps(reply.steps, m.step)
        # Profiled as a member alone books it (tracking.profile), for the whole group: the host
        # gives each member its share, and books the rest of a member's share of the step as compute.
        self.timings["exchange_wait_ms"] += 1000 * (received - waited)
        self.timings["serialize_ms"] += 1000 * (time.perf_counter() - received)

    def _columns_of(self, reply) -> tuple[dict[tuple[str, str], tuple[tuple[str, ...], torch.Tensor]], dict[Quantity, torch.Tensor]]:
        """The peers' values in ``reply`` that members read, as columns on the group's device
        (``(kind, key) -> (members, tensor)``, members in population order): one copy to the device
        per column, not one per value. A family whose column holds only values the members read
        is taken as the wire carried it, without a look at each value; the others (values of one
        family whose shapes differ, or some of which nobody here reads) value by value."""
        plan, order = self.members[0].plan, self.population_order
        columns: dict[tuple[str, str], tuple[tuple[str, ...], torch.Tensor]] = {}
        singles: dict[Quantity, torch.Tensor] = {}
        taken = 0
        for family, (names, column) in reply.columns.items():
            if plan.received_by_family.get(family, frozenset()).issuperset(names):
                rows = np.argsort([order[name] for name in names], kind="stable")
                columns[family] = (tuple(names[i] for i in rows), tensor_copy(column if (rows == np.arange(len(rows))).all() else column[rows], self.device))
                taken += len(names)
        if taken == len(reply.values):
            return columns, singles
        by_family: dict[tuple[str, str], list[Quantity]] = {}
        for q in reply.values:
            if q in plan.received and (q.kind, q.key) not in columns:
                by_family.setdefault((q.kind, q.key), []).append(q)
        for family, quantities in by_family.items():
            quantities.sort(key=lambda q: order[q.member])
            arrays = [reply.values[q] for q in quantities]
            if len({(a.shape, a.dtype) for a in arrays}) == 1:
                columns[family] = (tuple(q.member for q in quantities), tensor_copy(np.stack(arrays), self.device))
            else:
                singles.update({q: reply.tensor(q, self.device) for q in quantities})
        return columns, singles

    def _coupling_terms(self, grads: dict[str, torch.Tensor], exchanged_now: bool) -> dict[str, torch.Tensor]:
        """The coupling terms of the members (trained by the same couplings: :func:`group_key`) at
        this step, each on its own parameters and with its own weight; their gradients are added
        to the stacked ones. The parameters the couplings read are stacked leaves of their own,
        handed to the couplings as :class:`~poptrain.couplings.base.Columns` (member i's quantity is
        row i), so one backward gives every member's gradient as one stacked tensor. A coupling
        whose term is joint (``Coupling.term_is_joint``) gives every member's gradient from one
        backward of its value, times each member's own weight; the others, each member's term on
        its own quantities. Between exchanges (``exchanged_now`` false) a joint term is each
        member's own live values against everyone else's exchanged ones
        (:meth:`Coupling.values_against`): a group's members see each other's values as of the
        last exchange, as they would apart. Returns coupling name -> every member's weighted term, a
        column (N,) (detached): every step for terms of members' own, on logged steps for joint ones
        (as each member logs them)."""
        first = self.members[0]
        if not first.training_couplings:
            return {}
        leaves = {k: self.params[k].detach().requires_grad_() for k in self.coupled_keys}
        own = Columns(self.names, {("param", k): leaf for k, leaf in leaves.items()})
        joint = [c for c in first.training_couplings if c.term_is_joint]
        logged, extras = self._logged(first.step), logs_step(first.run, first.step)  # extras: as a member alone has them
        out: dict[str, torch.Tensor] = {}
        if joint and exchanged_now and self.joint_at_exchanges and not logged:
            together = Overlay(own, first.peers)  # everyone's exchanged values, the group's live in their place
            for c in joint:  # one backward each: every member's gradient of the value, then times its own weight
                value = c.value(together)
                if value is not None and value.requires_grad:
                    self._add_gradients(grads, leaves, value, self._weights(c.name))
        elif joint:
            # Each member's own term (logged on logged steps): at an exchange that just sent every
            # value they read, its live values are the exchanged ones, and the rows' gradients are
            # the joint value's; one pass then gives the gradients and what each member logs.
            for c in joint:  # one backward each of the members' own terms, each row times its member's weight
                values = c.values_against(list(self.names), own, first.peers)
                if values is None:
                    continue
                if values.requires_grad:
                    self._add_gradients(grads, leaves, values.sum(), self._weights(c.name))
                if logged:
                    out[c.name] = self._weights(c.name) * values.detach()
        if extras:  # each member's couplings' own metrics, from what it sees, as a member alone has them
            with torch.no_grad():
                for m in self.members:
                    quantities = ChainMap(own.member(m.name), m.peers)
                    m.coupling_extras = {f"coupling/{c.name}/{k}": float(v) for c in m.training_couplings for k, v in c.metrics_for(m.name, quantities).items()}
        # Terms of members' own (mutual learning): each member's on its own live quantities against
        # everyone else's exchanged ones, so row i's gradient reaches member i only, in one call
        # for all of them (Coupling.values_against), each times its own weight.
        total = []
        for c in first.training_couplings if self.own_couplings else ():
            if c.term_is_joint:
                continue
            values = c.values_against(list(self.names), own, first.peers)
            if values is not None:
                weighted = self._weights(c.name) * values
                if weighted.requires_grad:
                    total.append(weighted.sum())
                out[c.name] = weighted.detach()
        if total:
            self._add_gradients(grads, leaves, sum(total))
        return out

    def _weights(self, coupling: str) -> torch.Tensor:
        """Every member's own weight of ``coupling``, a column over the member dimension (:meth:`_read_hyperparameters`)."""
        return self.coupling_weights[coupling]

    def _add_gradients(self, grads: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor], value: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """The gradient of ``value`` with respect to the stacked ``leaves``, added to ``grads``, each
        member's row times its own weight when ``weights`` are given."""
        keys = list(leaves)
        for k, grad in zip(keys, torch.autograd.grad(value, [leaves[k] for k in keys], allow_unused=True), strict=True):
            if grad is not None:
                grads[k] += grad if weights is None else grad * weights.view(-1, *([1] * (grad.dim() - 1)))

    def _read_hyperparameters(self) -> None:
        """Every member's own hyperparameters as columns over the member dimension, on the group's
        device: each parameter's optimizer options (shaped to broadcast over the stack), each
        coupling's weight and the loss's weight. Read from the members' own optimizers, coupling
        objects and term weights, where population-based training, a restore or a user sets them,
        whenever the host hands the stack back its members' state (:meth:`from_members`: after a
        PBT round or a restore), and kept as the stack's own between: a step reads no member."""
        like = self.params[self.keys[0]]
        column = lambda values, shape=(-1,): torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)  # noqa: E731
        read = [
            [
                (g.get("lr", 0.0), g.get("weight_decay", 0.0), g.get("betas", (0.9, 0.999)), g.get("eps", 1e-8), g.get("momentum", 0.0))
                for g in m.optimizer.param_groups
            ]
            for m in self.members
        ]
        self.hyperparameters: dict[str, dict[str, Any]] = {}  # parameter -> option -> column (or, any_*, a bool)
        for k in self.keys:
            rows = [values[index[k]] for values, index in zip(read, self.group_index, strict=True)]
            shape = (-1, *([1] * (self.params[k].dim() - 1)))
            lr, wd, betas, eps, momentum = zip(*rows, strict=True)
            self.hyperparameters[k] = {
                "lr": column(lr, shape),
                "weight_decay": column(wd, shape),
                "eps": column(eps, shape),
                "momentum": column(momentum, shape),
                "beta1": column([b[0] for b in betas], shape),
                "beta2": column([b[1] for b in betas], shape),
                "any_weight_decay": any(wd),
                "any_momentum": any(momentum),
            }  # from the values read, not the device
        self.coupling_weights = {name: column([own[name].weight for own in self.couplings]) for name in self.couplings[0]}
        self.loss_weights = column([m.term_weights["loss"] for m in self.members])

    @torch.no_grad()
    def _optimizer_step(self, grads: dict[str, torch.Tensor]) -> None:
        """torch's single-tensor Adam, AdamW or SGD (``torch.optim``'s formulas), with every
        member's own hyperparameters."""
        self.steps += 1
        columns = self.hyperparameters
        for k in self.keys:
            param, grad, hp = self.params[k], grads[k], columns[k]
            lr, wd = hp["lr"], hp["weight_decay"]
            if self.optimizer == "sgd":
                if hp["any_weight_decay"]:
                    grad = grad.add(param * wd)
                momentum = hp["momentum"]
                if hp["any_momentum"]:
                    buf = self.state[k]["momentum_buffer"]
                    started, on = self.has_momentum[k].view(-1, *([1] * (buf.dim() - 1))), momentum != 0
                    # torch.optim.SGD: a buffer starts as the gradient, and is left alone while momentum is 0.
                    buf.copy_(torch.where(on, torch.where(started, buf * momentum + grad, grad), buf))
                    grad = torch.where(on, buf, grad)
                    self.has_momentum[k] |= on.view(-1)
                param.add_(grad * -lr)
                continue
            beta1, beta2, eps = hp["beta1"], hp["beta2"], hp["eps"]
            if self.optimizer == "adamw":
                param.mul_(1 - lr * wd)
            elif hp["any_weight_decay"]:
                grad = grad.add(param * wd)
            exp_avg, exp_avg_sq = self.state[k]["exp_avg"], self.state[k]["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad * (1 - beta2))
            step = self.steps.view(-1, *([1] * (param.dim() - 1)))
            bias_correction1 = (1 - beta1.double() ** step).to(param.dtype)
            bias_correction2_sqrt = ((1 - beta2.double() ** step) ** 0.5).to(param.dtype)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.add_(exp_avg / denom * (-lr / bias_correction1))


def _all_finite(values: torch.Tensor) -> torch.Tensor:
    """Whether every element of ``values`` is finite, as a 0-d bool tensor (no read from the device):
    the largest magnitude is finite exactly then (a NaN anywhere makes ``amax`` NaN), in two passes
    without the full bool tensor ``isfinite(values).all()`` makes (a fourth of the time at 500 stacked members)."""
    return torch.isfinite(values.abs().amax()) if values.numel() else torch.ones((), dtype=torch.bool, device=values.device)


class _NoRandomness:
    """A stacked group's randomness: nothing to swap (its steps draw nothing at random)."""

    @contextlib.contextmanager
    def active(self):
        yield


def _same_held_out(members: list) -> bool:
    """Whether every member holds the same held-out data: the same settings over equal tensors."""
    first = members[0]
    return all(m.held_out == first.held_out and same_tensor_data(m.eval_dataset, first.eval_dataset) for m in members)


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter | nn.Module) -> None:
    *path, leaf = name.split(".")
    module = model
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, param)
