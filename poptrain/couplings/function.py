"""Couplings written as functions: :func:`coupling_function` turns a function of named quantities
into a coupling class, registered by name like any other.

    @coupling_function("slope_gap", reads={"a": {"member": "m1", "param": "activation.weight"},
                                           "b": {"member": "m2", "param": "activation.weight"}})
    def slope_gap(a, b):
        return torch.relu(2 - (a - b).abs().sum())

The function is called with one keyword argument per read (the quantity's tensor) and returns
the coupling's value, a 0-dim floating-point tensor. What it reads is declared, never inferred
from the function: in the decorator, in the config (``reads:``, which replaces the decorator's
read of the same name, so one function serves several pairs of members), or both. The result is
an ordinary :class:`~poptrain.couplings.base.Coupling`: ``members`` (default: the members it
reads), ``trains`` and ``weight`` come from the config as for every coupling, and its term is
the joint one (``term_is_joint``), so with ``exchange.every: 1`` in ``sync`` mode its gradients
are the single-process joint objective's.

Before anything starts, the check refuses reads of unknown members, parameters or terms, and
reads of the predictions of members whose batches are not the same samples; then it calls the
function once on zeros of its reads' shapes: it must return a 0-dim floating-point tensor and
not raise.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationError, model_validator

from poptrain.config.errors import Reason
from poptrain.config.schema import CouplingConfig, Strict
from poptrain.couplings.base import Coupling, Quantity, register

# Up to this many elements in all, the trial call gets real zeros (64 MiB of float32); above, it
# gets meta tensors, which cost nothing but cannot be read (a function whose control flow
# depends on its arguments' values is then not evaluated).
TRIAL_ELEMENTS = 1 << 24
NAME = re.compile(r"^[^\W\d]\w*$")


class Read(Strict):
    """One quantity a function coupling reads, passed to the function as the argument of its name."""

    member: str = Field(description="Member whose quantity it is.")
    param: str | None = Field(None, description="A parameter's name, e.g. `activation.weight` (read before the forward pass).")
    loss: str | None = Field(None, description="`loss` (the member's task loss) or the name of one of its `terms` (read after the forward pass).")
    pred: Literal["outputs"] | None = Field(
        None,
        description="`outputs`: the member's predictions on the step's batch, (batch, *outputs), read after the forward pass; members "
        "whose predictions one coupling reads must see the same samples in the same order (checked), and `exchange.mode` must be `sync`.",
    )

    @model_validator(mode="after")
    def _one_quantity(self) -> Read:
        if sum(x is not None for x in (self.param, self.loss, self.pred)) != 1:
            raise ValueError(
                f"give exactly one of `param` (a parameter's name), `loss` (`loss` or a term's name) or `pred: outputs` for member {self.member!r}"
            )
        return self

    @property
    def quantity(self) -> Quantity:
        if self.param is not None:
            return Quantity(self.member, "param", self.param)
        return Quantity(self.member, "loss", self.loss) if self.loss is not None else Quantity(self.member, "pred", "outputs")  # pred: the one value it takes

    def __str__(self) -> str:
        if self.param is not None:
            return f"parameter {self.param!r} of member {self.member!r}"
        return f"{self.loss!r} of member {self.member!r}" if self.loss is not None else f"the predictions of member {self.member!r}"


class FunctionCouplingConfig(CouplingConfig):
    """Fields of a coupling made from a function by `poptrain.couplings.coupling_function`."""

    reads: dict[str, Read] = Field(
        default_factory=dict,
        description="What the function gets, by argument name: `{a: {member: m1, param: activation.weight}, b: {member: m2, loss: loss}}`. "
        "Each replaces the decorator's read of the same name; the decorator's others are kept.",
    )


class FunctionCoupling(Coupling[FunctionCouplingConfig]):
    """A coupling whose value is ``fn(**{name: quantity})`` (see the module). Made by
    :func:`coupling_function`, one subclass per function."""

    Config = FunctionCouplingConfig
    config: FunctionCouplingConfig
    term_is_joint = True  # value_for is value, or None on a step without the predictions it reads
    fn: ClassVar[Callable[..., Any]]
    declared_reads: ClassVar[dict[str, Read]] = {}

    def __init__(self, config: FunctionCouplingConfig, population):
        super().__init__(config, population)
        self.arguments: dict[str, Quantity] = {name: read.quantity for name, read in self.reads_of(config).items()}

    @classmethod
    def reads_of(cls, config: FunctionCouplingConfig) -> dict[str, Read]:
        """The reads by argument name: the decorator's, each replaced by the config's of the same name."""
        return {**cls.declared_reads, **config.reads}

    @classmethod
    def default_members(cls, config: FunctionCouplingConfig, population) -> list[str]:
        """The members it reads, in the order its reads name them."""
        return list(dict.fromkeys(read.member for read in cls.reads_of(config).values()))

    def reads(self) -> list[Quantity]:
        return list(dict.fromkeys(self.arguments.values()))  # read under two names, sent once

    def value(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor:
        result = type(self).fn(**{name: q[quantity] for name, quantity in self.arguments.items()})
        wrong = self._wrong_result(result)
        if wrong:
            raise TypeError(f"coupling {self.name!r}: {wrong}")
        return result

    def value_for(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """:meth:`value`; None on a step without the predictions it reads (between exchanges with
        ``exchange.every > 1``: predictions are valid only for the batch they were made on)."""
        if any(quantity not in q for quantity in self.arguments.values()):
            return None
        return self.value(q)

    # -- checks ----------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: FunctionCouplingConfig, run) -> list[tuple[str, str]]:
        label, names = config.label, run.member_names
        reads = cls.reads_of(config)
        if not reads:
            return [
                (
                    "reads",
                    f"coupling {label!r} ({_described(cls.fn)}) reads nothing: give `reads: {{<argument>: {{member: ..., param: ...}}}}` "
                    "here or in its decorator",
                )
            ]
        problems = []
        for argument, read in reads.items():
            if not NAME.match(argument):
                problems.append((f"reads.{argument}", f"coupling {label!r}: {argument!r} is not a Python argument name"))
            if read.member not in names:
                problems.append(
                    (
                        f"reads.{argument}.member",
                        f"coupling {label!r} reads {read} under {argument!r}, but there is no member {read.member!r}; members are {names}",
                    )
                )
        try:
            inspect.signature(cls.fn).bind(**dict.fromkeys(reads))
        except TypeError as exc:
            problems.append(("reads", f"coupling {label!r}: {_described(cls.fn)} cannot be called with its reads {sorted(reads)} as arguments: {exc}"))
        except ValueError:  # no signature to read (a builtin): the trial call checks it
            pass
        if run.exchange.mode == "async" and any(read.pred is not None for read in reads.values()):
            problems.append(("reads", f"coupling {label!r} reads predictions, which compare members on the same batch: use `exchange.mode: sync`"))
        read_members = cls.default_members(config, None)
        if config.members is not None:
            missing = [m for m in read_members if m not in config.members]
            unread = [m for m in config.members if m not in read_members]
            if missing or unread:
                problems.append(
                    (
                        "members",
                        f"coupling {label!r} reads members {read_members}, so its `members` must be those: "
                        f"{f'missing {missing}' if missing else ''}{'; ' if missing and unread else ''}{f'reads nothing of {unread}' if unread else ''}",
                    )
                )
        elif config.trains is not None:
            for member in config.trains:
                if member in names and member not in read_members:
                    problems.append(("trains", f"coupling {label!r} trains member {member!r} but reads nothing of it (it reads {read_members})"))
        return problems

    def check_population(self) -> list[tuple[str, str]]:
        """Every read exists, then one trial call on zeros of the reads' shapes (meta tensors when
        they are large) returns a 0-dim floating-point tensor."""
        problems, trial = [], {}
        for argument, read in self.reads_of(self.config).items():
            if read.param is not None:
                lacking = self.population.lacks_param(self.name, read.member, read.param)
                if lacking:
                    problems.append((f"reads.{argument}", lacking))
                    continue
                trial[argument] = self.population.param_shapes[read.member][read.param]
            elif read.loss is not None:
                terms = self.population.terms.get(read.member, ["loss"])
                if read.loss not in terms:
                    problems.append(
                        (
                            f"reads.{argument}",
                            f"coupling {self.name!r} reads {read.loss!r} of member {read.member!r}, which has no such "
                            f"loss or term; its losses and terms are {terms}",
                        )
                    )
                    continue
                trial[argument] = ()
            else:
                trial[argument] = (self.population.samples[read.member]["batch_size"], *self.population.outputs[read.member])
        predicted = list(dict.fromkeys(read.member for read in self.reads_of(self.config).values() if read.pred is not None))
        for member in predicted[1:]:
            unaligned = self.population.unaligned_batches(predicted[0], member)
            if unaligned:
                problems.append(("reads", f"coupling {self.name!r} reads their predictions, but {unaligned}"))
        return problems or self._trial_call(trial)

    def _trial_call(self, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
        device = "cpu" if sum(math.prod(s) for s in shapes.values()) <= TRIAL_ELEMENTS else "meta"
        arguments = {name: torch.zeros(shape, device=device) for name, shape in shapes.items()}
        try:
            result = type(self).fn(**arguments)
        except Exception as exc:  # the user's function: show what it raised, and where
            if device == "meta" and (isinstance(exc, NotImplementedError) or "meta" in str(exc)):
                return []  # it reads its arguments' values, which meta tensors lack: not evaluated here
            shown = ", ".join(f"{n}={list(s)}" for n, s in shapes.items())
            return [
                (
                    "",
                    Reason.of(
                        f"coupling {self.name!r}: {_described(type(self).fn)} raised {type(exc).__name__}: {exc} when called on zeros "
                        f"of its reads' shapes ({shown}); its traceback follows",
                        exc,
                    ),
                )
            ]
        wrong = self._wrong_result(result)
        return [("", f"coupling {self.name!r}: {wrong}")] if wrong else []

    @classmethod
    def _wrong_result(cls, result: Any) -> str | None:
        """Why ``result`` cannot be a coupling's value, or None."""
        what = _described(cls.fn)
        if not isinstance(result, torch.Tensor):
            shown = repr(result)
            return (
                f"{what} returns {type(result).__name__} {shown[:60]}{'...' if len(shown) > 60 else ''}, not a tensor: return a 0-dim "
                "tensor computed from its arguments, so that the coupling has a gradient"
            )
        if result.dim() != 0:
            return f"{what} returns a tensor of shape {list(result.shape)}, not a scalar: a coupling's value is a 0-dim tensor (reduce it, e.g. with `.sum()`)"
        if not result.is_floating_point():
            return f"{what} returns a {result.dtype} tensor: a coupling's value must be floating point to have a gradient"
        return None


