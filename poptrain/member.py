"""A member: one model, its optimizer and data, trained step by step, coupled to its peers.

:class:`MemberTrainer` is a plain class (no Ray) so a test can drive it with any exchange
function and one actor could host several; :class:`MemberActor` wraps it in a Ray actor that
exchanges with the coordinator directly (no driver round trip) and ships metrics to tracking.

The data path of one step, in :meth:`MemberTrainer.train_step`:
  exchange parameters -> forward -> own terms -> exchange losses -> couplings -> backward
  -> exchange gradients -> gradient transforms -> optimizer step.
"""

from __future__ import annotations

import copy
import fnmatch
import gc
import inspect
import math
import os
import random
import socket
import time
import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from poptrain import builtins, shared_memory
from poptrain.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, steps_of
from poptrain.config import Component, MemberConfig, RunConfig
from poptrain.channel import CoordinatorClient
from poptrain.coordinator import ExchangePlan, Wire, as_numpy
from poptrain.couplings import PopulationInfo, Quantity, build_couplings
from poptrain.tracking import Item, MetricsOutbox

# exchange(kind, step, member, own_values) -> {"values": {Quantity: array}, "replace": {Quantity: array}},
# or a function without arguments that waits for that reply (the member computes until it needs it).
ExchangeFn = Callable[[str, int, str, dict], "dict | Callable[[], dict]"]


class TrainingError(RuntimeError):
    """A failure caused by what the user asked for, found once training runs (names member, step, term)."""


def member_seed(run_seed: int, index: int) -> int:
    return (run_seed * 1_000_003 + index * 7_919 + 17) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Building a member's parts from its config (also used by the driver's checks on a meta device)


def build_model(spec: Component) -> nn.Module:
    factory = builtins.resolve(builtins.MODELS, spec.name, "model")
    model = factory(**spec.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_dataset(spec: Component) -> Dataset:
    factory = builtins.resolve(builtins.DATASETS, spec.name, "dataset")
    dataset = factory(**spec.kwargs)
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"data {spec.name!r} returned {type(dataset).__name__}, not a map-style torch Dataset")
    if len(dataset) == 0:
        raise ValueError(f"data {spec.name!r} returned an empty dataset")
    return dataset


def matching(names: list[str], patterns: list[str]) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def optimizer_class(cfg: MemberConfig) -> type:
    """The member's optimizer class: a built-in by name, or an import path."""
    name = cfg.optimizer.name
    if ":" in name:
        return builtins.import_path(name)
    if name in builtins.OPTIMIZERS:
        return getattr(torch.optim, builtins.OPTIMIZERS[name])
    raise ValueError(f"unknown optimizer {name!r}; built-ins are {sorted(builtins.OPTIMIZERS)}, or an import path")


