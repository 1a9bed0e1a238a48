"""A member: one model, its optimizer and data, trained step by step, coupled to its peers.

:class:`MemberTrainer` is plain Python (no Ray): it reaches its peers through a
:class:`poptrain.exchange.links.Link`, so a test can step it in one process against the real
coordinator logic, and :class:`poptrain.training.host.MemberHost`, the Ray actor, carries it in a run.

One step, :meth:`MemberTrainer.train_step`:
  send parameters -> forward -> own terms -> (own backward first) -> receive peers' parameters
  -> exchange losses -> couplings -> backward -> exchange gradients -> gradient transforms
  -> optimizer step.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import numpy as np
import torch

from poptrain.components.batches import BatchStream, in_order, to_device
from poptrain.components.build import (
    apply_frozen,
    build_dataset,
    build_model,
    build_optimizer,
    resolve_grad_transforms,
    resolve_loss,
    resolve_metrics,
    resolve_terms,
)
from poptrain.config.schema import RunConfig
from poptrain.couplings import PopulationInfo, Quantity, build_couplings
from poptrain.couplings.base import Kind
from poptrain.exchange.links import Link
from poptrain.exchange.wire import ExchangePlan, Reply, numpy_copy
from poptrain.pbt.policy import Hyperparameters, pbt_members
from poptrain.training.balancing import TermBalancer
from poptrain.training.lockstep import Send, StepProgram, Wait, run_alone
from poptrain.training.randomness import MemberRandomness, member_seed


class TrainingError(RuntimeError):
    """A failure caused by what the user asked for, found once training runs (names member, step, term)."""


def logs_step(run: RunConfig, step: int) -> bool:
    """Whether step ``step``'s metrics are logged: every ``tracking.log_every``-th step and the
    last. The one rule the host logs by, and by which a member (alone or stacked) computes what
    only logged steps need (its couplings' own metrics)."""
    return step % run.tracking.log_every == 0 or step + 1 == run.steps


def read_scalars(values: Mapping[Any, torch.Tensor]) -> dict[Any, float]:
    """One-element tensors (on one device) as Python floats, read from the device at once: on a GPU
    every read waits for all the work queued there. Exact: each passes through float64, which
    holds every float32, float16 and bfloat16 value."""
    if not values:
        return {}
    device = next(iter(values.values())).device
    read = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in values.values()]).tolist()
    return dict(zip(values, read, strict=True))