def _described(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def coupling_function(name: str, reads: Mapping[str, Mapping | Quantity] | None = None) -> Callable[[Callable], type[FunctionCoupling]]:
    """Decorator: make ``fn(**quantities) -> 0-dim tensor`` the coupling ``type: <name>``.

    ``reads``: argument name -> what it gets, ``{"member": ..., "param": <parameter name>}`` or
    ``{"member": ..., "loss": "loss" | <term name>}`` or ``{"member": ..., "pred": "outputs"}`` (or a
    :class:`Quantity` of one of those kinds); a config's ``reads`` replaces those of the same name. Returns the coupling class
    (a :class:`FunctionCoupling`, the function as its ``fn``), which the module keeps under the
    function's name, so ``type: package.module:<function name>`` names it too.
    """
    if not NAME.match(name):
        raise ValueError(f"coupling name {name!r} must be a Python identifier, as `couplings[].type` names it")
    declared: dict[str, Read] = {}
    for argument, spec in (reads or {}).items():
        if isinstance(spec, Quantity):
            if spec.kind not in ("param", "loss", "pred"):
                raise ValueError(f"coupling {name!r}: read {argument!r} is a {spec.kind!r} quantity; function couplings read `param`, `loss` or `pred`")
            spec = {"member": spec.member, spec.kind: spec.key}
        try:
            declared[argument] = Read.model_validate(spec)
        except ValidationError as exc:
            raise ValueError(f"coupling {name!r}: read {argument!r} {spec!r} is not a read: {exc}") from None

    def decorate(fn: Callable) -> type[FunctionCoupling]:
        if not callable(fn):
            raise TypeError(f"coupling_function({name!r}) decorates a function, not {type(fn).__name__}")
        module, qualname = getattr(fn, "__module__", __name__), getattr(fn, "__qualname__", name)
        # A Config class of its own, reachable as `<module>.<function name>.Config`: a process that
        # receives a run's config (Ray's workers) unpickles it by that reference, which imports the
        # function's module and so registers the name there too.
        config = type(
            f"{fn.__name__}Config",
            (FunctionCouplingConfig,),
            {"__module__": module, "__qualname__": f"{qualname}.Config", "__doc__": FunctionCouplingConfig.__doc__},
        )
        cls = type(
            fn.__name__,
            (FunctionCoupling,),
            {
                "__module__": module,
                "__qualname__": qualname,
                "__doc__": fn.__doc__,
                "Config": config,
                "fn": staticmethod(fn),
                "declared_reads": declared,
            },
        )
        return register(name)(cls)

    return decorate
