"""The typed schema of a population run.

A run is described by one YAML file that maps one-to-one onto :class:`RunConfig`.
``KEY=VALUE`` overrides (dotted keys, list indices or member names:
``members.0.optimizer.lr=0.01`` or ``members.m1.optimizer.lr=0.01``) are applied to
the raw YAML before validation, so an override is checked exactly like the file.

Every problem a user can cause is raised as :class:`ConfigError`, which names the
file, the dotted key and the reason; the CLI turns it into exit code 2.
The field descriptions below are the config reference (``poptrain schema`` prints them).
"""

from __future__ import annotations

import json
import os
import re
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from poptrain import objects, variation
from poptrain.registry import COUPLINGS, resolve_coupling
from poptrain.variation import Draw

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = "must be 1-64 characters of letters, digits, `_`, `.` or `-`, starting with a letter or digit"


def _check_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(NAME_RULE)
    return value


# Names of runs, members, terms and couplings: they become folder names and MLflow metric keys.
Name = Annotated[str, AfterValidator(_check_name)]
# A built-in name (`mse`) or an import path `package.module:attr` of dotted Python identifiers; the
# attribute's parts may be `<locals>` or `<lambda>`, as Python names what a function defines (the
# recorded name of an object given from Python, which no import finds).
IMPORT_PATTERN = re.compile(r"^[^\W\d]\w*(\.[^\W\d]\w*)*(:([^\W\d]\w*|<[^\W\d]\w*>)(\.([^\W\d]\w*|<[^\W\d]\w*>))*)?$")
IMPORT_RULE = "must be a built-in name or an import path `package.module:attr` (dotted Python identifiers)"
MAX_SEED = 2**32 - 1
MAX_TIMEOUT_S = 1_000_000.0
MAX_COPIES = variation.MAX_MEMBERS_PER_ENTRY
# Limits of a config file: far above any real config, far below what would hang or exhaust the driver.
MAX_CONFIG_BYTES = 256 * 1024  # pure-Python PyYAML reads ~0.1-0.3 MB/s
# poptrain's own record of a run: compact, but members an override changed one by one are listed
# one by one.
MAX_RECORD_BYTES = 64 * 2**20
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000


class Reason(str):
    """A problem's reason that carries the traceback of the user code that raised it (a user
    coupling's own check failing): :meth:`ConfigError.render` shows it below the problem."""

    traceback: str = ""

    @classmethod
    def of(cls, text: str, exc: BaseException, skip: int = 1) -> Reason:
        """``text``, with ``exc``'s traceback less its first ``skip`` frames (poptrain's own call)."""
        tb = exc.__traceback__
        for _ in range(skip):
            tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
        reason = cls(text)
        reason.traceback = "".join(traceback.format_exception(type(exc), exc, tb))
        return reason


class ConfigError(Exception):
    """A user-caused configuration problem: what is wrong, where, and what to do."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"Invalid configuration{where}:"]
        for key, reason in self.problems:
            text = " ".join(str(reason).split())  # one line per problem, whatever an exception's text holds
            lines.append(f"  - {key}: {text}" if key else f"  - {text}")
            trace = getattr(reason, "traceback", "")
            if trace:  # a bug in user code: where it happened, as Python tells it
                lines.extend(f"      {line}" for line in trace.rstrip().splitlines())
        return "\n".join(lines)


def _wants_number(annotation: Any) -> bool:
    """Whether a field's type is a number (``int``, ``float``, optionally ``None`` or a literal), not ``bool``."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(annotation)
        return bool not in args and any(_wants_number(a) for a in args)
    if origin is typing.Annotated:
        return _wants_number(typing.get_args(annotation)[0])
    return False


def _check_import_name(value: str) -> str:
    if not IMPORT_PATTERN.match(value):
        raise ValueError(f"{value!r} {IMPORT_RULE}")
    return value


class Strict(BaseModel):
    """Base of every config object: unknown keys are errors, not silently ignored; numbers are
    finite (no `.nan`, `.inf`) and never booleans."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `true` as 1; in YAML, `yes`, `no`, `on` and `off` are booleans too.
        if isinstance(value, bool) and info.field_name in cls.model_fields and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"must be a number, not the boolean {str(value).lower()} (YAML reads true/false/yes/no/on/off as booleans)")
        return value


class CodeRef(Strict):
    """A config object that names Python code by a built-in name or an import path, or, from
    Python, holds the object itself (a class, a function, a dataset): the object travels to Ray's
    workers inside the config (cloudpickle, by value when defined in ``__main__``), and the record
    keeps its qualified name and :func:`poptrain.objects.digest`."""

    NAME_FIELD: ClassVar[str] = "name"  # the field that names the code
    SHORTHAND: ClassVar[bool] = False  # ``key: adam`` (or ``key: <object>``) for ``key: {name: adam}``

    digest: str | None = Field(
        None,
        repr=False,
        description="Set by poptrain for an object given from Python: the sha256 of its source (`source:sha256:...`), or of "
        "its pickle for an instance (`pickle:sha256:...`). `poptrain resume` continues only with an object of this digest.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _take_given(cls, value: Any, handler: Callable) -> Any:
        field = cls.NAME_FIELD
        if cls.SHORTHAND and (isinstance(value, str) or objects.is_given(value)) and not isinstance(value, BaseModel):
            value = {field: value}
        given = value.get(field) if isinstance(value, dict) and objects.is_given(value.get(field)) else None
        if given is not None:
            described = objects.describe(given)
            if described.problem:
                raise ValueError(described.problem)
            if value.get("digest") not in (None, described.digest):
                raise ValueError(
                    f"the object given, `{described.name}`, is not the one recorded: its digest is {described.digest}, "
                    f"the record's {value['digest']} (its code or contents changed)"
                )
            value = {**value, field: described.name, "digest": described.digest}
            if field == "type" and value.get("name") is None:  # a coupling's label: its registered name, else the class's
                label = next((n for n, c in COUPLINGS.items() if c is given), getattr(given, "__name__", ""))
                value["name"] = label if NAME_PATTERN.match(label) else None
        instance = handler(value)
        if given is not None:
            instance.hold(given)
        return instance

    @model_serializer(mode="wrap")
    def _record(self, handler: Callable) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            digest = data.pop("digest", None)  # last, and left out when none: records of configs written with names stay as they were
            if digest is not None:
                data["digest"] = digest
        return data

    def dump_given(self) -> dict[str, Any]:
        """``model_dump(mode="json")`` with the object given in place of the name, if any."""
        data = self.model_dump(mode="json")
        if self.given is not None:
            data[self.NAME_FIELD] = self.given
        return data

    @property
    def given(self) -> Any:
        """The Python object given in place of a name, or None."""
        return (self.__pydantic_private__ or {}).get("given")

    def hold(self, obj: Any) -> None:
        """Keep ``obj``, the Python object this names. In pydantic's private storage, but not declared
        a ``PrivateAttr``: pydantic would then initialise one on every instance (some 15 us each,
        4,000 times for a thousand members), where only objects given from Python need it."""
        object.__setattr__(self, "__pydantic_private__", {**(self.__pydantic_private__ or {}), "given": obj})

    @property
    def given_or_name(self) -> Any:
        """What to resolve: the object given, else the name (a built-in or an import path)."""
        given = self.given
        return given if given is not None else getattr(self, self.NAME_FIELD)


class NamedByString(CodeRef):
    """A config object chosen by ``name``, a built-in or an import path (or, from Python, the
    object itself); ``key: adam`` is shorthand for ``key: {name: adam}``."""

    SHORTHAND: ClassVar[bool] = True

    @field_validator("name", check_fields=False)
    @classmethod
    def _import_name(cls, value: str) -> str:
        return _check_import_name(value)


class Component(NamedByString):
    """Something built by name: a built-in (``mlp``) or an import path (``package.module:attr``)."""

    name: str = Field(description="Built-in name, or an import path `package.module:attr` (from Python: the object itself).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to it.")


class DataConfig(Component):
    """A member's training data: a function returning a `torch.utils.data.Dataset` of (inputs, targets)."""

    batch_size: int = Field(32, gt=0, le=1_000_000, description="Samples per step.")
    shuffle: bool = Field(True, description="Reshuffle every epoch (seeded); false keeps dataset order.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Shuffling seed; default: the run seed, so members with equally long datasets "
        "see the same sample order (different views of the same samples).",
    )


