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

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
            lines.append(f"  - {key}: {reason}" if key else f"  - {reason}")
        return "\n".join(lines)


class Strict(BaseModel):
    """Base of every config object: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Component(Strict):
    """Something built by name: a built-in (``mlp``) or an import path (``package.module:attr``)."""

    name: str = Field(description="Built-in name, or an import path `package.module:attr`.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to it.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        # `model: mlp` is shorthand for `model: {name: mlp}`.
        return {"name": value} if isinstance(value, str) else value


class DataConfig(Component):
    """A member's training data: a function returning a `torch.utils.data.Dataset` of (inputs, targets)."""

    batch_size: int = Field(32, gt=0, le=1_000_000, description="Samples per step.")
    shuffle: bool = Field(True, description="Reshuffle every epoch (seeded); false keeps dataset order.")
    seed: Optional[int] = Field(
        None,
        description="Shuffling seed; default: the run seed, so members with equally long datasets "
        "see the same sample order (different views of the same samples).",
    )


class ParamGroup(Strict):
    """An optimizer parameter group selected by name patterns (fnmatch, e.g. `lstm.*`)."""

    params: list[str] = Field(description="Parameter name patterns (fnmatch) selecting this group.")
    lr: Optional[float] = Field(None, gt=0, description="Learning rate of this group; default: the optimizer's.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Other per-group options (weight_decay, ...).")

    @field_validator("params", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class OptimizerConfig(Strict):
    name: str = Field("adam", description="`sgd`, `adam`, `adamw`, `rmsprop`, or an import path to an optimizer class.")
    lr: float = Field(1e-3, gt=0, le=1e3, description="Default learning rate.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Other constructor arguments (momentum, betas, ...).")
    groups: list[ParamGroup] = Field(
        default_factory=list,
        description="Per-layer groups; a parameter takes the first group whose pattern matches it, "
        "the rest form the default group.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class TermConfig(Strict):
    """An extra term of a member's own objective (seed 001: one term minimized, another maximized)."""

    name: str = Field(description="Name of the term, logged as `term/<name>`.")
    fn: Component = Field(
        description="Built-in term (`param_sum`, `param_l2`) or import path to `f(model, inputs, outputs, targets, **kwargs) -> scalar`."
    )
    weight: float = Field(1.0, description="Coefficient; a negative weight maximizes the term.")
    maximize: bool = Field(False, description="Maximize the term (same as negating its weight).")

    @property
    def signed_weight(self) -> float:
        return -abs(self.weight) if self.maximize else self.weight


class BalancingConfig(Strict):
    """Opt-in automatic balancing of a member's objective terms."""

    method: Literal["none", "magnitude"] = Field(
        "none",
        description="`magnitude`: divide each term by a running (EMA) estimate of its absolute value, "
        "so terms of different scale contribute comparably.",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA momentum of the magnitude estimate.")
    eps: float = Field(1e-8, gt=0, description="Floor of the magnitude estimate.")


class GradTransform(Strict):
    """Scale, clip or replace the gradient of parameters selected by pattern, before the optimizer step."""

    params: list[str] = Field(description="Parameter name patterns (fnmatch).")
    scale: Optional[float] = Field(None, description="Multiply the gradient by this factor.")
    clip_norm: Optional[float] = Field(None, gt=0, description="Clip the gradient's L2 norm (per parameter) to this.")
    fn: Optional[Component] = Field(None, description="Import path to `f(name, param, grad, **kwargs) -> grad`.")

    @field_validator("params", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Resources(Strict):
    num_cpus: Union[float, Literal["auto"]] = Field(
        "auto",
        description="CPUs reserved for the member; `auto`: one each, or an equal share when the "
        "cluster has fewer CPUs than members. Torch intra-op threads follow it.",
    )
    num_gpus: Union[float, Literal["auto"]] = Field(
        "auto", description="GPUs for the member; `auto`: 1 when the cluster has GPUs, else 0."
    )

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _non_negative(cls, value: Any) -> Any:
        if value != "auto" and (value < 0 or value > 1024):
            raise ValueError("must be `auto` or a number between 0 and 1024")
        return value


class MemberConfig(Strict):
    """One model of the population, trained in its own Ray actor."""

    name: str = Field(description="Unique member name (letters, digits, `_.-`).")
    model: Component = Field(description="Built-in model (`mlp`, `encoder_classifier`, `lstm_classifier`) or import path to an `nn.Module` class.")
    data: DataConfig = Field(description="Built-in dataset (`digits`, `synthetic_regression`, ...) or import path to a function returning a Dataset.")
    loss: Component = Field(description="Task loss: `mse`, `cross_entropy`, `l1`, `smooth_l1`, `bce_with_logits`, `nll`, or an import path to `f(outputs, targets) -> scalar`.")
    loss_weight: float = Field(1.0, description="Coefficient of the task loss in the member's own objective (0: the loss only enters through couplings).")
    terms: list[TermConfig] = Field(default_factory=list, description="Extra objective terms (seed 001).")
    balancing: BalancingConfig = Field(default_factory=BalancingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    frozen: list[str] = Field(default_factory=list, description="Parameter name patterns that are never trained.")
    grad_transforms: list[GradTransform] = Field(default_factory=list, description="Per-parameter gradient transforms.")
    init: Optional[str] = Field(None, description="Path to a state_dict (.pt) to start from instead of a seeded initialization.")
    trainable: bool = Field(
        True,
        description="false: never trained (e.g. the target of an `average` coupling); it still evaluates its "
        "loss on its data every step, and is tracked and saved like any member.",
    )
    resources: Resources = Field(default_factory=Resources)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, `_`, `.` or `-`, starting with a letter or digit")
        return value


class CouplingConfig(BaseModel):
    """Fields shared by every coupling; each coupling type adds its own (see the couplings reference)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: str = Field(description="Registered coupling name (`separation`, ...) or an import path to a Coupling class.")
    name: Optional[str] = Field(None, description="Name used in metrics (`coupling/<name>`); default: the type.")
    members: Optional[list[str]] = Field(None, description="Members it reads; default: every member.")
    trains: Optional[list[str]] = Field(None, description="Members whose gradient it enters; default: every member it reads.")
    weight: float = Field(1.0, description="Coefficient of the term in the objective of each member it trains.")

    @property
    def label(self) -> str:
        return self.name or self.type


class ExchangeConfig(Strict):
    every: int = Field(1, ge=1, le=1_000_000, description="Exchange with the coordinator every k steps; exact coupling gradients when 1.")
    mode: Literal["sync"] = Field("sync", description="`sync`: a barrier per exchange (exact).")
    timeout_s: float = Field(300.0, gt=0, description="How long a member waits at the barrier for its peers before the run fails naming the missing ones.")


class TrackingConfig(Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory.")
    experiment: str = Field("poptrain", description="MLflow experiment name.")
    log_every: int = Field(1, ge=1, description="Log member metrics every k steps.")


class PlacementConfig(Strict):
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the members' bundles."
    )
    timeout_s: float = Field(30.0, gt=0, description="How long to wait for the cluster to fit the whole population.")


class RunConfig(Strict):
    """A population run."""

    name: str = Field(description="Run name: the MLflow parent run's name and the output folder's.")
    seed: int = Field(0, ge=0, description="Seed of everything: member initializations, data order, dropout.")
    steps: int = Field(gt=0, le=100_000_000, description="Training steps per member.")
    output_dir: str = Field("runs", description="Outputs go to `<output_dir>/<name>/`.")
    exchange: ExchangeConfig = Field(default_factory=ExchangeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    members: list[MemberConfig] = Field(description="The population.")
    couplings: list[SerializeAsAny[CouplingConfig]] = Field(default_factory=list, description="Cross-member terms.")
    gradient_path_check: Literal["error", "warn", "off"] = Field(
        "error",
        description="At the first step, a weighted term or coupling with no gradient path to a trainable "
        "parameter of a member it trains stops the run (`error`), warns (`warn`), or is ignored (`off`).",
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, `_`, `.` or `-`, starting with a letter or digit")
        return value

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

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
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(raw: dict, text: str) -> None:
    """Set one dotted key in the raw config; list items are addressed by index or by `name`."""
    path, value = parse_override(text)
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


def read_yaml(path: str | os.PathLike) -> dict:
    source = str(path)
    if not os.path.exists(source):
        raise ConfigError([("", f"file not found: {source}")], source)
    if os.path.isdir(source):
        raise ConfigError([("", f"{source} is a directory, not a YAML file")], source)
    try:
        with open(source, encoding="utf-8") as stream:
            raw = yaml.safe_load(stream)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([(where, f"not valid YAML: {problem}")], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read the file: {exc}")], source) from None
    if not isinstance(raw, dict):
        raise ConfigError([("", "the top level must be a mapping of keys (name, steps, members, ...)")], source)
    return raw


def load_config(
    config: str | os.PathLike | dict | RunConfig, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read, override and validate a run config; raises :class:`ConfigError` on any problem."""
    if isinstance(config, RunConfig):
        raw, source = config.model_dump(mode="json", exclude_unset=False), None
    elif isinstance(config, dict):
        raw, source = copy.deepcopy(config), None
    else:
        source = str(config)
        raw = read_yaml(source)
    try:
        for text in overrides:
            apply_override(raw, text)
        return validate_config(raw)
    except ConfigError as exc:
        exc.source = exc.source or source
        raise ConfigError(exc.problems, exc.source) from None


def validate_config(raw: dict) -> RunConfig:
    """Validate the schema, each coupling's own fields, and every cross-reference between names."""
    raw = dict(raw)
    raw_couplings = raw.pop("couplings", None) or []
    problems: list[tuple[str, str]] = []
    if not isinstance(raw_couplings, list) or not all(isinstance(c, dict) for c in raw_couplings):
        problems.append(("couplings", "must be a list of mappings, each with a `type`"))
        raw_couplings = []
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_validation_problems(exc) + problems) from None

    names = cfg.member_names
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            problems.append((f"members.{index}.name", f"duplicate member name {name!r}"))
        seen.add(name)
    if not names:
        problems.append(("members", "the population is empty: list at least one member"))

    from poptrain.couplings import resolve_coupling  # the registry imports this module

    typed: list[CouplingConfig] = []
    labels: set[str] = set()
    for index, item in enumerate(raw_couplings):
        key = f"couplings.{index}"
        if not isinstance(item.get("type"), str):
            problems.append((f"{key}.type", "required: the coupling's registered name or import path"))
            continue
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
        for field in ("members", "trains"):
            for name in getattr(specific, field) or []:
                if name not in names:
                    problems.append((f"{key}.{field}", f"unknown member {name!r}; members are {names}"))
        if specific.trains and specific.members:
            for name in specific.trains:
                if name not in specific.members and name in names:
                    problems.append((f"{key}.trains", f"member {name!r} is trained but not read by this coupling (add it to `members`)"))
        if specific.label in labels:
            problems.append((f"{key}.name", f"duplicate coupling name {specific.label!r}: give each coupling a distinct `name`"))
        labels.add(specific.label)
        try:
            problems.extend((f"{key}.{k}" if k else key, msg) for k, msg in cls.check_config(specific, cfg))
        except Exception as exc:  # a user coupling's own check failing is still a config problem
            problems.append((key, f"{cls.__name__}.check_config failed: {exc}"))
        typed.append(specific)
    for index, member in enumerate(cfg.members):
        term_names = [t.name for t in member.terms]
        for t_index, term in enumerate(member.terms):
            if term.name in ("loss", "objective") or term_names.count(term.name) > 1:
                problems.append((f"members.{index}.terms.{t_index}.name", f"term name {term.name!r} is reserved or duplicated"))
    if problems:
        raise ConfigError(problems)
    # Keep the typed coupling objects (one-to-one with the YAML) without re-validating the whole run.
    object.__setattr__(cfg, "couplings", typed)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


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
