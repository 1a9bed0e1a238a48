"""The typed schema of a population run: one YAML file maps one-to-one onto :class:`RunConfig`.
The field descriptions are the config reference (``poptrain.config_docs`` generates it)."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

import poptrain.config.objects as objects
import poptrain.config.variation as variation
from poptrain.config.registry import COUPLINGS, resolve_coupling
from poptrain.config.variation import Draw

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
    keeps its qualified name and :func:`poptrain.config.objects.digest`."""

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
    its members on cuda:0, cuda:1, ... in turn (:func:`poptrain.training.host.member_devices`), so the
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


def _as_its_own_config(value: Any, handler: Callable) -> CouplingConfig:
    """A coupling's entry validated as the config class of the coupling its ``type`` names (a
    registered name, an import path, or the class itself from Python): pydantic's discriminated
    union, open to couplings known only once a config names them. A problem with ``type`` is
    reported at ``couplings.<i>.type``, one with a field at ``couplings.<i>.<field>``."""
    if isinstance(value, type):  # from Python, a coupling class alone stands for `{type: <the class>}`
        value = {"type": value}
    if isinstance(value, CouplingConfig):
        value = value.dump_given()  # re-validated as its own class's config, whatever class it was built as
    if not isinstance(value, dict):
        hint = f": write `{{type: {value}}}`" if isinstance(value, str) else ""
        raise PydanticCustomError("coupling_entry", "must be a mapping with a `type`{hint}", {"hint": hint})
    kind = value.get("type")
    if not isinstance(kind, (str, type)):
        _coupling_type_problem("required: the coupling's registered name or import path (from Python: the coupling class)", kind)
    if isinstance(kind, str) and not IMPORT_PATTERN.match(kind):
        _coupling_type_problem(f"{kind!r} {IMPORT_RULE}", kind)
    try:
        coupling = resolve_coupling(kind)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        _coupling_type_problem(str(exc), kind)
    return coupling.Config.model_validate(value)


def _coupling_type_problem(reason: str, kind: Any) -> typing.NoReturn:
    detail = InitErrorDetails(type=PydanticCustomError("coupling_type", reason), loc=("type",), input=kind)
    raise ValidationError.from_exception_data("CouplingConfig", [detail])


# A run's couplings: each entry its own coupling's config class, serialized with that class's fields.
Couplings = list[SerializeAsAny[Annotated[CouplingConfig, WrapValidator(_as_its_own_config)]]]


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
    _member_index: dict[str, int] = PrivateAttr(default_factory=dict)  # see member_index

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
    couplings: Couplings = Field(default_factory=list, description="Cross-member terms, each validated as its own type's config.")
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

    @model_validator(mode="after")
    def _default_checkpoint_every(self) -> RunConfig:
        """``checkpoint.every`` left out: about every 100 steps, on an exchange."""
        if self.checkpoint.every is None:
            self.checkpoint.every = -(-100 // self.exchange.every) * self.exchange.every
        return self

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def member_index(self, name: str) -> int:
        """``name``'s position among the members (what its seed derives from), from a map made once
        and made again only when it no longer points at that member: each of a thousand members asks."""
        index = self._member_index.get(name)
        if index is None or index >= len(self.members) or self.members[index].name != name:
            self._member_index = {m.name: i for i, m in enumerate(self.members)}
            index = self._member_index[name]
        return index

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
        return self.members[self.member_index(name)]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