class EvalDataConfig(Component):
    """A member's held-out data: a function returning a Dataset of (inputs, targets), evaluated whole, in order."""

    batch_size: int = Field(1024, gt=0, le=1_000_000, description="Samples per forward pass while evaluating (memory, not results).")


class MetricConfig(Component):
    """An evaluation metric: a built-in or an import path to ``f(outputs, targets, **kwargs) -> float``
    computed on a member's whole held-out set."""

    name: str = Field(
        description="`accuracy`, `top_k_accuracy` (kwargs `k`), `mse`, `mae`, `loss` (the member's own task loss), "
        "or an import path to `f(outputs, targets, **kwargs) -> float` (from Python: the function itself)."
    )
    label: Name | None = Field(
        None, description="Name in MLflow (`eval/<label>`); default: the built-in's name (`top_<k>_accuracy` for top-k) or the function's."
    )
    higher_is_better: bool | None = Field(
        None, description="For ranking by it; default: true for accuracies, false for `loss`, `mse`, `mae`; required for an import path."
    )

    @property
    def higher(self) -> bool | None:
        """Whether a higher value is better (None: unknown, an import path without ``higher_is_better``)."""
        if self.higher_is_better is not None:
            return self.higher_is_better
        return {"accuracy": True, "top_k_accuracy": True, "loss": False, "mse": False, "mae": False}.get(self.name)

    @property
    def key(self) -> str:
        if self.label:
            return self.label
        if self.name == "top_k_accuracy":
            return f"top_{self.kwargs.get('k', 5)}_accuracy"
        return self.name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


class EvaluationConfig(Strict):
    """Held-out evaluation of every member that has held-out data (``members[].eval_data``)."""

    every: int = Field(0, ge=0, le=100_000_000, description="Evaluate every k steps (0: only at the end); always after the last step too.")
    metrics: list[MetricConfig] = Field(
        default_factory=lambda: [MetricConfig(name="loss")],
        description="What to compute on the held-out data, each logged as `eval/<label>` on the member's run.",
    )
    rank_by: str | None = Field(
        None, description="The metric (its label) by which members are ranked: the population's best member; default: the first metric."
    )
    ensemble: bool = Field(
        True,
        description="Also evaluate the ensemble of members whose held-out samples are the same (same targets in the same order): "
        "the mean of their predicted probabilities (classification) or outputs, logged as `ensemble/<label>` on the parent run.",
    )
    population_average: bool | Literal["auto"] = Field(
        "auto",
        description="Also evaluate the population's average model at the end: the mean of the final weights of the members the "
        "first averaging coupling (`average`, `gossip`, `wash`, `diloco`) averages, or of every member when the run has none, "
        "built from the first of them's `model` and evaluated on its held-out data with its loss; logged as "
        "`population_average/<label>` on the parent run and saved as `population_average.pt` in the run's folder. `auto`: "
        "on where an averaging coupling's members have one `model` (the same name and kwargs) and the first has held-out data; "
        "`true` refuses a run where they do not.",
    )

    @model_validator(mode="after")
    def _known_ranking(self):
        labels = [m.key for m in self.metrics]
        if len(set(labels)) != len(labels):
            raise ValueError(f"metric labels must be distinct, got {labels}: give one a `label`")
        if self.rank_by is not None and self.rank_by not in labels:
            raise ValueError(f"rank_by {self.rank_by!r} is not one of the metrics {labels}")
        ranking = self.ranking  # None without metrics
        if ranking is not None and ranking.higher is None:
            raise ValueError(f"members are ranked by {ranking.name!r}: say whether higher is better with its `higher_is_better`")
        return self

    @property
    def ranking(self) -> MetricConfig | None:
        """The metric members are ranked by."""
        if not self.metrics:
            return None
        return next(m for m in self.metrics if m.key == (self.rank_by or self.metrics[0].key))


class Perturbation(Strict):
    """How population-based training explores one hyperparameter of a member that copied another."""

    factors: list[float] | None = Field(None, min_length=1, description="Multiply the donor's value by one of these, at random (e.g. `[0.8, 1.2]`).")
    values: list[float] | None = Field(None, min_length=1, description="Or pick one of these values.")
    range: tuple[float, float] | None = Field(None, description="Or draw from [low, high] (log-uniformly with `log: true`).")
    log: bool = Field(False, description="`range` drawn log-uniformly (both ends must be positive).")
    resample_probability: float = Field(0.0, ge=0, le=1, description="With `factors`: the probability of drawing from `values` or `range` instead.")
    min: float | None = Field(None, description="Explore never goes below this: a perturbed value under it becomes it (logged on the receiver's run).")
    max: float | None = Field(None, description="Explore never goes above this: a perturbed value over it becomes it (logged on the receiver's run).")

    @model_validator(mode="after")
    def _one_way(self):
        if self.factors is None and self.values is None and self.range is None:
            raise ValueError("give `factors`, `values` or `range`")
        if self.values is not None and self.range is not None:
            raise ValueError("give `values` or `range`, not both")
        if self.resample_probability and (self.factors is None or (self.values is None and self.range is None)):
            raise ValueError("`resample_probability` needs `factors` and `values` or `range` to resample from")
        if self.range is not None and (self.range[0] > self.range[1] or (self.log and self.range[0] <= 0)):
            raise ValueError(f"`range` must be [low, high] with low <= high (and low > 0 with `log`), got {list(self.range)}")
        if self.factors is not None and any(f <= 0 for f in self.factors):
            raise ValueError(f"every factor must be positive, got {self.factors}: a factor of 0 or less would change the value's sign or zero it")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"`min` ({self.min:g}) is above `max` ({self.max:g})")
        return self

    def bounded(self, value: float) -> float:
        """``value`` kept within [min, max]."""
        return min(max(value, self.min if self.min is not None else value), self.max if self.max is not None else value)


HYPERPARAMETER_PATTERN = re.compile(
    r"^(optimizer\.lr|optimizer\.kwargs\.\w+|optimizer\.groups\.\d+\.lr|loss_weight|terms\.[\w.-]+\.weight|couplings\.[\w.-]+\.weight)$"
)


class PBTConfig(Strict):
    """Population-based training (Jaderberg et al., 2017), in memory: every ``every`` steps members are
    ranked by ``metric``; each of the bottom ``quantile`` copies the weights, optimizer state, balancing
    state and data position of a member of the top ``quantile`` chosen at random (exploit), then
    perturbs the donor's hyperparameters (explore)."""

    every: int = Field(gt=0, le=100_000_000, description="Rank and exploit every k steps (not at step 0).")
    metric: str | None = Field(
        None, description="What members are ranked by: `eval/<label>` or a training metric (`loss`, ...); default: `eval/<evaluation.rank_by>`."
    )
    mode: Literal["max", "min"] | None = Field(None, description="Higher (`max`) or lower is better; default: from the metric.")
    quantile: float = Field(0.25, gt=0, le=0.5, description="Fraction of members that copy (bottom) and that are copied (top); at least one each.")
    members: list[str] | None = Field(None, description="Members in the schedule; default: all.")
    hyperparameters: dict[str, Perturbation] = Field(
        default_factory=dict,
        description="What explore perturbs, by key: `optimizer.lr`, `optimizer.kwargs.<name>` (weight_decay, ...), `optimizer.groups.<i>.lr`, "
        "`loss_weight`, `terms.<name>.weight`, `couplings.<name>.weight`.",
    )

    @field_validator("hyperparameters")
    @classmethod
    def _known_keys(cls, value: dict) -> dict:
        unknown = [k for k in value if not HYPERPARAMETER_PATTERN.match(k)]
        if unknown:
            raise ValueError(
                f"cannot perturb {unknown}: keys are optimizer.lr, optimizer.kwargs.<name>, "
                "optimizer.groups.<i>.lr, loss_weight, terms.<name>.weight, couplings.<name>.weight"
            )
        return value