class MemberTrainer:
    """One member's model, optimizer, data, objective and couplings; no Ray inside.

    :meth:`connect` gives it its :class:`~poptrain.exchange.links.Link` to the coordinator; then
    :meth:`train_step` runs one step and returns its metrics.
    """

    def __init__(
        self,
        run: RunConfig,
        name: str,
        population: PopulationInfo,
        device: str | torch.device = "cpu",
        couplings: list | None = None,
        plan: ExchangePlan | None = None,
    ):
        """``couplings`` and ``plan``: built once for every member a host carries (a plan is O(N²)
        in a population of N), else built here."""
        self.run, self.name, self.population = run, name, population
        self.config = run.member(name)
        self.device = torch.device(device)
        self.every = run.exchange.every
        self.randomness = MemberRandomness(member_seed(run.seed, run.member_index(name)), self.device)
        with self.randomness.active():  # initialisation (and any randomness in building the data) draws from the member's own streams
            self.model = build_model(self.config.model)
            if self.config.init:
                self.model.load_state_dict(torch.load(self.config.init, map_location="cpu", weights_only=True))
            self.model.to(self.device)
            self.frozen = apply_frozen(self.model, self.config.frozen if self.config.trainable else ["*"])
            self.params = dict(self.model.named_parameters())
            self.optimizer = build_optimizer(self.model, self.config, tagged=run.pbt is not None) if self.config.trainable else None
            data_seed = self.config.data.seed if self.config.data.seed is not None else run.seed
            self.batches = BatchStream(build_dataset(self.config.data), self.config.data.batch_size, self.config.data.shuffle, data_seed)
            self.held_out = self.config.held_out_data()
            self.eval_dataset = build_dataset(self.held_out) if self.held_out is not None else None
        self.loss_fn = resolve_loss(self.config)
        self.term_fns = resolve_terms(self.config)
        self.term_weights = {"loss": self.config.loss_weight, **{t.name: t.signed_weight for t in self.config.terms}}
        self.grad_transforms = resolve_grad_transforms(self.config, list(self.params))
        self.balancer = TermBalancer(self.config.balancing.method, self.config.balancing.momentum, self.config.balancing.eps)
        self.metric_fns = resolve_metrics(run.evaluation, self.loss_fn)
        self.couplings = build_couplings(run.couplings, population) if couplings is None else couplings
        # Population-based training: what explore may change, and whose weights this member carries.
        in_pbt = name in pbt_members(run) and self.optimizer is not None
        self.hyperparameters = Hyperparameters(self, list(run.pbt.hyperparameters)) if in_pbt and run.pbt is not None else None
        self.lineage: list[list] = []  # [step, donor] of every exploit, oldest first

        self.training_couplings = [c for c in self.couplings if name in c.trains]
        self.plan = ExchangePlan.for_run(run, population, self.couplings) if plan is None else plan
        # The rounds that rewrite this member's parameters (averaging, ...): what each moved them by is
        # logged at logged steps (received/distance), measured against a copy of them as sent.
        self.param_rounds = [
            (r, {q.key for q in r.quantities if q.member == name})
            for c in self.couplings
            for r in c.rewrites()
            if r.kind == "param" and any(q.member == name for q in r.quantities)
        ]
        self.before_round: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, its rewritten parameters as sent)
        self.received: dict[str, torch.Tensor] = {}  # received/distance of this step's round, read with its metrics
        self.link: Link | None = None
        # A member whose parameters no coupling replaces computes while the parameter round completes.
        self.defer_param_replies = not any(q.kind == "param" for q in self.plan.replaced[name])
        # Then this member's own objective can be back-propagated before its peers' values arrive.
        self.couplings_read_only_own_params = all(q.kind == "param" for q in self.plan.own_reads[name])
        self.stacking_problem: str | None = None  # why it trains alone though alike members on its host stack (poptrain.training.stacked.form_groups)
        self.peers = PeerValues()  # peers' values from the last exchange (one for a stacked group's members)
        self.reads_predictions = self.plan.predictions_received
        self.coupling_extras: dict[str, float] = {}  # this step's couplings' own metrics (Coupling.metrics_for)
        # Own parameters in memory mapped by the coordinator (poptrain.exchange.mapped_memory): it reads and
        # writes them in place, so they are neither sent nor received.
        self.mapped: set[Quantity] = set()
        # What it last sent, sent again in place of a non-finite value (when steps with one go on).
        self.keeps_last_sent = run.failure.nonfinite != "fail"
        self.last_sent: dict[Quantity, np.ndarray] = {}
        self.staleness: float | None = None
        self.timings: dict[str, float] = {"serialize_ms": 0.0, "exchange_wait_ms": 0.0}  # this step's, for profiling
        # A GPU runs ahead of the Python that queues its work: when profiling, wait for it before an
        # exchange's clock starts, so that its compute is not counted as serialization.
        self.sync_before_timing = run.tracking.profile and self.device.type == "cuda"
        # `failure.nonfinite: fail` stops before a loss exchange could carry a non-finite term; else
        # whether the step's values are finite is read once, with its metrics (_read_step).
        self.checks_terms_before_sending = run.failure.nonfinite == "fail" and name in self.plan.takes_part["loss"]
        self.step = 0
        self.checked_gradient_paths = False
        # `failure.nonfinite: rollback`: (step, model/optimizer/balancer state) that a bad step restores.
        self.rollback_point: tuple[int, dict[str, Any]] | None = None
        if run.failure.nonfinite == "rollback" and self.optimizer is not None:
            self.set_rollback_point(0, self.state_dict())

    def connect(self, link: Link) -> None:
        self.link = link

    @property
    def names(self) -> tuple[str, ...]:
        """The members this trainer stands for when a driver steps it (:mod:`poptrain.training.lockstep`): itself."""
        return (self.name,)

    # -- the step ------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step through this member's own link; returns this step's metrics (raw
        terms, effective weights, couplings). A host carrying several members drives
        :meth:`step_program` instead (:func:`poptrain.training.lockstep.step_together`)."""
        return run_alone(self.step_program(), self)

    def step_program(self) -> StepProgram:
        """One optimizer step as a program that yields its exchanges (:class:`poptrain.training.lockstep.Send`,
        then :class:`~poptrain.training.lockstep.Wait` for the reply) to whoever drives it, and returns the
        step's metrics. The driver resumes it inside :meth:`MemberRandomness.active`, so several
        members' programs can be interleaved at their exchanges in one process."""
        exchanging = self.step % self.every == 0
        *inputs, targets = to_device(self.batches.next(), self.device)
        if not self.config.trainable:
            return (yield from self._untrained_step(exchanging, inputs, targets))
        optimizer = self.optimizer
        assert optimizer is not None  # built for every trainable member
        self.model.train()
        peers_params = (yield from self._send_params()) if exchanging else None
        outputs = self.model(*inputs)
        terms = self._own_terms(inputs, outputs, targets)
        weights = self.balancer.effective_weights(self.term_weights, terms)
        own_objective = sum(weights[n] * terms[n] for n in terms if weights[n] != 0)
        optimizer.zero_grad(set_to_none=True)
        own_done = self._backward_own_first(own_objective, peers_params)
        if peers_params is not None:
            yield from peers_params()
        if exchanging and self.checks_terms_before_sending:  # a read more: no non-finite term may go out
            self.refuse_nonfinite(self._nonfinite_terms(read_scalars(self._finite_flags(terms)), terms))
        if exchanging:
            yield from self._send("loss", terms, outputs)
        coupling_terms = self._coupling_terms(terms, weights, outputs, inputs)
        objective = own_objective + sum(coupling_terms.values())
        grads_finite = self._backward(sum(coupling_terms.values()) if own_done else objective)
        nonfinite, read = self._read_step(terms, coupling_terms, objective, grads_finite)
        if nonfinite:  # skip or rollback: no update, and zero gradients so nothing non-finite is exchanged
            optimizer.zero_grad(set_to_none=True)
        if exchanging:
            yield from self._send("grad")
        if not nonfinite:
            self._transform_gradients()
            optimizer.step()
        self.forget_predictions()
        self.step += 1
        return self._metrics(terms, weights, coupling_terms, objective, nonfinite, exchanging, read)

    def _own_terms(self, inputs, outputs, targets) -> dict[str, torch.Tensor]:
        terms = {"loss": self.loss_fn(outputs, targets)}
        for term in self.config.terms:
            terms[term.name] = self.term_fns[term.name](self.model, *inputs, outputs, targets, **term.fn.kwargs)
        return terms

    def _backward_own_first(self, own_objective, peers_params: Callable | None) -> bool:
        """Back-propagate the member's own objective while the parameter round completes, where the
        couplings read none of its quantities but parameters: gradients add, so the gradient is
        still exact. Whether it did. (A non-finite objective is back-propagated too, unread: the
        step then drops its gradients, :meth:`_read_step`.)"""
        if peers_params is None or not self.couplings_read_only_own_params:
            return False
        if not (isinstance(own_objective, torch.Tensor) and own_objective.requires_grad):
            return False
        own_objective.backward()
        return True

    def _coupling_terms(self, terms, weights, outputs, inputs) -> dict[str, torch.Tensor]:
        """The weighted terms of the couplings that train this member, on its own quantities live
        (in its autograd graph) and its peers' from the last exchange."""
        quantities = dict(self.peers)
        for q in self.plan.own_reads[self.name]:
            quantities[q] = self._own(q, terms, outputs, inputs)
        computed = {c.name: c.term(self.name, quantities) for c in self.training_couplings}
        coupling_terms = {k: v for k, v in computed.items() if v is not None}
        if logs_step(self.run, self.step):
            with torch.no_grad():
                self.coupling_extras = {
                    f"coupling/{c.name}/{k}": float(v) for c in self.training_couplings for k, v in c.metrics_for(self.name, quantities).items()
                }
        if not self.checked_gradient_paths:
            self._check_gradient_paths(terms, weights, coupling_terms)
        return coupling_terms

    def _backward(self, remaining) -> torch.Tensor | None:
        """Back-propagate what is left of the objective (non-finite or not: a step with a non-finite
        value drops its gradients). Whether every gradient is finite, as a 0-dim tensor not read
        yet (:meth:`_read_step`), or None when there is no gradient."""
        if isinstance(remaining, torch.Tensor) and remaining.requires_grad:
            remaining.backward()
        # Every element is finite iff each gradient's min and max are (NaN propagates through
        # them); no temporary, 4x cheaper than abs().max().
        extremes = [x for p in self.params.values() if p.grad is not None and p.grad.numel() for x in torch.aminmax(p.grad.detach())]
        return torch.isfinite(torch.stack(extremes)).all() if extremes else None

    @staticmethod
    def _finite_flags(terms, coupling_terms=None, grads_finite=None) -> dict[tuple, torch.Tensor]:
        """Whether each term, coupling and (``grads_finite``) the gradients are finite, unread."""
        flags: dict[tuple, torch.Tensor] = {("finite", "term", n): torch.isfinite(t.detach()).all() for n, t in terms.items()}
        flags.update({("finite", "coupling", n): torch.isfinite(t.detach()).all() for n, t in (coupling_terms or {}).items()})
        if grads_finite is not None:
            flags[("finite", "gradient")] = grads_finite
        return flags

    @staticmethod
    def _nonfinite_terms(read: Mapping[tuple, float], terms) -> list[str]:
        return [f"term {n!r}" for n in terms if not read[("finite", "term", n)]]

    @staticmethod
    def _metric_values(terms, coupling_terms, objective) -> dict[tuple, torch.Tensor]:
        """The tensors whose values the step's metrics hold."""
        values: dict[tuple, torch.Tensor] = {("term", n): t for n, t in terms.items()}
        values.update({("coupling", n): t for n, t in coupling_terms.items()})
        if isinstance(objective, torch.Tensor):
            values[("objective",)] = objective
        return values

    def _read_step(self, terms, coupling_terms, objective, grads_finite) -> tuple[list[str], dict[tuple, float]]:
        """What the rest of the step needs from the device, in one read (on a GPU each read waits for
        the work queued there): whether its terms, couplings and gradients are finite, and its
        metrics' values. Under ``failure.nonfinite: fail`` it stops the run here: on non-finite
        terms naming only them (as it does before a loss exchange), else on non-finite couplings
        or gradients. Returns the non-finite values' names (``gradient`` only when every term and
        coupling is finite) and the values read."""
        read = read_scalars({**self._finite_flags(terms, coupling_terms, grads_finite), **self._metric_values(terms, coupling_terms, objective)})
        nonfinite = self._nonfinite_terms(read, terms)
        self.refuse_nonfinite(nonfinite)
        nonfinite += [f"coupling {n!r}" for n in coupling_terms if not read[("finite", "coupling", n)]]
        if not nonfinite and grads_finite is not None and not read[("finite", "gradient")]:
            nonfinite.append("gradient")
        self.refuse_nonfinite(nonfinite)
        return nonfinite, read

    def _metrics(self, terms, weights, coupling_terms, objective, nonfinite, exchanging, read: Mapping[tuple, float] | None = None) -> dict[str, float]:
        """The step's metrics. ``read``: the values of ``terms``, ``coupling_terms`` and ``objective``
        as :meth:`_read_step` read them; else they are read here, at once."""
        if read is None:
            read = read_scalars(self._metric_values(terms, coupling_terms, objective))
        metrics = {"loss": read[("term", "loss")], "objective": read[("objective",)] if isinstance(objective, torch.Tensor) else float(objective)}
        if nonfinite:
            metrics["skipped"] = 1.0
            if self.rollback_point is not None:
                metrics["rollback"] = float(self._roll_back())
        if self.staleness is not None and exchanging:
            metrics["exchange/staleness"] = self.staleness
        for name in terms:
            if name != "loss":
                metrics[f"term/{name}"] = read[("term", name)]
            if self.config.balancing.method != "none" or name != "loss":
                metrics[f"weight/{name}"] = weights[name]
        for name in coupling_terms:
            metrics[f"coupling/{name}"] = read[("coupling", name)]
        if self.hyperparameters is not None:  # the schedule, as a chart
            metrics.update({f"hp/{k}": v for k, v in self.hyperparameters.get().items()})
        metrics.update(self.coupling_extras)
        self.coupling_extras = {}
        metrics.update(self._received_metrics())
        every = self.run.tracking.layer_norms_every
        if every and (self.step - 1) % every == 0:
            metrics.update(self.layer_norms())
        return metrics

    def forget_predictions(self) -> None:
        """Peers' predictions are of this step's batch: the next step's batch is another."""
        if not self.reads_predictions:
            return
        for q in [q for q in self.peers if q.kind == "pred"]:
            del self.peers[q]

    def _untrained_step(self, exchanging: bool, inputs, targets) -> StepProgram:
        """A member that is not trained: take part in exchanges (e.g. receive an average), log its loss."""
        self.model.eval()
        # A member whose parameters no coupling replaces (an averaging source) computes while the
        # round completes; a target waits for its new parameters first.
        peers_params = (yield from self._send_params()) if exchanging else None
        with torch.no_grad():
            outputs = self.model(*inputs)
            terms = {"loss": self.loss_fn(outputs, targets)}
        if peers_params is not None:
            yield from peers_params()
        if exchanging:
            yield from self._send("loss", terms, outputs)
            yield from self._send("grad")
        self.forget_predictions()
        self.step += 1
        return {"loss": float(terms["loss"]), **self._received_metrics()}

    def finish_program(self) -> StepProgram:
        """After the last step: one more parameter exchange when a coupling replaces parameters, so
        that averaged targets and shared modules reflect the final weights (a program, as
        :meth:`step_program`)."""
        if self.plan.replaces_params:
            yield from self._send("param")

    def evaluate(self) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """The evaluation metrics on the member's whole held-out set (``{eval/<label>: value}``), and
        its outputs and targets there ([n, ...], on the CPU). In eval mode, without gradients; what
        it draws at random does not change the member's training streams."""
        dataset, held_out = self.eval_dataset, self.held_out
        assert dataset is not None and held_out is not None  # callers evaluate only members with held-out data
        was_training = self.model.training
        self.model.eval()
        output_parts: list[torch.Tensor] = []
        target_parts: list[torch.Tensor] = []
        with torch.no_grad(), self.randomness.borrowed():
            for batch in in_order(dataset, held_out.batch_size):
                *inputs, target = to_device(batch, self.device)
                output_parts.append(self.model(*inputs).detach().float().cpu())
                target_parts.append(target.cpu())
        self.model.train(was_training)
        outputs, targets = torch.cat(output_parts), torch.cat(target_parts)
        return {f"eval/{key}": float(fn(outputs, targets)) for key, fn in self.metric_fns.items()}, outputs, targets

    def set_rollback_point(self, step: int, state: Mapping[str, Any]) -> None:
        """Keep (a copy of) the model, optimizer and balancing state of ``state`` (a :meth:`state_dict`,
        e.g. the checkpoint just written at ``step``) for ``failure.nonfinite: rollback``."""
        # On the CPU: a copy of a GPU member's optimizer state on its GPU would hold twice its
        # parameters' memory there for the whole run; load_state_dict moves it back.
        on_cpu = lambda x: x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else copy.deepcopy(x)  # noqa: E731
        self.rollback_point = (step, _map_tensors({k: state[k] for k in ("model", "optimizer", "balancer")}, on_cpu))

    def _roll_back(self) -> int:
        """Restore the rollback point's model, optimizer and balancing state; the step counter, data
        position and RNGs go on (the bad batch is not met again). Returns the step restored."""
        # Only a step with a rollback point rolls back, and only a trainable member (with an optimizer) steps.
        assert self.rollback_point is not None and self.optimizer is not None
        step, state = self.rollback_point
        self.model.load_state_dict(state["model"])
        # A copy: Optimizer.load_state_dict keeps the given CPU tensors, which its steps then update in place.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.balancer.load_state_dict(state["balancer"])
        return step

    def layer_norms(self) -> dict[str, float]:
        """``weight_norm/<name>`` and ``grad_norm/<name>`` (L2, after gradient transforms) per parameter
        or per module; a parameter without a gradient (frozen) has no ``grad_norm``."""
        by_module = self.run.tracking.layer_norms_by == "module"
        weights: dict[str, float] = {}
        grads: dict[str, float] = {}
        for name, param in self.params.items():
            key = name.rsplit(".", 1)[0] if by_module and "." in name else name
            weights[key] = weights.get(key, 0.0) + float(param.detach().pow(2).sum())
            if param.grad is not None:
                grads[key] = grads.get(key, 0.0) + float(param.grad.detach().pow(2).sum())
        out = {f"weight_norm/{k}": v**0.5 for k, v in weights.items()}
        out.update({f"grad_norm/{k}": v**0.5 for k, v in grads.items()})
        return out

    # -- exchange ------------------------------------------------------------------------------

    def refuse_nonfinite(self, nonfinite: list[str]) -> None:
        """Non-finite values: stop (``failure.nonfinite: fail``) or let the caller skip the step."""
        if nonfinite and self.run.failure.nonfinite == "fail":
            raise TrainingError(
                f"member {self.name!r}, step {self.step}: non-finite {', '.join(nonfinite)} (NaN or inf). Nothing non-finite "
                "was applied or sent to a peer. Set `failure.nonfinite: skip` to skip such steps."
            )

    def _own(self, q: Quantity, terms: Mapping[str, torch.Tensor], outputs: torch.Tensor | None = None, inputs: list | None = None):
        if q.kind == "param":
            return self.params[q.key]
        if q.kind == "loss":
            return terms[q.key]
        if q.kind == "pred" or (q.kind == "local" and q.key == "outputs"):
            return outputs
        if q.kind == "local":  # the step's batch inputs, as the model takes them
            assert inputs is not None  # local quantities are read only by the member's own couplings, which pass them
            return tuple(inputs)
        grad = self.params[q.key].grad
        return grad if grad is not None else torch.zeros_like(self.params[q.key])

    def _send_params(self) -> StepProgram:
        """:meth:`_send` of this member's parameters at an exchange, keeping those a round will rewrite
        first where the step is logged (``received/distance``); the reply deferred unless a round
        rewrites them (the step then computes on the new ones)."""
        if self.param_rounds:
            self._keep_before_round()
        return (yield from self._send("param", defer=self.defer_param_replies))

    def _send(self, kind: str, terms: Mapping[str, torch.Tensor] = {}, outputs: torch.Tensor | None = None, defer: bool = False) -> StepProgram:
        """Send this member's values of exchange ``kind`` (a phase: ``param``, ``loss`` with its
        predictions, ``grad``) and take in the reply: peers' values it reads, new values of its own
        quantities. With ``defer``, the reply is taken in only when the returned program is run
        (the member computes meanwhile); else at once, and None is returned."""
        if self.name not in self.plan.takes_part[kind]:
            return None
        if self.sync_before_timing:
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        mine = {}
        index = self.step // self.every
        for q in self.plan.sends[self.name][kind]:
            if q in self.mapped or index % self.plan.period[q]:  # mapped, or not due at this exchange
                continue
            array = numpy_copy(self._own(q, terms, outputs))
            if not np.isfinite(array).all():
                if not self.keeps_last_sent:
                    self.refuse_to_send(q)
                array = self.last_sent.get(q, np.zeros_like(array))  # a step that goes on past a non-finite value: peers keep the last good one
            if self.keeps_last_sent:
                self.last_sent[q] = array
            mine[q] = array
        sent = time.perf_counter()
        pending = yield Send(kind, self.step, mine)
        self.timings["serialize_ms"] += 1000 * (sent - started)
        self.timings["exchange_wait_ms"] += 1000 * (time.perf_counter() - sent)
        step = self.step

        def receive() -> StepProgram:
            waited = time.perf_counter()
            reply = yield Wait(pending)
            received = time.perf_counter()
            self.take_reply(reply, step)
            self.timings["serialize_ms"] += 1000 * (time.perf_counter() - received)
            self.timings["exchange_wait_ms"] += 1000 * (received - waited)

        if defer:
            return receive
        yield from receive()
        return None

    def refuse_to_send(self, q: Quantity) -> None:
        """Stop the run: own quantity ``q`` is non-finite and would go to the peers (``failure.nonfinite: fail``)."""
        raise TrainingError(
            f"member {self.name!r}, step {self.step}: its {q.kind} {q.key!r} is non-finite (NaN or inf) and would be sent to its peers; "
            "nothing was sent. Set `failure.nonfinite: skip` to send the last finite value instead and skip such steps."
        )

    def take_reply(self, reply: Reply, step: int) -> None:
        """Take in an exchange's reply for ``step``: how old the peers' values are (async), the
        peers' values this member reads, new values of its own quantities."""
        self.note_peer_steps(reply.steps, step)
        receives = self.plan.receives[self.name]
        for q in reply.values:
            if q.member != self.name and q in receives:
                self.peers[q] = reply.tensor(q, self.device)
        for q in reply.replace:
            if q.member == self.name:
                self.take_new_value(q, reply.tensor(q, self.device, replaced=True))
        if self.before_round is not None and self.before_round[0] == step:  # the round's reply: its parameters are the new ones
            self._measure_round()

    def note_peer_steps(self, steps: dict[str, int] | None, step: int) -> None:
        """Async: how old the peers' values of an exchange at ``step`` are, in exchanges (``exchange/staleness``)."""
        peer_steps = [s for member, s in (steps or {}).items() if member != self.name]
        if peer_steps:
            self.staleness = max(0.0, (step - min(peer_steps)) / self.every)

    def _keep_before_round(self) -> None:
        """At a logged step (not the round after the last step) where a round rewrites this member's
        parameters, keep a copy of those it rewrites, as sent: :meth:`_measure_round` compares them
        with what the round left, whether the reply carried the new values or the coordinator
        wrote them into memory it maps. A copy on logged steps only."""
        if self.step >= self.run.steps or not logs_step(self.run, self.step):
            return
        index = self.step // self.every
        names = set().union(*(names for rewrite, names in self.param_rounds if rewrite.due(index, False)))
        if names:
            self.before_round = (self.step, {n: self.params[n].detach().clone() for n in self.params if n in names})

    def _measure_round(self) -> None:
        """``received/distance``: the Euclidean distance (over every parameter the round's couplings
        rewrite) between this member's parameters before and after the round; 0 where the round left
        it as it was (gossip's odd member out). Kept as a tensor, read with the step's metrics."""
        assert self.before_round is not None  # called only for the round whose parameters were kept
        _, before = self.before_round
        self.before_round = None
        norms = [torch.linalg.vector_norm(self.params[n].detach() - value, dtype=torch.float64) for n, value in before.items()]
        self.received = {"received/distance": torch.linalg.vector_norm(torch.stack(norms))}

    def _received_metrics(self) -> dict[str, float]:
        received, self.received = self.received, {}
        return {key: float(value) for key, value in received.items()}

    def take_new_value(self, q: Quantity, value: torch.Tensor) -> None:
        """A round's new value of own quantity ``q`` (a parameter, or a gradient), written in place."""
        param = self.params[q.key]
        if q.kind == "param":
            with torch.no_grad():
                param.copy_(value.view_as(param))
        elif q.kind == "grad":
            param.grad = value.view_as(param).to(param.dtype, copy=True)

    # -- gradients -----------------------------------------------------------------------------

    def _check_gradient_paths(self, terms, weights, coupling_terms) -> None:
        """Every weighted term and every coupling that trains this member must reach a trainable parameter."""
        self.checked_gradient_paths = True
        dead = [f"term {n!r}" for n, t in terms.items() if weights[n] != 0 and not t.requires_grad]
        dead += [f"coupling {n!r}" for n, t in coupling_terms.items() if not t.requires_grad]
        if dead:
            message = (
                f"member {self.name!r}, step {self.step}: {', '.join(dead)} has no gradient path to any trainable "
                "parameter of this member, so it would be added to the objective and train nothing (e.g. a term "
                "rebuilt with torch.tensor(...), a loss of frozen parameters only, or a coupling reading only peers). "
                "Fix the term, or set `gradient_path_check: warn` to go on."
            )
            if self.run.gradient_path_check == "error":
                raise TrainingError(message)
            if self.run.gradient_path_check == "warn":
                warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _transform_gradients(self) -> None:
        for transform, fn, names in self.grad_transforms:
            for name in names:
                param = self.params[name]
                if param.grad is None:
                    continue
                if transform.scale is not None:
                    param.grad.mul_(transform.scale)
                if transform.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_([param], transform.clip_norm)
                if fn is not None:
                    # A transform that builds a new tensor (torch.zeros(...)) makes it on the CPU, in float32.
                    param.grad = fn(name, param, param.grad, **transform.fn.kwargs).to(param.device, param.dtype)

    # -- state -----------------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state_dict as CPU tensors (what ``model.pt`` holds)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bitwise identically: model, optimizer, the member's random
        streams, data position, balancing statistics, the peers' last exchanged values, and the
        step. Tensors and plain containers only, so it loads with ``weights_only=True``."""
        return {
            "step": self.step,
            "model": self.weights(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "batches": self.batches.state_dict(),
            "balancer": self.balancer.state_dict(),
            "peers": self.peers.packed(),
            "last_sent": {quantity_key(q): torch.from_numpy(a.copy()) for q, a in self.last_sent.items()},
            "checked_gradient_paths": self.checked_gradient_paths,
            "rng": self.randomness.state_dict(),
            "hyperparameters": self.hyperparameters.get() if self.hyperparameters is not None else {},
            "lineage": [list(event) for event in self.lineage],
        }

    def load_state_dict(self, state: Mapping[str, Any], unpacked: dict | None = None) -> None:
        """Continue from ``state`` (a :meth:`state_dict`). ``unpacked``: peers' values already
        unpacked by other members restored on this host (by :func:`packed_digest`), shared instead
        of unpacked again: a thousand members' checkpoints of one step hold the same peers."""
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        self.balancer.load_state_dict(state["balancer"])
        digest = packed_digest(state["peers"]) if unpacked is not None else None
        key = None if digest is None else (digest, str(self.device))  # None wherever unpacked is
        values = unpacked.get(key) if unpacked is not None and key is not None else None
        if values is None:
            values = {parse_quantity(k): v.to(self.device) for k, v in unpack_tensors(state["peers"]).items()}
            if unpacked is not None and key is not None:
                unpacked[key] = values
        self.peers = PeerValues(values)
        self.last_sent = {parse_quantity(k): v.numpy() for k, v in state["last_sent"].items()}
        self.checked_gradient_paths = bool(state["checked_gradient_paths"])
        self.randomness.load_state_dict(state["rng"])
        if self.hyperparameters is not None:
            self.hyperparameters.set({k: float(v) for k, v in state.get("hyperparameters", {}).items()})
        self.lineage = [list(event) for event in state.get("lineage", [])]
        self.step = int(state["step"])

    def exploit(self, donor: str, state: Mapping[str, Any], hyperparameters: dict[str, float]) -> None:
        """Become a copy of member ``donor`` (its weights, optimizer state, balancing state and data
        position, from ``state``: :func:`poptrain.pbt.policy.transferable` of its state) with
        ``hyperparameters``, which the optimizer uses from the next step on."""
        optimizer, own_hyperparameters = self.optimizer, self.hyperparameters
        assert optimizer is not None and own_hyperparameters is not None  # only a PBT member, which trains, exploits
        self.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.balancer.load_state_dict(state["balancer"])
        self.batches.load_state_dict(state["batches"])
        own_hyperparameters.set(hyperparameters)
        self.lineage.append([self.step, donor])
        if self.rollback_point is not None:  # a bad step from here on returns to the copy, not to what this member was before it
            self.set_rollback_point(self.step, {"model": self.model.state_dict(), "optimizer": optimizer.state_dict(), "balancer": self.balancer.state_dict()})