def parameter_groups(model: nn.Module, cfg: MemberConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups by name pattern (first match wins), frozen parameters excluded."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    taken: set[str] = set()
    groups: list[dict[str, Any]] = []
    for group in cfg.optimizer.groups:
        names = [n for n in matching([n for n, _ in trainable], group.params) if n not in taken]
        taken.update(names)
        if names:
            params = [p for n, p in trainable if n in names]
            groups.append({"params": params, **({"lr": group.lr} if group.lr else {}), **group.kwargs})
    rest = [p for n, p in trainable if n not in taken]
    if rest:
        groups.append({"params": rest})
    if not groups:
        raise ValueError("every parameter is frozen: there is nothing to optimize")
    return groups


def build_optimizer(model: nn.Module, cfg: MemberConfig) -> torch.optim.Optimizer:
    """One optimizer per member over :func:`parameter_groups`."""
    return optimizer_class(cfg)(parameter_groups(model, cfg), lr=cfg.optimizer.lr, **cfg.optimizer.kwargs)


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
        try:
            cls([], lr=cfg.optimizer.lr, **kwargs)
        except ValueError as exc:
            if "empty parameter list" in str(exc):
                return
            raise
    build_optimizer(model, cfg)


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


class BatchStream:
    """Seeded, resumable batches: epoch e uses permutation(seed, e); the position is (epoch, offset).

    An incomplete last batch of an epoch is dropped; a batch larger than the dataset is clamped.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.size = len(dataset)
        self.batch_size = min(batch_size, self.size)
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self) -> list[torch.Tensor]:
        if self.offset + self.batch_size > self.size:
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        if isinstance(self.dataset, TensorDataset):
            return [t[index] for t in self.dataset.tensors]
        batch = default_collate([self.dataset[int(i)] for i in index])
        return list(batch) if isinstance(batch, (list, tuple)) else [batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)


class TermBalancer:
    """Opt-in balancing of a member's own objective terms (``balancing.method: magnitude``).

    Each term's weight is divided by an exponential moving average of the term's absolute value
    (detached), so every term contributes at a comparable scale whatever its units; the sign
    of the weight (minimize / maximize) is kept. This is the "loss-magnitude normalisation"
    heuristic (cf. Chen et al., GradNorm, ICML 2018, which balances gradient norms instead;
    and Kendall et al., CVPR 2018, uncertainty weighting): cheap, no extra backward pass.
    """

    def __init__(self, method: str, momentum: float, eps: float):
        self.method, self.momentum, self.eps = method, momentum, eps
        self.scale: dict[str, float] = {}

    def effective_weights(self, weights: dict[str, float], terms: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.method == "none":
            return dict(weights)
        out = {}
        for name, weight in weights.items():
            magnitude = abs(float(terms[name].detach()))
            previous = self.scale.get(name)
            if math.isfinite(magnitude):  # a NaN/inf term (skipped by `failure.nonfinite`) must not poison the estimate
                self.scale[name] = magnitude if previous is None else self.momentum * previous + (1 - self.momentum) * magnitude
            elif previous is None:
                self.scale[name] = 1.0
            out[name] = weight / max(self.scale[name], self.eps)
        return out

    def state_dict(self) -> dict[str, float]:
        return dict(self.scale)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.scale = {k: float(v) for k, v in state.items()}


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU copy as a NumPy array: the flat buffer that crosses process boundaries
    (bfloat16 as float32, see :func:`poptrain.coordinator.as_numpy`)."""
    return as_numpy(tensor.detach().to("cpu", copy=True))


def to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A tensor on ``device`` owning its memory (arrays read from Ray's object store are read-only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        tensor = torch.from_numpy(array)
    return tensor.to(device, copy=True)


# --------------------------------------------------------------------------------------------


class MemberTrainer:
    """One member's model, optimizer, data, objective and couplings; no Ray inside.

    ``train_step(exchange)`` runs one step; ``exchange`` is how the member reaches its peers
    (the coordinator actor in a run; any function in a test).
    """

    def __init__(self, run: RunConfig, name: str, population: PopulationInfo, device: str | torch.device = "cpu"):
        self.run, self.name, self.population = run, name, population
        self.config = run.member(name)
        self.index = run.member_names.index(name)
        self.device = torch.device(device)
        self.every = run.exchange.every
        self.seed = member_seed(run.seed, self.index)
        seed_everything(self.seed)

        self.model = build_model(self.config.model)
        if self.config.init:
            self.model.load_state_dict(torch.load(self.config.init, map_location="cpu", weights_only=True))
        self.model.to(self.device)
        self.frozen = apply_frozen(self.model, self.config.frozen if self.config.trainable else ["*"])
        self.params = dict(self.model.named_parameters())
        self.optimizer = build_optimizer(self.model, self.config) if self.config.trainable else None
        data_seed = self.config.data.seed if self.config.data.seed is not None else run.seed
        self.batches = BatchStream(build_dataset(self.config.data), self.config.data.batch_size, self.config.data.shuffle, data_seed)
        self.loss_fn = builtins.resolve(builtins.LOSSES, self.config.loss.name, "loss")
        self.term_fns = {t.name: builtins.resolve(builtins.TERMS, t.fn.name, "term") for t in self.config.terms}
        self.term_weights = {"loss": self.config.loss_weight, **{t.name: t.signed_weight for t in self.config.terms}}
        # Resolved once: (transform, its function or None, the parameter names it selects).
        self.grad_transforms = [
            (t, builtins.import_path(t.fn.name) if t.fn else None, matching(list(self.params), t.params)) for t in self.config.grad_transforms
        ]
        self.balancer = TermBalancer(self.config.balancing.method, self.config.balancing.momentum, self.config.balancing.eps)

        self.couplings = build_couplings(run.couplings, population)
        self.training_couplings = [c for c in self.couplings if name in c.trains]
        self.plan = ExchangePlan(self.couplings, population)
        self.defer_param_replies = not any(q.kind == "param" for q in self.plan.replaced[name])
        # Then this member's own objective can be back-propagated before its peers' values arrive.
        self.couplings_read_only_own_params = all(q.kind == "param" for q in self.plan.reads_for_terms[name] if q.member == name)
        self.peers: dict[Quantity, torch.Tensor] = {}  # peers' values from the last exchange
        # Own parameters in memory shared with the coordinator (poptrain.shared_memory): it reads
        # and writes them in place, so they are neither sent nor received.
        self.shared: set[Quantity] = set()
        self.last_sent: dict[Quantity, np.ndarray] = {}
        self.staleness: float | None = None
        self.timings: dict[str, float] = {"serialize_ms": 0.0, "exchange_wait_ms": 0.0}  # this step's, for profiling
        # A GPU runs ahead of the Python that queues its work: when profiling, wait for it before an
        # exchange's clock starts, so that its compute is not counted as serialization.
        self.sync_before_timing = run.tracking.profile and self.device.type == "cuda"
        self.step = 0
        self.checked_gradient_paths = False
        # `failure.nonfinite: rollback`: (step, model/optimizer/balancer state) that a bad step restores.
        self.rollback_point: tuple[int, dict[str, Any]] | None = None
        if run.failure.nonfinite == "rollback" and self.optimizer is not None:
            self.set_rollback_point(0, self.state_dict())

    # -- the step ------------------------------------------------------------------------------

    def train_step(self, exchange: ExchangeFn) -> dict[str, float]:
        """One optimizer step; returns this step's metrics (raw terms, effective weights, couplings)."""
        exchanging = self.step % self.every == 0
        inputs = [t.to(self.device, non_blocking=True) for t in self.batches.next()]
        *inputs, targets = inputs
        self.model.train(self.config.trainable)
        if not self.config.trainable:
            return self._evaluate_step(exchange, exchanging, inputs, targets)

        # Peers' parameters are first used by the couplings, after this member's own forward and
        # (where the couplings read none of its own quantities but parameters) backward pass: the
        # round completes while it computes, and the gradient is still exact, since gradients add.
        receive_params = self._exchange("param", exchange, {}, defer=self.defer_param_replies) if exchanging else None
        outputs = self.model(*inputs)
        terms = {"loss": self.loss_fn(outputs, targets)}
        for term in self.config.terms:
            terms[term.name] = self.term_fns[term.name](self.model, *inputs, outputs, targets, **term.fn.kwargs)
        bad = [f"term {n!r}" for n, t in terms.items() if not bool(torch.isfinite(t.detach()).all())]
        weights = self.balancer.effective_weights(self.term_weights, terms)
        own_objective = sum(weights[n] * terms[n] for n in terms if weights[n] != 0)
        self.optimizer.zero_grad(set_to_none=True)
        own_backward_first = (
            receive_params is not None and self.couplings_read_only_own_params and not bad
            and isinstance(own_objective, torch.Tensor) and own_objective.requires_grad
        )
        if own_backward_first:
            own_objective.backward()
        if receive_params is not None:
            receive_params()
        self._guard(bad)
        if exchanging:
            self._exchange("loss", exchange, terms)

        quantities = self._quantities(terms)
        coupling_terms = {c.name: c.term(quantities) for c in self.training_couplings}
        coupling_terms = {k: v for k, v in coupling_terms.items() if v is not None}
        if not self.checked_gradient_paths:
            self._check_gradient_paths(terms, weights, coupling_terms)
        objective = own_objective + sum(coupling_terms.values())

        bad += [f"coupling {n!r}" for n, t in coupling_terms.items() if not bool(torch.isfinite(t.detach()).all())]
        remaining = sum(coupling_terms.values()) if own_backward_first else objective
        if isinstance(remaining, torch.Tensor) and remaining.requires_grad and not bad:
            remaining.backward()
        if not bad:
            # Every element is finite iff each gradient's min and max are (NaN propagates through
            # them); one read per gradient and no temporary, 4x cheaper than abs().max().
            extremes = [x for p in self.params.values() if p.grad is not None and p.grad.numel() for x in torch.aminmax(p.grad.detach())]
            if extremes and not bool(torch.isfinite(torch.stack(extremes)).all()):
                bad.append("gradient")
        self._guard(bad)
        if bad:  # skip or rollback: no update, and zero gradients so nothing non-finite is exchanged
            self.optimizer.zero_grad(set_to_none=True)
        if exchanging:
            self._exchange("grad", exchange, {})
        if not bad:
            self._transform_gradients()
            self.optimizer.step()
        self.step += 1

        metrics = {"loss": float(terms["loss"].detach()), "objective": float(objective.detach() if isinstance(objective, torch.Tensor) else objective)}
        if bad:
            metrics["skipped"] = 1.0
            if self.rollback_point is not None:
                metrics["rollback"] = float(self._roll_back())
        if self.staleness is not None and exchanging:
            metrics["exchange/staleness"] = self.staleness
        for name, value in terms.items():
            if name != "loss":
                metrics[f"term/{name}"] = float(value.detach())
            if self.config.balancing.method != "none" or name != "loss":
                metrics[f"weight/{name}"] = weights[name]
        for name, value in coupling_terms.items():
            metrics[f"coupling/{name}"] = float(value.detach())
        every = self.run.tracking.layer_norms_every
        if every and (self.step - 1) % every == 0:
            metrics.update(self.layer_norms())
        return metrics

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

    def _evaluate_step(self, exchange: ExchangeFn, exchanging: bool, inputs, targets) -> dict[str, float]:
        """A member that is not trained: take part in exchanges (e.g. receive an average), log its loss."""
        # A member whose parameters no coupling replaces (an averaging source) computes while the
        # round completes; a target waits for its new parameters first.
        receive_params = self._exchange("param", exchange, {}, defer=self.defer_param_replies) if exchanging else None
        with torch.no_grad():
            outputs = self.model(*inputs)
            terms = {"loss": self.loss_fn(outputs, targets)}
        if receive_params is not None:
            receive_params()
        if exchanging:
            self._exchange("loss", exchange, terms)
            self._exchange("grad", exchange, {})
        self.step += 1
        return {"loss": float(terms["loss"])}

    def finish(self, exchange: ExchangeFn) -> None:
        """After the last step: one more parameter exchange when a coupling replaces parameters, so
        that averaged targets and shared modules reflect the final weights."""
        if self.plan.replaces_params:
            self._exchange("param", exchange, {})

    # -- exchange ------------------------------------------------------------------------------

    def _guard(self, bad: list[str]) -> None:
        """Non-finite values: stop (``failure.nonfinite: fail``) or let the caller skip the step."""
        if bad and self.run.failure.nonfinite == "fail":
            raise TrainingError(
                f"member {self.name!r}, step {self.step}: non-finite {', '.join(bad)} (NaN or inf). Nothing non-finite "
                "was applied or sent to a peer. Set `failure.nonfinite: skip` to skip such steps."
            )

    def _own(self, q: Quantity, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if q.kind == "param":
            return self.params[q.key]
        if q.kind == "loss":
            return terms[q.key]
        grad = self.params[q.key].grad
        return grad if grad is not None else torch.zeros_like(self.params[q.key])

    def _exchange(self, kind: str, exchange: ExchangeFn, terms: Mapping[str, torch.Tensor], defer: bool = False) -> Callable[[], None] | None:
        """Send this member's values of ``kind`` and take in the round's result. With ``defer``, the
        result is taken in only when the returned function is called (the member computes
        meanwhile); else at once, and None is returned."""
        if self.name not in self.plan.participants[kind]:
            return None
        if self.sync_before_timing:
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        mine = {}
        for q in self.plan.sends[self.name][kind]:
            if q in self.shared:
                continue
            array = to_numpy(self._own(q, terms))
            if not np.isfinite(array).all():  # only reachable with `nonfinite: skip`: peers keep the last good value
                array = self.last_sent.get(q, np.zeros_like(array))
            mine[q] = self.last_sent[q] = array
        sent = time.perf_counter()
        reply = exchange(kind, self.step, self.name, mine)
        self.timings["serialize_ms"] += 1000 * (sent - started)
        self.timings["exchange_wait_ms"] += 1000 * (time.perf_counter() - sent)
        step = self.step

        def receive() -> None:
            waited = time.perf_counter()
            result = reply() if callable(reply) else reply  # a callable: the reply is still on its way
            received = time.perf_counter()
            if "steps" in result and result["steps"]:  # async: how old the peers' values are, in exchanges
                self.staleness = max(0.0, (step - min(result["steps"].values())) / self.every)
            for q, array in result["values"].items():
                if q.member != self.name and q in self.plan.receives[self.name]:
                    self.peers[q] = to_tensor(array, self.device)
            for q, array in result["replace"].items():
                if q.member == self.name:
                    self._replace(q, to_tensor(array, self.device))
            self.timings["serialize_ms"] += 1000 * (time.perf_counter() - received)
            self.timings["exchange_wait_ms"] += 1000 * (received - waited)

        if defer:
            return receive
        receive()
        return None

    def _replace(self, q: Quantity, value: torch.Tensor) -> None:
        param = self.params[q.key]
        if q.kind == "param":
            with torch.no_grad():
                param.copy_(value.view_as(param))
        elif q.kind == "grad":
            param.grad = value.view_as(param).to(param.dtype, copy=True)

    def _quantities(self, terms: Mapping[str, torch.Tensor]) -> dict[Quantity, torch.Tensor]:
        """Own quantities live (in the autograd graph), peers' from the last exchange."""
        out = dict(self.peers)
        for q in self.plan.reads_for_terms[self.name]:
            if q.member == self.name:
                out[q] = self._own(q, terms)
        return out

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

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict on the CPU (what ``model.pt`` holds)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bitwise identically: model, optimizer, RNGs, data position,
        balancing statistics, the peers' last exchanged values, and the step. Tensors and plain
        containers only, so it loads with ``weights_only=True``."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "step": self.step,
            "model": self.model_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "batches": self.batches.state_dict(),
            "balancer": self.balancer.state_dict(),
            "peers": {quantity_key(q): t.detach().cpu() for q, t in self.peers.items()},
            "last_sent": {quantity_key(q): torch.from_numpy(a.copy()) for q, a in self.last_sent.items()},
            "checked_gradient_paths": self.checked_gradient_paths,
            "rng": {
                "torch": torch.get_rng_state(),
                # The member's own device only: a restart or resume may see another number of GPUs.
                "cuda": [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else [],
                "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        self.balancer.load_state_dict(state["balancer"])
        self.peers = {parse_quantity(k): v.to(self.device) for k, v in state["peers"].items()}
        self.last_sent = {parse_quantity(k): v.numpy() for k, v in state["last_sent"].items()}
        self.checked_gradient_paths = bool(state["checked_gradient_paths"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][0], self.device)
        numpy_state = rng["numpy"]
        np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
        python_state = rng["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        self.step = int(state["step"])


def _map_tensors(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every leaf of nested dicts, lists and tuples (rebuilt, not shared)."""
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(v, fn) for v in tree)
    return fn(tree)


def quantity_key(q: Quantity) -> str:
    return f"{q.member}/{q.kind}/{q.key}"


def parse_quantity(key: str) -> Quantity:
    member, kind, name = key.split("/", 2)
    return Quantity(member, kind, name)


# --------------------------------------------------------------------------------------------
# The Ray actor


def placement_device() -> tuple[str, list[str]]:
    """The device Ray assigned this process and Ray's ids of its GPUs: ``cuda`` (Ray sets
    CUDA_VISIBLE_DEVICES, so index 0 is the member's own GPU) when it was given GPUs, else
    ``cpu``. Given GPUs that torch cannot use (a CPU-only torch build on a GPU node, a broken
    driver), it warns and trains on the CPU; its placement still names the GPUs it holds."""
    import ray

    # Strings: with CUDA_VISIBLE_DEVICES set before Ray started, Ray hands back its entries, which
    # may be GPU or MIG UUIDs.
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if gpu_ids and torch.cuda.is_available():
        return "cuda", gpu_ids
    if gpu_ids:
        warnings.warn(
            f"poptrain: this member holds GPU(s) {', '.join(gpu_ids)} but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda = {torch.version.cuda}); it trains on the CPU. Install a CUDA build of torch "
            "on this node, or set `resources.num_gpus: 0`.",
            RuntimeWarning,
            stacklevel=2,
        )
    return "cpu", gpu_ids


class MemberActor:
    """Ray actor around :class:`MemberTrainer`; exchanges with the coordinator directly and keeps
    its metrics in an outbox the driver empties (``take_metrics``, called while ``train`` runs:
    the actor has two threads)."""

    def __init__(self, run: RunConfig, name: str, population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool = False):
        self._start(run, name, population, coordinator_name, num_cpus, run_dir, system_metrics)

    def rebind(self, run: RunConfig, name: str, population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool = False) -> dict[str, Any]:
        """Become member ``name`` of another run in this process (a warm process, see
        :mod:`poptrain.pool`): everything the last run's member held is let go and built anew from
        the arguments, exactly as a new process would build it. Returns :meth:`info`."""
        self.park()
        self._start(run, name, population, coordinator_name, num_cpus, run_dir, system_metrics)
        return self.info()

    def park(self) -> None:
        """Let go of the finished run (model, optimizer, data, shared memory, the GPU's cached
        blocks, the connection to its coordinator) while this warm process waits for the next."""
        if self.coordinator is not None:
            self.coordinator.close()
        self.coordinator = self.trainer = self.outbox = self.wire = None
        self.in_flight = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _start(self, run: RunConfig, name: str, population: PopulationInfo, coordinator_name: str, num_cpus: float, run_dir: str, system_metrics: bool) -> None:
        import ray

        device, gpu_ids = placement_device()
        torch.set_num_threads(max(1, int(num_cpus)))
        self.trainer = MemberTrainer(run, name, population, device)
        self.run_dir = run_dir
        self.wire = Wire(self.trainer.plan)
        coordinator = ray.get_actor(coordinator_name)
        self.coordinator = CoordinatorClient(coordinator, ray.get(coordinator.channel.remote()), run.exchange.timeout_s)
        shareable = self.trainer.plan.coordinator_only[name]
        if shareable and run.exchange.shared_memory and device == "cpu":
            self._share_parameters(coordinator, shareable, coordinator_name.rsplit("-", 1)[-1])
        self.in_flight: dict[str, Any] = {}  # async mode: per kind, the reference to the last publish
        # A fresh run starts with no checkpoint of its own; a resumed run, or the new process the driver
        # starts for a member whose process died, continues from its newest one, metrics not yet
        # written included.
        self.restored_from = None
        self.outbox = MetricsOutbox()
        saved = steps_of(run_dir, name)
        if saved:
            state = load_checkpoint(checkpoint_path(run_dir, name, saved[-1]))
            self.trainer.load_state_dict(state)
            self.outbox = MetricsOutbox(state.get("metrics", []))
            self.restored_from = saved[-1]
            if self.trainer.rollback_point is not None:
                self.trainer.set_rollback_point(saved[-1], state)
        self.log_every = run.tracking.log_every
        self.system_metrics = system_metrics
        self.system_metrics_every_s, self.last_system_sample = 10.0, float("-inf")
        self.placement = {
            "node_id": _node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": device,
            "gpu_ids": ",".join(map(str, gpu_ids)),
            "torch_threads": torch.get_num_threads(),
            "shared_params": len(self.trainer.shared),  # parameters in memory shared with the coordinator
        }

    def _share_parameters(self, coordinator, names: list[str], run_tag: str) -> None:
        """Keep ``names`` in memory shared with the coordinator when it is on this node (see
        :mod:`poptrain.shared_memory`); else, or without room in ``/dev/shm``, send copies."""
        import ray

        name = self.trainer.name
        layout = shared_memory.share_parameters(self.trainer.params, names, f"{run_tag}-{name}", _node_id())
        if layout is None:
            return
        if ray.get(coordinator.attach.remote(name, layout)):
            self.trainer.shared = {Quantity(name, "param", n) for n in names}
        else:
            shared_memory.release(layout)

    def restored_step(self) -> int | None:
        return self.restored_from

    def _system_metrics(self) -> dict[str, float]:
        """CPU, memory (and GPU memory) of this member's process, under MLflow's `system/` prefix."""
        import psutil

        self.last_system_sample = time.monotonic()
        process = psutil.Process()
        out = {
            "system/cpu_utilization_percentage": process.cpu_percent(interval=None),
            "system/process_memory_rss_megabytes": process.memory_info().rss / 2**20,
            "system/system_memory_usage_percentage": psutil.virtual_memory().percent,
        }
        if self.trainer.device.type == "cuda":
            out["system/gpu_memory_allocated_megabytes"] = torch.cuda.memory_allocated(self.trainer.device) / 2**20
            out["system/gpu_memory_reserved_megabytes"] = torch.cuda.memory_reserved(self.trainer.device) / 2**20
        return out

    def info(self) -> dict[str, Any]:
        return dict(self.placement)

    def _exchange(self, kind: str, step: int, member: str, values: dict):
        """The member's way to the coordinator: values and replies cross as :class:`Wire` tuples. In
        ``sync`` mode it returns a function that waits for the round's reply (the trainer calls it
        when it needs the peers' values); in ``async`` mode, the reply itself."""
        exchange = self.trainer.run.exchange
        wire = self.wire.pack(values)
        if exchange.mode == "sync":
            reply = self.coordinator.call("exchange", kind, step, member, wire)
            return lambda: self._unpack(reply())
        if exchange.max_staleness > 0 and kind in self.in_flight:
            # Pipelined: the reply to this publish is used at the member's next exchange, so it
            # never waits out a round trip. The coordinator holds a reply until the peers are within
            # `max_staleness` of the step it will be used at, so the bound holds where it matters.
            used_at = step + self.trainer.every
            reply = self.coordinator.call("publish", kind, step, member, wire, used_at if used_at < self.trainer.run.steps else step)
            previous, self.in_flight[kind] = self.in_flight[kind], reply
            return self._unpack(previous())
        # The first exchange of a kind (or `max_staleness: 0`): wait for this publish's own reply.
        result = self.coordinator.call("publish", kind, step, member, wire)()
        if exchange.max_staleness > 0 and step + self.trainer.every < self.trainer.run.steps:
            # Start the pipeline: the next exchange uses this second publish's reply.
            self.in_flight[kind] = self.coordinator.call("publish", kind, step, member, wire, step + self.trainer.every)
        return self._unpack(result)

    def _unpack(self, result) -> dict:
        import ray

        if isinstance(result, list):  # large payloads come as one shared object reference
            result = ray.get(result[0])
        return self.wire.unpack_result(result)

    def train(self, until_step: int) -> dict[str, float]:
        """Train up to ``until_step``; metrics go to the outbox. Returns the last step's metrics."""
        metrics: dict[str, float] = {}
        every, keep = self.trainer.run.checkpoint.every, self.trainer.run.checkpoint.keep
        profile = self.trainer.run.tracking.profile
        logging_ms = checkpoint_ms = 0.0
        while self.trainer.step < until_step:
            step = self.trainer.step
            if every and step % every == 0 and step != self.restored_from and step > 0:
                started = time.perf_counter()
                # The metrics not yet in MLflow go into the checkpoint: a restart from it sends them again.
                state = self.trainer.state_dict()
                save_checkpoint({**state, "metrics": self.outbox.unwritten()}, self.run_dir, self.trainer.name, step, keep)
                if self.trainer.rollback_point is not None:
                    self.trainer.set_rollback_point(step, state)
                checkpoint_ms = 1000 * (time.perf_counter() - started)
            self.trainer.timings = dict.fromkeys(self.trainer.timings, 0.0)
            started = time.perf_counter()
            metrics = self.trainer.train_step(self._exchange)
            if profile:
                step_ms = 1000 * (time.perf_counter() - started)
                metrics.update({f"profile/{k}": v for k, v in self.trainer.timings.items()})
                metrics["profile/compute_ms"] = step_ms - sum(self.trainer.timings.values())
                metrics["profile/logging_ms"], metrics["profile/checkpoint_ms"] = logging_ms, checkpoint_ms
                checkpoint_ms = 0.0
            started = time.perf_counter()
            if self.system_metrics and time.monotonic() - self.last_system_sample >= self.system_metrics_every_s:
                metrics.update(self._system_metrics())
            if step % self.log_every == 0 or self.trainer.step == until_step:
                now_ms = int(time.time() * 1000)
                self.outbox.add([(key, value, step, now_ms) for key, value in metrics.items()])
            logging_ms = 1000 * (time.perf_counter() - started)
        if self.trainer.step == self.trainer.run.steps:
            self.trainer.finish(self._exchange)
        # The last pipelined publishes: done before train() returns, so their coupling metrics are
        # in the coordinator's outbox when the driver takes it for the last time.
        for reply in self.in_flight.values():
            reply()
        self.in_flight.clear()
        return metrics

    def take_metrics(self, written: bool, resend: bool = False) -> list[Item]:
        """The metrics since the last call; ``written``: everything taken before is in MLflow;
        ``resend``: the last reply was lost, send its items again."""
        return self.outbox.take(written, resend)

    def model_state(self) -> dict[str, np.ndarray]:
        """The final state_dict as NumPy arrays (bfloat16 as float32, see :func:`to_numpy`)."""
        return {k: to_numpy(v) for k, v in self.trainer.model.state_dict().items()}

    def example_inputs(self, n: int = 4) -> np.ndarray | None:
        """A few inputs from the member's data (the logged model's input example); None for multi-input models."""
        dataset = self.trainer.batches.dataset
        batch = default_collate([dataset[i] for i in range(min(n, len(dataset)))])
        return to_numpy(batch[0]) if len(batch) == 2 else None


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