class ParamGroup(Strict):
    """An optimizer parameter group selected by name patterns (fnmatch, e.g. `lstm.*`)."""

    params: list[str] = Field(min_length=1, description="Parameter name patterns (fnmatch) selecting this group.")
    lr: float | None = Field(None, gt=0, description="Learning rate of this group; default: the optimizer's.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Other per-group options (weight_decay, ...).")

    @field_validator("params", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class OptimizerConfig(NamedByString):
    name: str = Field("adam", description="`sgd`, `adam`, `adamw`, `rmsprop`, or an import path to an optimizer class (from Python: the class itself).")
    lr: float = Field(1e-3, gt=0, le=1e3, description="Default learning rate.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Other constructor arguments (momentum, betas, ...).")
    groups: list[ParamGroup] = Field(
        default_factory=list,
        description="Per-layer groups; a parameter takes the first group whose pattern matches it, the rest form the default group.",
    )


class TermConfig(Strict):
    """An extra term of a member's own objective (seed 001: one term minimized, another maximized)."""

    name: Name = Field(description="Name of the term, logged as `term/<name>`.")
    fn: Component = Field(description="Built-in term (`param_sum`, `param_l2`) or import path to `f(model, inputs, outputs, targets, **kwargs) -> scalar`.")
    weight: float = Field(1.0, description="Coefficient; a negative weight maximizes the term.")
    maximize: bool = Field(False, description="Maximize the term (same as negating its weight).")

    @property
    def signed_weight(self) -> float:
        return -abs(self.weight) if self.maximize else self.weight


class BalancingConfig(Strict):
    """Opt-in automatic balancing of a member's objective terms."""

    method: Literal["none", "magnitude"] = Field(
        "none",
        description="`magnitude`: divide each term by a running (EMA) estimate of its absolute value, so terms of different scale contribute comparably.",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA momentum of the magnitude estimate.")
    eps: float = Field(1e-8, gt=0, description="Floor of the magnitude estimate.")


class GradTransform(Strict):
    """Scale, clip or replace the gradient of parameters selected by pattern, before the optimizer step."""

    params: list[str] = Field(min_length=1, description="Parameter name patterns (fnmatch).")
    scale: float | None = Field(None, description="Multiply the gradient by this factor.")
    clip_norm: float | None = Field(None, gt=0, description="Clip the gradient's L2 norm (per parameter) to this.")
    fn: Component | None = Field(None, description="Import path to `f(name, param, grad, **kwargs) -> grad`.")

    @field_validator("params", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _does_something(self) -> GradTransform:
        if self.scale is None and self.clip_norm is None and self.fn is None:
            raise ValueError("this transform does nothing: give `scale`, `clip_norm` or `fn`")
        return self


class Resources(Strict):
    num_cpus: float | Literal["auto"] = Field(
        "auto",
        description="CPUs reserved for the member; `auto`: one each, or an equal share when the "
        "cluster has fewer CPUs than members. Torch intra-op threads follow it.",
    )
    num_gpus: float | Literal["auto"] = Field(
        "auto",
        description="GPUs for the member: a fraction of one GPU (at most 1) or a whole number. `auto`: 1 each when "
        "the cluster has a GPU per member, else members share GPUs (1/k each, k = members per GPU: 3 members on 1 GPU "
        "get 0.3333, on 2 GPUs 0.5) and are carried by one host per GPU (see `placement.members_per_host`), 0 "
        "without GPUs. GPUs that other members ask for by number are not shared out. A member trains on one device.",
    )
    max_model_gib: float = Field(
        64.0,
        gt=0,
        description="Largest model accepted, in GiB of parameters and buffers, measured on the meta device "
        "before anything starts: an absurd size (a few zeros too many in a width) is refused instead of "
        "exhausting a node's memory.",
    )

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _non_negative(cls, value: Any, info: ValidationInfo) -> Any:
        if value != "auto" and (value < 0 or value > 1024):
            raise ValueError("must be `auto` or a number between 0 and 1024")
        if info.field_name == "num_gpus" and value != "auto" and value > 1 and value != int(value):
            # Ray places a fraction of a GPU only within one GPU: 1.5 is no placement Ray can make.
            raise ValueError(f"a GPU share must be a fraction of one GPU (at most 1) or a whole number of GPUs, got {value:g}")
        return value


def host_gpu_problem(shares: list[float]) -> str | None:
    """Why one host cannot carry members with these GPU shares (``resources.num_gpus``, in the
    order it carries them), or None. The host asks Ray for their sum, which above 1 must be a whole
    number (Ray places a fraction of a GPU only within one GPU); a host holding several GPUs trains
    its members on cuda:0, cuda:1, ... in turn (:func:`poptrain.host.member_devices`), so the
    members each GPU gets must fit in it."""
    total = sum(shares)
    if len(shares) < 2 or total <= 1 + 1e-4:
        return None
    shown = f"its {len(shares)} members' GPU shares sum to {total:g}"
    if abs(total - round(total)) > 1e-4:
        return (
            f"{shown}: Ray places a fraction of a GPU only within one GPU, so a host asks for at most 1 GPU or a whole "
            "number; give its members shares that sum to one of those, or fewer members per host"
        )
    gpus = round(total)
    loads = [sum(shares[i::gpus]) for i in range(gpus)]
    worst = max(range(gpus), key=loads.__getitem__)
    if loads[worst] > 1 + 1e-4 or any(s > 1 for s in shares):
        return (
            f"{shown} on {gpus} GPUs, and its members train on cuda:0, cuda:1, ... in turn (a member on one GPU): "
            f"cuda:{worst} would carry {loads[worst]:g} GPUs' worth; give every member of the host the same share of at most 1, "
            "with as many members per host as fill its GPUs evenly"
        )
    return None


class MemberConfig(Strict):
    """One model of the population, carried by a host (a Ray actor of its own, or shared: `placement.members_per_host`)."""

    name: Name = Field(description="Unique member name (letters, digits, `_.-`).")
    copies: int = Field(
        1,
        ge=1,
        le=MAX_COPIES,
        description="This entry stands for `copies` members, alike but for their seeded initialisation and what `vary` gives each, "
        "named `<name>` plus a zero-padded index (`copies: 1000` with `name: m`: `m000` ... `m999`). Each is a member of its own in every way "
        "(its own MLflow run, checkpoints, outputs; overrides address it by name); the saved `config.yaml` keeps the entry compact.",
    )
    vary: dict[str, list[Any] | Draw] = Field(
        default_factory=dict,
        description="What differs between the entry's members, by dotted member key (`optimizer.lr`, `model.kwargs.hidden`, ...): "
        "a list gives member j its j-th value (lists are zipped; their length is `copies`, or sets it); `{grid: [...]}` keys multiply "
        "(`copies` times the product of their lengths members); `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}` "
        "(hi excluded) and `{choice: [...]}` draw per member from the run's seed, so `poptrain check`, the run and its resume see the same "
        "values. Each member's values are in its MLflow params; `poptrain check` lists them.",
    )
    model: Component = Field(description="Built-in model (`mlp`, `encoder_classifier`, `lstm_classifier`) or import path to an `nn.Module` class.")
    data: DataConfig = Field(description="Built-in dataset (`digits`, `synthetic_regression`, ...) or import path to a function returning a Dataset.")
    eval_data: EvalDataConfig | None = Field(
        None,
        description="Held-out data the member is evaluated on (see `evaluation`); default: when `data` says `split: train`, "
        "the same dataset with `split: test` (all of it: without `part`/`parts`); else the member is not evaluated.",
    )
    loss: Component = Field(
        description="Task loss: `mse`, `cross_entropy`, `l1`, `smooth_l1`, `bce_with_logits`, `nll`, or an import path to `f(outputs, targets) -> scalar`."
    )
    loss_weight: float = Field(1.0, description="Coefficient of the task loss in the member's own objective (0: the loss only enters through couplings).")
    terms: list[TermConfig] = Field(default_factory=list, description="Extra objective terms (seed 001).")
    balancing: BalancingConfig = Field(default_factory=BalancingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    frozen: list[str] = Field(default_factory=list, description="Parameter name patterns that are never trained.")
    grad_transforms: list[GradTransform] = Field(default_factory=list, description="Per-parameter gradient transforms.")
    init: str | None = Field(None, description="Path to a state_dict (.pt) to start from instead of a seeded initialization.")
    trainable: bool = Field(
        True,
        description="false: never trained (e.g. the target of an `average` coupling); it still evaluates its "
        "loss on its data every step, and is tracked and saved like any member.",
    )
    resources: Resources = Field(default_factory=Resources)

    def held_out_data(self) -> EvalDataConfig | None:
        """The data this member is evaluated on: ``eval_data``, else its training data's held-out split."""
        if self.eval_data is not None:
            return self.eval_data
        if self.data.kwargs.get("split") == "train":  # the whole held-out split, not one shard of it
            kwargs = {k: v for k, v in self.data.kwargs.items() if k not in ("part", "parts")}
            return EvalDataConfig(name=self.data.given_or_name, kwargs={**kwargs, "split": "test"}, digest=self.data.digest)
        return None


class CouplingConfig(CodeRef):
    """Fields shared by every coupling; each coupling type adds its own (see the couplings reference)."""

    NAME_FIELD: ClassVar[str] = "type"

    type: str = Field(description="Registered coupling name (`separation`, ...) or an import path to a Coupling class (from Python: the class itself).")
    name: Name | None = Field(None, description="Name used in metrics (`coupling/<name>`); default: the type.")
    members: list[str] | None = Field(None, description="Members it reads; default: every member.")
    trains: list[str] | None = Field(None, description="Members whose gradient it enters; default: every member it reads.")
    weight: float = Field(1.0, description="Coefficient of the term in the objective of each member it trains.")

    @property
    def label(self) -> str:
        return self.name or self.type


class ExchangeConfig(Strict):
    every: int = Field(1, ge=1, le=1_000_000, description="Exchange with the coordinator every k steps; exact coupling gradients when 1.")
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="`sync`: a barrier per exchange (exact with `every: 1`). `async`: a member publishes its values and "
        "goes on with its peers' freshest ones, waiting only when a peer is more than `max_staleness` exchanges behind.",
    )
    max_staleness: int = Field(1, ge=0, le=1_000_000, description="`async` only: how many exchanges old a peer's values may be.")
    timeout_s: float = Field(
        300.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description=(
            "How long a member waits at the barrier for its peers before the run fails naming the missing ones; a member waits for "
            "the coordinator's reply at most this plus a margin (5 s and a quarter of it) before the run fails naming the call."
        ),
    )
    shared_memory: bool | Literal["auto"] = Field(
        "auto",
        description="A member training on the CPU of the coordinator's node keeps the parameters only the coordinator reads or "
        "writes (averaged, shared) in `/dev/shm`, mapped by both: they are averaged in place instead of copied. "
        "`auto`: so for every member that does not train stacked (members stacked on a host exchange copies: "
        "the stack holds their parameters); `true`: every such member (it then trains alone); `false`: always exchange copies.",
    )


class TrackingConfig(Strict):
    uri: str | None = Field(
        None,
        description=(
            "MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in "
            "the working directory (inside a Ray job, in `$POPTRAIN_HOME`, as for `output_dir`)."
        ),
    )
    experiment: str = Field("poptrain", min_length=1, max_length=500, description="MLflow experiment name.")
    log_every: int = Field(1, ge=1, description="Log member metrics every k steps.")
    layer_norms_every: int = Field(
        10, ge=0, description="Log `grad_norm/<name>` and `weight_norm/<name>` every k steps (0: never); frozen parameters have no gradient norm."
    )
    layer_norms_by: Literal["param", "module"] = Field("param", description="Per parameter (`input.weight`), or per module (`input`).")
    profile: bool = Field(
        False,
        description="Log where each member's step time goes: `profile/compute_ms`, `profile/exchange_wait_ms` (waiting on peers "
        "and the coordinator), `profile/serialize_ms` (tensors to and from flat buffers), `profile/logging_ms`, `profile/checkpoint_ms`.",
    )
    log_models: bool = Field(
        True, description="Log each member's final model with `mlflow.pytorch` into its run (loads back with `mlflow.pytorch.load_model`)."
    )
    plots: bool = Field(
        True, description="Write PNG figures (losses, terms, couplings, coupled parameters) to `<run dir>/plots/` and the parent run at the end."
    )
    system_metrics: bool | Literal["auto"] = Field(
        "auto",
        description="Record each member's CPU, memory and GPU memory as `system/...` metrics every 10 s; `auto`: on when running on a multi-node cluster.",
    )


class CheckpointConfig(Strict):
    every: int | None = Field(
        None,
        ge=0,
        le=100_000_000,
        description="Save every member's full state (model, optimizer, RNG, data position, step) every k steps, "
        "atomically and checksummed; 0: never (then a member that dies fails the run). A multiple of `exchange.every`; "
        "default: 100 rounded up to one.",
    )
    keep: int = Field(2, ge=2, le=1000, description="Checkpoints kept per member (at least 2, so a complete one always exists).")


class FailureConfig(Strict):
    max_restarts: int = Field(3, ge=0, le=1000, description="Times a member whose process dies is restarted from its latest checkpoint before the run fails.")
    while_restarting: Literal["wait", "continue"] = Field(
        "wait",
        description="What the peers of a member whose process died do (sync exchange): `wait` at their next exchange "
        "until it is back and has replayed from its checkpoint (the run ends bitwise as if uninterrupted, on CPU); `continue` "
        "with its most recent exchanged values, never waiting for it again while it replays behind them (no stall; "
        "the outcome then depends on timing). Its metrics have every step exactly once either way.",
    )
    nonfinite: Literal["fail", "skip", "rollback"] = Field(
        "fail",
        description="A NaN/inf loss, term, coupling or gradient: `fail` stops the run naming member, step and term; "
        "`skip` skips that optimizer step (metric `skipped`); `rollback` skips it and restores the member's model, "
        "optimizer and balancing state from its latest checkpoint (its initial state before the first one; metric "
        "`rollback` = the step restored), then goes on with the next batch. No non-finite value ever reaches a peer.",
    )


class PlacementConfig(Strict):
    strategy: Literal["auto", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "auto", description="Ray placement-group strategy for the members' bundles; `auto`: SPREAD on a multi-node cluster, else PACK."
    )
    timeout_s: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S, description="How long to wait for the cluster to fit the whole population.")
    members_per_host: int | Literal["auto"] = Field(
        "auto",
        description="How many members one host (a Ray actor process) carries, in config order. `auto`: one each when "
        "every member gets a GPU of its own; members that share GPUs under `num_gpus: auto` go to one host per GPU (one "
        "process and CUDA context per GPU, its members stacked where they can; members asking for GPUs by number keep a "
        "host each); without GPUs, one each while there are no more members than CPUs, else one host per CPU, the members "
        "split evenly among them. A host's resources are its members' summed (above 1 GPU, a whole number, its members on "
        "cuda:0, cuda:1, ... in turn); its members train one after another and exchange as one message.",
    )

    stacked: bool = Field(
        True,
        description="Members of one architecture on a host train as one stacked model (torch.func `vmap`), each with its "
        "own optimizer state and hyperparameters, where they can (see *Hosts*): the same results to float rounding, "
        "not bitwise. `false`: they train one after another, bitwise (on CPU) as each would alone.",
    )

    @field_validator("members_per_host")
    @classmethod
    def _at_least_one(cls, value: Any) -> Any:
        if value != "auto" and value < 1:
            raise ValueError("must be `auto` or a whole number of at least 1")
        return value


class RunConfig(Strict):
    """A population run."""

    # The member entries as written (``copies``, ``vary``) and the members each resolved to, so
    # the saved record stays as compact as what the user wrote (:func:`dump_config`).
    _entries: list[variation.Entry] = PrivateAttr(default_factory=list)

    name: Name = Field(description="Run name: the MLflow parent run's name and the output folder's.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of everything: member initializations, data order, dropout.")
    steps: int = Field(gt=0, le=100_000_000, description="Training steps per member.")
    output_dir: str = Field(
        "runs",
        description="Outputs go to `<output_dir>/<name>/`. A relative path is taken from the working directory; "
        "inside a Ray job (`ray job submit`), from `$POPTRAIN_HOME` (default `~/poptrain-jobs`), since the job's working directory is a temporary copy.",
    )
    exchange: ExchangeConfig = Field(default_factory=ExchangeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    pbt: PBTConfig | None = Field(None, description="Population-based training in memory (see `pbt`); default: none.")
    members: list[MemberConfig] = Field(description="The population.")
    couplings: list[SerializeAsAny[CouplingConfig]] = Field(default_factory=list, description="Cross-member terms.")
    gradient_path_check: Literal["error", "warn", "off"] = Field(
        "error",
        description="At the first step, a weighted term or coupling with no gradient path to a trainable "
        "parameter of a member it trains stops the run (`error`), warns (`warn`), or is ignored (`off`).",
    )

    @field_validator("output_dir")
    @classmethod
    def _valid_output_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty (use `.` for the working directory)")
        if "\0" in value:
            raise ValueError("must not contain a NUL character")
        return value

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def _entries_compact(self) -> bool:
        """Whether an entry makes several members or varies them (else the record lists members as they are)."""
        return any(e.compactable for e in self._entries)

    def varied_values(self) -> dict[str, dict[str, Any]]:
        """``{member: {varied key: its value}}`` for the members an entry's ``vary`` made."""
        out: dict[str, dict[str, Any]] = {}
        by_name = {m.name: m for m in self.members}  # not member(): a scan per member, for a thousand of them
        for entry in self._entries:
            for name in entry.names if entry.keys else ():
                dumped = by_name[name].model_dump(mode="json")
                out[name] = {key: variation.get_dotted(dumped, key.split(".")) for key in entry.keys}
        return out

    def member(self, name: str) -> MemberConfig:
        return next(m for m in self.members if m.name == name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------------------------
# Loading


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _validation_problems(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        key = _format_loc(item["loc"])
        key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against `poptrain schema`)"
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.append((key, message))
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([(text, "an override must look like KEY=VALUE, e.g. members.0.optimizer.lr=0.01")])
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([(text, "an override needs a dotted key before `=`")])
    try:
        value = load_yaml_text(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as exc:
        raise ConfigError([(key, f"override {text!r}: {reason}") for _, reason in exc.problems]) from None
    return key.split("."), value


def apply_override(raw: dict, text: str) -> None:
    """Set one dotted key in the raw config; list items are addressed by index or by `name`. Under
    a member's ``vary`` the rest of the key is one varied key (``members.m.vary.optimizer.lr=[...]``)."""
    path, value = parse_override(text)
    if len(path) > 4 and path[0] == "members" and path[2] == "vary":
        path = [*path[:3], ".".join(path[3:])]
    node: Any = raw
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part)
            if index is None:
                raise ConfigError([(where, f"override {text!r}: no list item {part!r} (use an index or a member name)")])
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError([(where, f"override {text!r}: {'.'.join(path[:depth])} is not a mapping or list")])


def _list_index(items: list, part: str) -> int | None:
    if part.lstrip("-").isdigit():
        index = int(part)
        return index if -len(items) <= index < len(items) else None
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    return None


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than ``MAX_YAML_DEPTH`` (PyYAML itself would
    overflow Python's stack, or take seconds to scan deep flow collections). Duplicate keys and
    alias bombs are refused by :func:`load_yaml_text`, which looks at the composed document
    before it is constructed."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, token_class):
        # The scanner looks ahead over every open `[`/`{` at each token: refuse deep flow nesting here, early.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml_text(text: str, max_values: int = MAX_YAML_VALUES) -> Any:
    """Parse one YAML document safely; raises ``yaml.YAMLError`` or :class:`ConfigError`.

    Beyond ``yaml.safe_load`` it refuses a key given twice in one mapping (PyYAML silently
    keeps the last), aliases that refer to themselves or expand to more than ``MAX_YAML_VALUES``
    values (a "billion laughs" bomb), and nesting deeper than ``MAX_YAML_DEPTH``, all before
    anything is expanded.
    """
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems = _yaml_structure_problems(node, max_values)
        if problems:
            raise ConfigError(problems)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_structure_problems(root: yaml.Node, max_values: int = MAX_YAML_VALUES) -> list[tuple[str, str]]:
    """Duplicate keys of the composed document; raises :class:`ConfigError` at a recursive or
    too large expansion. Each node is visited once, so an alias bomb costs its text's size."""
    problems: list[tuple[str, str]] = []
    sizes: dict[int, int] = {}  # node -> its number of values once aliases are expanded
    open_nodes: set[int] = set()

    def dotted(path: list) -> str:
        return ".".join(str(part) for part in path) or "top level"

    def walk(node: yaml.Node, path: list, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError([(dotted(path), "refers to itself through a YAML alias: a recursive structure cannot be a config value")])
        if depth > MAX_YAML_DEPTH:
            raise ConfigError([(dotted(path), f"nested more than {MAX_YAML_DEPTH} levels deep through YAML aliases")])
        open_nodes.add(id(node))
        children: list[tuple[Any, yaml.Node]] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}  # (tag, key) -> line of its first occurrence
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    ident, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                    if ident in lines:
                        problems.append(
                            (dotted(path + [name]), f"is given twice (lines {lines[ident]} and {line}); YAML would silently keep only the last one")
                        )
                    lines.setdefault(ident, line)
                children += [(name, key_node), (name, value_node)]
        total = 1
        for part, child in children:
            total += walk(child, path + [part], depth + 1)
            if total > max_values:
                while path and isinstance(path[-1], int):  # name the key, not a list position inside it
                    path = path[:-1]
                raise ConfigError(
                    [(dotted(path), f"holds more than {max_values:,} values, counting each use of a YAML alias: far too many for a config (an alias bomb?)")]
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    walk(root, [], 0)
    return problems


def read_yaml(path: str | os.PathLike, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """The YAML mapping at ``path``; ``max_bytes`` bounds what is read (a config a user hands in
    is small; poptrain's own record of a run may be larger)."""
    source = str(path)
    if not os.path.exists(source):
        raise ConfigError([("", f"file not found: {source}")], source)
    if os.path.isdir(source):
        raise ConfigError([("", f"{source} is a directory, not a YAML file")], source)
    try:
        with open(source, "rb") as stream:
            data = stream.read(max_bytes + 1)  # bounded: the path may be a device or a pipe
    except OSError as exc:
        raise ConfigError([("", f"cannot read the file: {exc.strerror or exc}")], source) from None
    if len(data) > max_bytes:
        raise ConfigError([("top level", f"the file is larger than {max_bytes // 1024} KiB: this is not a config")], source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([(f"line {line}", f"not valid UTF-8 (byte 0x{data[exc.start]:02x}): save the file as UTF-8")], source) from None
    try:
        raw = load_yaml_text(text, max(MAX_YAML_VALUES, MAX_YAML_VALUES * max_bytes // MAX_CONFIG_BYTES))
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc, text)], source) from None
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None
    if raw is None:
        raise ConfigError([("top level", "the file is empty: a config is a mapping of keys (name, steps, members, ...)")], source)
    if not isinstance(raw, dict):
        kinds: dict[type, str] = {list: "a list", str: "a string"}
        found = kinds.get(type(raw), f"a {type(raw).__name__}")
        raise ConfigError([("top level", f"must be a mapping of keys (name, steps, members, ...), not {found}")], source)
    return raw


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, str]:
    """(where, reason) of a YAML syntax error: its line and column, and what the parser expected."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: it has a position, not a mark
        line = text.count("\n", 0, exc.position) + 1
        return f"line {line}", f"not valid YAML: character #x{exc.character:04x} is not allowed in a YAML file"
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "top level"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "'\\t'" in problem:
        problem += " (YAML does not allow tabs for indentation: use spaces)"
    return where, f"not valid YAML: {problem}"


def load_config(
    config: str | os.PathLike | dict | RunConfig,
    overrides: list[str] | tuple[str, ...] = (),
    record: bool = False,
    given: Sequence[Any] = (),
) -> RunConfig:
    """Read, override and validate a run config; raises :class:`ConfigError` on any problem.

    An override may address a member an entry's ``copies``/``vary`` makes (``members.m007.optimizer.lr=0.1``):
    it applies to that member alone, after the entry is expanded. ``record``: ``config`` is
    poptrain's own saved record of a run (``<run dir>/config.yaml``), read without the size bound
    of a config a user hands in. ``given``: Python objects that take the place of the recorded
    objects of the same qualified name, which must have the recorded digest (resuming a run
    started with objects from Python, see :class:`CodeRef`).
    """
    if isinstance(config, RunConfig):
        raw, source = dump_given(config), None
    elif isinstance(config, dict):
        raw, source = variation.copy_tree(config), None
    else:
        source = str(config)
        raw = read_yaml(source, MAX_RECORD_BYTES if record else MAX_CONFIG_BYTES)
    try:
        if given:
            _put_given(raw, given)
        per_member = []
        for text in overrides:
            if _names_a_made_member(raw, text):
                per_member.append(text)
            else:
                apply_override(raw, text)
        cfg = validate_config(raw, per_member)
        if isinstance(config, RunConfig) and not cfg._entries_compact() and config._entries:
            cfg._entries = config._entries  # the entries it was written as (dump_config checks they still hold)
        return cfg
    except ConfigError as exc:
        exc.source = exc.source or source
        raise ConfigError(exc.problems, exc.source) from None


def _names_a_made_member(raw: dict, text: str) -> bool:
    """Whether override ``text`` addresses by name a member that is not written out but made by an
    entry's ``copies`` or ``vary`` (it applies once the entries are expanded)."""
    path = text.split("=", 1)[0].split(".")
    members = raw.get("members")
    if len(path) < 3 or path[0] != "members" or not isinstance(members, list) or _list_index(members, path[1]) is not None:
        return False
    return any(isinstance(m, dict) and isinstance(m.get("name"), str) and path[1].startswith(m["name"]) and (m.get("copies") or m.get("vary")) for m in members)


def _put_given(raw: Any, given: Sequence[Any]) -> None:
    """Put each object of ``given`` in the place of the recorded objects of its qualified name (their
    digests are compared when the config is validated); raises :class:`ConfigError` for an object that
    the record does not name."""
    by_name: dict[str, list[Any]] = {}
    for obj in given:
        by_name.setdefault(objects.qualified_name(obj), []).append(obj)
    recorded = list(_recorded_objects(raw))
    used: set[int] = set()
    for node, field in recorded:
        candidates = by_name.get(node[field], [])
        # Several objects of one name (two lambdas): the one of the recorded digest, else the first (then named as different).
        chosen = next((o for o in candidates if objects.digest(o) == node["digest"]), candidates[0] if candidates else None)
        if chosen is not None:
            node[field] = chosen
            used.add(id(chosen))
    unused = [objects.qualified_name(o) for o in given if id(o) not in used]
    if unused:
        names = sorted({node[field] if isinstance(node[field], str) else objects.qualified_name(node[field]) for node, field in recorded})
        raise ConfigError(
            [
                (
                    "",
                    f"objects {unused} given to resume are not among those the run was started with "
                    f"({names or 'it was started with none'}): pass the objects of those names",
                )
            ]
        )


def _recorded_objects(node: Any) -> Iterator[tuple[dict, str]]:
    """Each mapping of a raw config that records an object (it has a ``digest``), with the key naming it."""
    if isinstance(node, dict):
        if isinstance(node.get("digest"), str):
            yield node, "type" if "type" in node else "name"
        for key, value in node.items():
            if key != "kwargs":  # the user's own arguments
                yield from _recorded_objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _recorded_objects(value)


def code_refs(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, CodeRef]]:
    """Every :class:`CodeRef` of a validated config (models, data, losses, terms, metrics, optimizers,
    couplings), with its path (field names and list indices)."""
    if isinstance(node, CodeRef):
        yield path, node
    if isinstance(node, BaseModel):
        for name in _code_fields(type(node)):  # not every field: a thousand members' numbers are many
            yield from code_refs(getattr(node, name), (*path, name))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from code_refs(value, (*path, index))
    elif isinstance(node, dict):
        for name, value in node.items():
            if isinstance(value, (BaseModel, list, dict)):
                yield from code_refs(value, (*path, name))


_CODE_FIELDS: dict[type, tuple[str, ...]] = {}


def _code_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``model`` whose type can hold a :class:`CodeRef`."""
    if model not in _CODE_FIELDS:
        _CODE_FIELDS[model] = ()  # while it is being worked out (a model that holds itself)
        _CODE_FIELDS[model] = tuple(name for name, info in model.model_fields.items() if _holds_code(info.annotation))
    return _CODE_FIELDS[model]


def _holds_code(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return issubclass(annotation, CodeRef) or bool(_code_fields(annotation))
    return any(_holds_code(arg) for arg in typing.get_args(annotation))


def dump_given(cfg: RunConfig) -> dict[str, Any]:
    """``cfg.model_dump(mode="json")`` with each object given from Python in the place of its name:
    raw config data that validates to the same config, objects included."""
    raw = cfg.model_dump(mode="json")
    for path, ref in code_refs(cfg):
        if ref.given is not None:
            variation.get_dotted(raw, [str(p) for p in path])[ref.NAME_FIELD] = ref.given
    return raw


def _recorded_object_problem(name: str, recorded: str, find: Callable[[], Any]) -> tuple[str | None, Any]:
    """(why the recorded object ``name`` of digest ``recorded`` is not here, the object found): the
    object is imported by its name and must have the recorded digest."""
    if recorded.startswith("pickle:"):
        return (
            f"the run was started with an instance of `{name}` given from Python (a dataset, ...), which no import finds again: "
            "only the same object, given again, can take its place"
        ), None
    try:
        found = find()
    except Exception as exc:  # noqa: BLE001 - whatever importing it raises, it is not here
        where = ", defined in a notebook or a script's `__main__`" if name.startswith("__main__:") else ", defined inside a function" if "<" in name else ""
        return f"the run was started with the Python object `{name}`{where}, which cannot be imported here ({exc})", None
    found_digest = objects.digest(found)
    if found_digest != recorded:
        return (
            f"`{name}` imports, but it is not the object the run was started with: its digest is {found_digest}, the record's {recorded} (its code changed)"
        ), None
    return None, found


def _find_recorded_components(cfg: RunConfig, entries: list[variation.Entry], problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each component that records an object given from Python (a digest) but holds none: the object
    imported by its name, of the recorded digest, is held (it travels to the workers as the object:
    their ``__main__`` is not this one). Those not found are added to ``problems`` and returned
    (name, digest)."""
    missing: list[tuple[str, str]] = []
    reported: set[tuple[str, str]] = set()
    for path, ref in code_refs(cfg):
        key, name = ".".join(map(str, path)), getattr(ref, ref.NAME_FIELD)
        if ref.digest is None or ref.given is not None or ":" not in name or isinstance(ref, CouplingConfig) or (name, ref.digest) in reported:
            continue
        reported.add((name, ref.digest))
        from poptrain.builtins import import_path  # only for a record of objects: it imports torch

        reason, found = _recorded_object_problem(name, ref.digest, partial(import_path, name))
        if reason:
            if any(e.compactable for e in entries):  # positions in the expanded list mean nothing to the user: name the member
                key = _named_member(key, {str(i): m.name for i, m in enumerate(cfg.members)})
            problems.append((f"{key}.{ref.NAME_FIELD}", reason))
            missing.append((name, ref.digest))
        else:
            for _, same in code_refs(cfg):
                if getattr(same, same.NAME_FIELD) == name and same.digest == ref.digest:
                    same.hold(found)
    return missing


def _cannot_continue(missing: list[tuple[str, str]]) -> tuple[str, str]:
    """The problem that sums up recorded objects (name, digest) that are not here."""
    code = dict.fromkeys(name.rsplit(":", 1)[-1].rsplit(".", 1)[-1] for name, digest in missing if not digest.startswith("pickle:"))
    instances = dict.fromkeys(name.rsplit(":", 1)[-1] for name, digest in missing if digest.startswith("pickle:"))
    also = f", with the same {' and '.join(instances)} it was given in the list" if instances else ""
    return (
        "",
        f"this run cannot continue with what is here: it was started from Python with objects that are not importable by "
        f"their recorded names, or not the same. Continue it from Python, passing the same objects: "
        f"`poptrain.resume(<its folder>, objects=[{', '.join(code)}])`{also}",
    )


def validate_config(raw: dict, member_overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate the schema, each coupling's own fields, and every cross-reference between names.
    ``member_overrides`` apply to members made by ``copies``/``vary``, once they are made."""
    raw = dict(raw)
    members, entries, problems = variation.expand(raw.get("members"), raw.get("seed", 0), MemberConfig)
    if "members" in raw:  # a missing key stays missing, for the schema to name
        raw["members"] = members
    if problems:
        raise ConfigError(problems)
    for text in member_overrides:
        apply_override(raw, text)
    raw_couplings = raw.pop("couplings", None)
    raw_couplings = [] if raw_couplings is None else raw_couplings
    if isinstance(raw_couplings, list):  # from Python, a coupling class alone stands for `{type: <the class>}`
        raw_couplings = [{"type": item} if isinstance(item, type) else item for item in raw_couplings]
    problems = []
    if not isinstance(raw_couplings, list) or not all(isinstance(c, dict) for c in raw_couplings):
        problems.append(("couplings", "must be a list of mappings, each with a `type`"))
        raw_couplings = []
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        found = _validation_problems(exc)
        if any(e.compactable for e in entries):  # positions in the expanded list mean nothing to the user: name the member
            made = {str(i): m["name"] for i, m in enumerate(raw["members"]) if isinstance(m, dict) and isinstance(m.get("name"), str)}
            found = [(_named_member(key, made), reason) for key, reason in found]
        raise ConfigError(found + problems) from None

    # Recorded objects (name, digest) that are not here: the run cannot continue (couplings: below, before they are resolved).
    missing = _find_recorded_components(cfg, entries, problems)
    names = cfg.member_names
    seen: dict[str, str] = {}
    for index, name in enumerate(names):
        if name in seen.values():
            problems.append((f"members.{index}.name", f"duplicate member name {name!r}"))
        elif name.lower() in seen:
            problems.append(
                (
                    f"members.{index}.name",
                    f"member names {seen[name.lower()]!r} and {name!r} differ only in case: "
                    "their outputs (`members/<name>/`) would share a folder on case-insensitive file systems",
                )
            )
        seen.setdefault(name.lower(), name)
    if not names:
        problems.append(("members", "the population is empty: list at least one member"))
    if cfg.checkpoint.every is None:  # the default: about every 100 steps, on an exchange
        cfg.checkpoint.every = -(-100 // cfg.exchange.every) * cfg.exchange.every
    elif cfg.checkpoint.every and cfg.checkpoint.every % cfg.exchange.every:
        problems.append(
            ("checkpoint.every", f"must be a multiple of exchange.every ({cfg.exchange.every}), so checkpoints fall on exchanges; got {cfg.checkpoint.every}")
        )

    typed: list[CouplingConfig] = []
    labels: set[str] = set()
    for index, item in enumerate(raw_couplings):
        key = f"couplings.{index}"
        given = isinstance(item.get("type"), type)  # from Python: the coupling class itself
        if not given and not isinstance(item.get("type"), str):
            problems.append((f"{key}.type", "required: the coupling's registered name or import path (from Python: the coupling class)"))
            continue
        if not given and not IMPORT_PATTERN.match(item["type"]):
            problems.append((f"{key}.type", f"{item['type']!r} {IMPORT_RULE}"))
            continue
        if not given and isinstance(item.get("digest"), str):  # a recorded object: the same one must be here
            reason, found = _recorded_object_problem(item["type"], item["digest"], partial(resolve_coupling, item["type"]))
            if reason:
                problems.append((f"{key}.type", reason))
                missing.append((item["type"], item["digest"]))
                continue
            item = {**item, "type": found}
        try:
            cls = resolve_coupling(item["type"])
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            problems.append((f"{key}.type", str(exc)))
            continue
        try:
            specific = cls.Config.model_validate(item)
        except ValidationError as exc:
            problems.extend(_validation_problems(exc, key))
            continue
        if specific.members == []:
            problems.append((f"{key}.members", "is empty: list the members it reads, or leave `members` out for every member"))
        for field in ("members", "trains"):
            listed = getattr(specific, field) or []
            for position, name in enumerate(listed):
                if name not in names:
                    problems.append((f"{key}.{field}", f"unknown member {name!r}; members are {names}"))
                elif name in listed[:position]:
                    problems.append((f"{key}.{field}", f"member {name!r} is listed twice"))
        if specific.trains and specific.members:
            for name in specific.trains:
                if name not in specific.members and name in names:
                    problems.append((f"{key}.trains", f"member {name!r} is trained but not read by this coupling (add it to `members`)"))
        if specific.label in labels:
            problems.append((f"{key}.name", f"duplicate coupling name {specific.label!r}: give each coupling a distinct `name`"))
        labels.add(specific.label)
        renamed = [old for old in ("exchange_transform", "transforms", "writes") if hasattr(cls, old)]
        if renamed:  # written for the interface before `rewrites`: it would be silently ignored
            problems.append(
                (
                    f"{key}.type",
                    f"{cls.__name__} defines {', '.join(renamed)}, which couplings no longer have: declare "
                    "`rewrites_values = True` and implement `rewrites()` (what, when) and `rewrite(kind, q, out)` (see poptrain.couplings.base)",
                )
            )
        if cfg.exchange.mode == "async" and cls.rewrites_values:
            problems.append(
                (
                    f"{key}.type",
                    f"{item['type']!r} replaces members' values at exchanges, which needs every member at the same exchange: use `exchange.mode: sync`",
                )
            )
        if cfg.failure.nonfinite == "rollback" and not cls.allows_rollback:
            problems.append(
                (
                    f"{key}.type",
                    f"{item['type']!r} keeps members' parameters identical, which restoring one "
                    "member from its checkpoint would break: use `failure.nonfinite: skip` or `fail`",
                )
            )
        try:
            problems.extend((f"{key}.{k}" if k else key, msg) for k, msg in cls.check_config(specific, cfg))
        except Exception as exc:  # a user coupling's own check failing: nothing starts, and its traceback is shown
            problems.append(
                (key, Reason.of(f"{cls.__name__}.check_config raised {type(exc).__name__}: {exc} (a bug in the coupling's code; its traceback follows)", exc))
            )
        typed.append(specific)
    per = cfg.placement.members_per_host
    if per != "auto":  # hosts known from the config alone; with `auto` shares, the driver checks them (host_resources)
        for start in range(0, len(cfg.members), per):
            host = cfg.members[start : start + per]
            if all(m.resources.num_gpus != "auto" for m in host):
                reason = host_gpu_problem([float(m.resources.num_gpus) for m in host])
                if reason:
                    problems.append(
                        (
                            "placement.members_per_host",
                            f"the host of members {', '.join(m.name for m in host[:4])}{' ...' if len(host) > 4 else ''} cannot be placed: {reason}",
                        )
                    )
                    break  # one host says it; the others are cut alike
    for index, member in enumerate(cfg.members):
        term_names = [t.name for t in member.terms]
        for t_index, term in enumerate(member.terms):
            if term.name in ("loss", "objective") or term_names.count(term.name) > 1:
                problems.append((f"members.{index}.terms.{t_index}.name", f"term name {term.name!r} is reserved or duplicated"))
    if missing:
        problems.append(_cannot_continue(missing))
    if problems:
        raise ConfigError(problems)
    # Keep the typed coupling objects (one-to-one with the YAML) without re-validating the whole run.
    object.__setattr__(cfg, "couplings", typed)
    cfg._entries = entries
    return cfg


def _named_member(key: str, names: dict[str, str]) -> str:
    parts = key.split(".")
    if len(parts) > 1 and parts[0] == "members" and parts[1] in names:
        parts[1] = names[parts[1]]
    return ".".join(parts)


def output_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Problems with the run's output folder ``<output_dir>/<name>/`` on this machine, before anything starts.

    Every file a run writes is inside that folder: the run name and member names are single
    path components (no `/`, no `..`), so no output can land outside it.
    """
    target = os.path.abspath(cfg.run_dir)
    existing = target
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [("output_dir", f"{existing} is not a directory, so the outputs cannot go to {target}")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [("output_dir", f"{existing} is not writable, so the outputs cannot go to {target}")]
    return []


# Inside a submitted Ray job the working directory is Ray's unpacked copy of `--working-dir`, a
# temporary folder that Ray deletes (and that a second node on the same machine unpacks again at
# the same path, deleting what the driver wrote there). Relative output paths resolve against a
# lasting folder instead.
HOME_ENV = "POPTRAIN_HOME"
DEFAULT_JOB_HOME = "~/poptrain-jobs"


def ray_job() -> dict[str, Any] | None:
    """The submitted Ray job this process is the entrypoint of (``submission_id``, ``working_dir``),
    from the environment Ray's job supervisor gives it; None outside a job."""
    text = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    runtime_env, metadata = data.get("runtime_env"), data.get("metadata")
    runtime_env = runtime_env if isinstance(runtime_env, dict) else {}
    metadata = metadata if isinstance(metadata, dict) else {}
    return {"submission_id": metadata.get("job_submission_id"), "working_dir": runtime_env.get("working_dir")}


def job_home() -> Path | None:
    """Inside a submitted Ray job: the folder relative outputs and the default MLflow store resolve
    against (``$POPTRAIN_HOME``, else ``~/poptrain-jobs``), created if missing; None outside a job."""
    if ray_job() is None:
        return None
    home = Path(os.path.expanduser(os.environ.get(HOME_ENV) or DEFAULT_JOB_HOME)).resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError([("output_dir", f"inside a Ray job, relative outputs go to ${HOME_ENV} ({home}), which cannot be created: {exc}")]) from None
    return home


def anchor_outputs(cfg: RunConfig) -> Path | None:
    """Inside a submitted Ray job, make a relative ``output_dir`` absolute under :func:`job_home`
    (so that it outlives the job's temporary working directory) and return that folder, against
    which relative tracking paths resolve too; None (nothing changed) outside a job."""
    home = job_home()
    if home is not None and not Path(cfg.output_dir).is_absolute():
        cfg.output_dir = str(home / cfg.output_dir)
    return home


def job_artifact_root(tracking_uri: str) -> str | None:
    """Inside a submitted Ray job with a local MLflow store: where the artifacts of experiments it
    creates go (``<job home>/mlruns``). MLflow's default, ``./mlruns``, would be in the job's
    temporary working directory. None elsewhere (a server keeps its own artifact root)."""
    home = job_home()
    local = tracking_uri.startswith("sqlite:") or "://" not in tracking_uri
    return str(home / "mlruns") if home is not None and local else None


def job_storage_problems(cfg: RunConfig, tracking_uri: str) -> list[tuple[str, str]]:
    """Inside a Ray job with a ``working_dir``: outputs or a local MLflow store given by an absolute
    path inside the job's working directory, which would be deleted with it."""
    job = ray_job()
    if job is None or not job["working_dir"]:
        return []
    try:
        scratch = Path(os.getcwd()).resolve()
    except FileNotFoundError:  # already deleted under us
        return []
    local = tracking_uri[len("sqlite:///") :] if tracking_uri.startswith("sqlite:///") else None if "://" in tracking_uri else tracking_uri
    problems = []
    for key, path in (("output_dir", cfg.run_dir), ("tracking.uri", local)):
        if path is not None and Path(path).resolve().is_relative_to(scratch):
            problems.append(
                (
                    key,
                    f"{path} is inside the Ray job's working directory {scratch}, a temporary copy that Ray deletes: "
                    f"give a relative path (inside a job it resolves against ${HOME_ENV}, default {DEFAULT_JOB_HOME}) "
                    "or an absolute path outside it",
                )
            )
    return problems


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every default filled in), with entries that make several
    members kept compact (``copies``, ``vary`` with each member's values): it loads back to the
    same members, and its size follows what the user wrote, not the number of members."""
    data = cfg.model_dump(mode="json")
    if cfg._entries and sum(len(e.names) for e in cfg._entries) == len(cfg.members):
        data["members"] = variation.compact(data["members"], cfg._entries)
    return yaml.dump(data, Dumper=_RecordDumper, sort_keys=False)


class _RecordDumper(yaml.SafeDumper):
    """Lists of plain values on one line (a thousand members' drawn values stay a readable block)."""

    def represent_list(self, data):
        flow = all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecordDumper.add_representer(list, _RecordDumper.represent_list)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested config data into dotted keys (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list) and data and any(isinstance(v, (dict, list)) for v in data):
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}.{index}"))
    else:
        out[prefix] = str(data)
    return out