def _map_tensors(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every leaf of nested dicts, lists and tuples (rebuilt, not shared)."""
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(v, fn) for v in tree)
    return fn(tree)


_Mutator = TypeVar("_Mutator", bound=Callable[..., Any])


def _changed(method: _Mutator) -> _Mutator:
    """A mutator of :class:`PeerValues` that drops what it made of the values (packed, columns) first."""

    def mutate(self: PeerValues, *args: Any, **kwargs: Any) -> Any:
        self._packed = self._columns = None
        return method(self, *args, **kwargs)

    return cast(_Mutator, mutate)


class PeerValues(dict[Quantity, torch.Tensor]):
    """Quantity -> tensor: the peers' values a member holds from the last exchange, packed for its
    checkpoint and stacked into columns once per change (:meth:`packed`, :meth:`column`). The members of a stacked group hold one of these
    together (they read the same peers), so a checkpoint of a thousand of them packs the
    population's values once, not once per member."""

    _packed: dict[str, Any] | None = None
    _columns: dict[tuple, torch.Tensor] | None = None

    def column(self, kind: Kind, key: str, members: tuple[str, ...]) -> torch.Tensor:
        """``members``' values of ``(kind, key)`` stacked in their order (what
        :func:`poptrain.couplings.base.column_of` asks for), made once per exchange: a coupling
        over a thousand members reads its column at every step between exchanges."""
        if self._columns is None:
            self._columns = {}
        found = self._columns.get((kind, key, members))
        if found is None:
            found = self._columns[(kind, key, members)] = torch.stack([self[Quantity(m, kind, key)] for m in members])
        return found

    def take_columns(self, columns: Mapping[tuple[str, str], tuple[tuple[str, ...], torch.Tensor]], values: Mapping[Quantity, torch.Tensor] = {}) -> None:
        """Take in an exchange's values as columns, ``(kind, key) -> (members, tensor)`` (row i member
        i's value), and ``values`` one by one: each member's entry becomes a view of its row, and
        the column is kept as it came (what a coupling asks for in that order costs nothing more)."""
        rows = dict(values)
        for (kind, key), (members, column) in columns.items():
            # Families of received Quantities (poptrain.training.stacked), so `kind` is a Kind.
            rows.update(zip((Quantity(m, cast(Kind, kind), key) for m in members), column.unbind(0), strict=True))
        self.update(rows)
        self._columns = {(kind, key, members): column for (kind, key), (members, column) in columns.items()}

    def packed(self) -> dict[str, Any]:
        """:func:`pack_tensors` of the values, keyed by :func:`quantity_key` (made again only after a change)."""
        if self._packed is None:
            self._packed = pack_tensors({quantity_key(q): t for q, t in self.items()})
        return self._packed

    __setitem__ = _changed(dict.__setitem__)
    __delitem__ = _changed(dict.__delitem__)
    __ior__ = _changed(dict.__ior__)
    update = _changed(dict.update)
    pop = _changed(dict.pop)
    popitem = _changed(dict.popitem)
    clear = _changed(dict.clear)
    setdefault = _changed(dict.setdefault)


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``tensors`` as one flat CPU tensor per dtype, with their keys, dtypes (each one string, a
    line per tensor) and shapes (``ranks`` and ``dims``, two integer tensors): a member of a
    thousand holds a thousand peers' values, and a checkpoint of a thousand small tensors, or of
    thousands of small lists, takes hundreds of times longer to write and to load (with
    ``weights_only=True``) than one of a few objects."""
    keys: list[str] = []
    ranks: list[int] = []
    dims: list[int] = []
    dtypes: list[str] = []
    flat: dict[str, list[torch.Tensor]] = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        keys.append(key)
        ranks.append(tensor.dim())
        dims.extend(tensor.shape)
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        flat.setdefault(dtypes[-1], []).append(tensor.reshape(-1))
    return {
        "keys": "\n".join(keys),
        "dtypes": "\n".join(dtypes),
        "ranks": torch.tensor(ranks, dtype=torch.int64),
        "dims": torch.tensor(dims, dtype=torch.int64),
        "values": {d: torch.cat(parts) for d, parts in flat.items()},
    }


def unpack_tensors(packed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """What :func:`pack_tensors` packed (the tensors of one dtype are views of one copy of their
    flat tensor), or what it packed before (a list per field) for older checkpoints."""
    if isinstance(packed["keys"], str):
        keys = packed["keys"].split("\n") if packed["keys"] else []
        dtypes = packed["dtypes"].split("\n") if packed["dtypes"] else []
        dims, shapes = packed["dims"].tolist(), []
        for rank in packed["ranks"].tolist():
            shapes.append(dims[:rank])
            dims = dims[rank:]
    else:
        keys, shapes, dtypes = packed["keys"], packed["shapes"], packed["dtypes"]
    counts: dict[str, list[int]] = {d: [] for d in packed["values"]}
    for shape, dtype in zip(shapes, dtypes, strict=True):
        counts[dtype].append(int(np.prod(shape, dtype=np.int64)))
    parts = {d: iter(torch.split(packed["values"][d].clone(), counts[d])) for d in counts}
    return {key: next(parts[dtype]).reshape(shape) for key, shape, dtype in zip(keys, shapes, dtypes, strict=True)}


def packed_digest(packed: Mapping[str, Any]) -> str | None:
    """A digest of what :func:`pack_tensors` packed (None for the older format): members of a
    stacked group restored from one checkpoint step hold the same peers, unpacked once for all."""
    if not isinstance(packed["keys"], str):
        return None
    digest = hashlib.sha256("\0".join([packed["keys"], packed["dtypes"]]).encode())
    for tensor in (packed["ranks"], packed["dims"], *(packed["values"][d] for d in sorted(packed["values"]))):
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def quantity_key(q: Quantity) -> str:
    return f"{q.member}/{q.kind}/{q.key}"


def parse_quantity(key: str) -> Quantity:
    member, kind, name = key.split("/", 2)
    return Quantity(member, cast(Kind, kind), name)  # a key quantity_key wrote, from a Quantity's kind
